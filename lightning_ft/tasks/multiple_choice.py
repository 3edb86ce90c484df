"""Multiple choice: pick one of N answers (SWAG, OpenBookQA, ARC...), as the Hugging Face ``run_swag`` example does.

Each choice is encoded with the question (and the context, if any) as one sequence pair, and the model scores the
N pairs of an example against each other (``AutoModelForMultipleChoice``). Two data layouts work:

- SWAG style: ``context_column: sent1``, ``question_column: sent2``, ``ending_columns: [ending0, ...]`` and an
  integer ``label``; the pair is (context, question + " " + ending).
- A question with a list of choices, e.g. OpenBookQA's ``question.stem``, ``question.choices`` (dicts with
  ``text`` and ``label``) and ``answerKey`` "A".."D"; the pair is (question, choice). Column names may be dotted
  paths into nested fields.

The answer (``label_column``) may be the choice's index, its label (``A``..) or its text.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModelForMultipleChoice

from lightning_ft.data.base import TaskDataModule
from lightning_ft.errors import UserError
from lightning_ft.tasks.base import TaskModule


def field(row: dict, path: str) -> Any:
    """``row["question"]["stem"]`` for the path ``question.stem`` (a plain column name works too)."""
    value: Any = row
    for part in path.split("."):
        value = value[part]
    return value


def _rows(batch: dict[str, list]) -> list[dict]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def read_choices(row: dict, choices_column: str | None, ending_columns: list[str] | None = None,
                 text_key: str = "text", label_key: str = "label") -> tuple[list[str], list[str]]:
    """The texts of a row's choices and their labels (``A``, ``B``... when the data has none): one column per choice
    (``ending_columns``), or a list in ``choices_column`` of strings or of dicts with ``text_key``/``label_key``."""
    if ending_columns:
        texts = [str(field(row, c)) for c in ending_columns]
        return texts, [chr(ord("A") + i) for i in range(len(texts))]
    if not choices_column:
        raise KeyError("no choices column")
    choices = field(row, choices_column)
    if isinstance(choices, str) and choices.lstrip().startswith("["):  # a csv cell holding a JSON list
        choices = json.loads(choices)
    if isinstance(choices, dict):  # a struct of lists, as datasets may store a list of dicts
        choices = [dict(zip(choices, values)) for values in zip(*choices.values())]
    if not isinstance(choices, list):
        raise TypeError(f"'{choices_column}' is not a list")
    texts = [str(c[text_key]) if isinstance(c, dict) else str(c) for c in choices]
    labels = [str(c.get(label_key, chr(ord("A") + i))) if isinstance(c, dict) else chr(ord("A") + i)
              for i, c in enumerate(choices)]
    return texts, labels


class MultipleChoiceData(TaskDataModule):
    """Examples with N candidate answers and the index, label or text of the right one.

    Args:
        question_column: the question (or SWAG's second sentence start, ``sent2``).
        context_column: text every choice is read against (SWAG's ``sent1``); none for a plain question.
        choices_column: a list of choices per row: strings, or dicts with the text under ``choice_text_key``
            and the label under ``choice_label_key``. Or use ``ending_columns``.
        ending_columns: one column per choice (SWAG's ``ending0``..``ending3``).
        label_column: the right choice: its index, label (``A``, ``B``...) or text.
        id_column: names an example in error messages (the row number when absent).
    """

    def __init__(
        self,
        *,
        question_column: str = "question",
        context_column: str | None = None,
        choices_column: str | None = "choices",
        ending_columns: list[str] | None = None,
        choice_text_key: str = "text",
        choice_label_key: str = "label",
        label_column: str = "label",
        id_column: str = "id",
        group_by_length: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(group_by_length=group_by_length, **kwargs)
        if not ending_columns and not choices_column:
            raise UserError("multiple choice needs dataset.choices_column or dataset.ending_columns: set one.")
        self.question_column = question_column
        self.context_column = context_column
        self.choices_column = None if ending_columns else choices_column
        self.ending_columns = list(ending_columns or [])
        self.choice_text_key = choice_text_key
        self.choice_label_key = choice_label_key
        self.label_column = label_column
        self.id_column = id_column
        self.num_choices = 0

    def required_columns(self, split: str) -> list[str]:
        paths = [self.question_column, self.label_column, self.context_column, self.choices_column,
                 *self.ending_columns]
        return [p.split(".")[0] for p in paths if p]

    # ---- reading one example -----------------------------------------------------------------------------------
    def _choices(self, row: dict) -> tuple[list[str], list[str]]:
        """The texts of a row's choices and their labels (``A``, ``B``... when the data has none)."""
        return read_choices(row, self.choices_column, self.ending_columns, self.choice_text_key,
                            self.choice_label_key)

    def _answer(self, row: dict, texts: list[str], labels: list[str]) -> int | None:
        value = field(row, self.label_column)
        if isinstance(value, int) and not isinstance(value, bool):
            return value if 0 <= value < len(texts) else None
        value = str(value).strip()
        for candidates in (labels, texts):
            if value in candidates:
                return candidates.index(value)
        return int(value) if value.isdigit() and int(value) < len(texts) else None

    def check_split(self, split: str, data: Any) -> None:
        for number, row in enumerate(data):
            name = f"example '{row[self.id_column]}'" if self.id_column in row else f"row {number}"
            try:
                texts, labels = self._choices(row)
                question = field(row, self.question_column)
            except (KeyError, TypeError) as err:
                raise UserError(f"{name} of the {split} split has no field {err}: check the dataset's column "
                                "options (question_column, choices_column, choice_text_key...).") from err
            if not self.num_choices:
                self.num_choices = len(texts)
            if len(texts) != self.num_choices:
                raise UserError(
                    f"{name} of the {split} split has {len(texts)} choices where the first training example has "
                    f"{self.num_choices}: every example needs the same number of choices; fix or drop it."
                )
            if question is None:
                raise UserError(f"{name} of the {split} split has no question in '{self.question_column}'.")
            if self._answer(row, texts, labels) is None:
                raise UserError(
                    f"{name} of the {split} split has answer {field(row, self.label_column)!r}, which is neither a "
                    f"choice index (0-{len(texts) - 1}), a choice label ({', '.join(labels)}) nor a choice's text."
                )
        if self.num_choices < 2:
            raise UserError(f"the examples have {self.num_choices} choice: multiple choice needs at least two.")

    def model_kwargs(self) -> dict[str, Any]:
        self._prepare()
        return {"num_choices": self.num_choices}

    # ---- preprocessing -----------------------------------------------------------------------------------------
    def preprocessing_settings(self) -> dict[str, Any]:
        return {**super().preprocessing_settings(), "columns": [self.question_column, self.context_column,
                self.choices_column, self.ending_columns, self.label_column, self.choice_text_key,
                self.choice_label_key]}

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        firsts, seconds, answers = [], [], []
        for row in _rows(batch):
            texts, labels = self._choices(row)
            question = str(field(row, self.question_column))
            if self.context_column:
                firsts += [str(field(row, self.context_column))] * len(texts)
                seconds += [f"{question} {text}" for text in texts]
            else:
                firsts += [question] * len(texts)
                seconds += texts
            answers.append(self._answer(row, texts, labels))
        encoding = self.tokenizer(firsts, seconds, truncation=True, max_length=self.max_length)
        n = self.num_choices
        out = {key: [values[i:i + n] for i in range(0, len(values), n)] for key, values in encoding.items()}
        out["labels"] = answers
        return out

    def collate(self, features: list[dict]) -> dict:
        from transformers import DataCollatorForMultipleChoice

        if not hasattr(self, "_collator"):
            self._collator = DataCollatorForMultipleChoice(self.tokenizer, pad_to_multiple_of=self.pad_to_multiple_of)
        return self._collator(features)


class MultipleChoiceTask(TaskModule):
    """A multiple-choice head (one score per choice, softmax over the choices) with corpus-level accuracy.

    Args:
        num_choices: choices per example, from ``MultipleChoiceData.model_kwargs()``.
    """

    auto_class = AutoModelForMultipleChoice
    default_monitor = ("val/accuracy", "max")

    def __init__(self, *, num_choices: int, **kwargs: Any) -> None:
        self.num_choices = num_choices
        super().__init__(**kwargs)

    def make_metrics(self, prefix: str) -> MetricCollection:
        return MetricCollection({"accuracy": MulticlassAccuracy(self.num_choices, average="micro")}, prefix=prefix)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        metrics.update(outputs.logits.argmax(-1), batch["labels"])


# ---- prediction (python -m lightning_ft.predict) -------------------------------------------------------------------
# The columns predict reads when none is named: the first of these the input has (a trailing None: optional).
PREDICT_COLUMNS = {"question_column": ("question",), "choices_column": ("choices", None)}


def _example(row: dict, question_column: str, choices_column: str | None, ending_columns: list[str] | None,
             text_key: str, label_key: str) -> tuple[str, list[str], list[str]]:
    """A row's question, choice texts and choice labels. A question that is a dict with ``stem`` and ``choices``
    (OpenBookQA's own layout) gives both."""
    question = field(row, question_column)
    if isinstance(question, dict) and "stem" in question:
        if not choices_column and not ending_columns and "choices" in question:
            choices_column = f"{question_column}.choices"
        question = question["stem"]
    texts, labels = read_choices(row, choices_column, ending_columns, text_key, label_key)
    return str(question), texts, labels


def check_rows(rows: list[dict], source: Any, tokenizer: Any, *, question_column: str = "question",
               choices_column: str | None = None, ending_columns: list[str] | None = None,
               choice_text_key: str = "text", choice_label_key: str = "label", **_: Any) -> None:
    """Every row needs its choices (a list, or the ``ending_columns``), at least two."""
    for number, row in enumerate(rows, start=1):
        try:
            _, texts, _ = _example(row, question_column, choices_column, ending_columns, choice_text_key,
                                   choice_label_key)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"row {number} of {source} has no list of choices ({err}): name the column holding "
                            "them with choices_column= (in a csv cell, a JSON list), or give ending_columns=[a,b,...]."
                            ) from err
        if len(texts) < 2:
            raise UserError(f"row {number} of {source} has {len(texts)} choice: multiple choice needs at least two.")


@torch.no_grad()
def predict_rows(model: Any, tokenizer: Any, rows: list[dict], *, question_column: str = "question",
                 choices_column: str | None = None, ending_columns: list[str] | None = None,
                 context_column: str | None = None, choice_text_key: str = "text", choice_label_key: str = "label",
                 max_length: int = 512) -> list[dict]:
    """The model's pick among each row's choices: ``choice`` (its index), ``choice_label``, ``choice_text``, and
    ``scores``, every choice's probability. Each choice is read with the question as training read it: (question,
    choice), or (context, question + " " + choice) with a ``context_column``. Rows may differ in their number of
    choices."""
    examples = [_example(row, question_column, choices_column, ending_columns, choice_text_key, choice_label_key)
                for row in rows]
    out: list[dict] = [{} for _ in rows]
    by_count: dict[int, list[int]] = {}
    for i, (_, texts, _) in enumerate(examples):
        by_count.setdefault(len(texts), []).append(i)
    for count, indices in by_count.items():  # a batch holds examples with as many choices
        firsts, seconds = [], []
        for i in indices:
            question, texts, _ = examples[i]
            if context_column:
                firsts += [str(field(rows[i], context_column))] * count
                seconds += [f"{question} {text}" for text in texts]
            else:
                firsts += [question] * count
                seconds += texts
        encoding = tokenizer(firsts, seconds, truncation=True, padding=True, return_tensors="pt",
                             max_length=min(max_length, tokenizer.model_max_length))
        inputs = {k: v.view(len(indices), count, -1).to(model.device) for k, v in encoding.items()}
        probabilities = torch.softmax(model(**inputs).logits.float(), -1).cpu()
        for i, scores in zip(indices, probabilities.tolist()):
            best = max(range(count), key=scores.__getitem__)
            _, texts, labels = examples[i]
            out[i] = {"choice": best, "choice_label": labels[best], "choice_text": texts[best], "scores": scores}
    return out
