"""The data: a question with its choices (a list column or ending columns), one (question, choice) pair each."""

from __future__ import annotations

import json
from typing import Any

from lightning_ft.data.base import TaskDataModule, dotted_field
from lightning_ft.errors import UserError


def _rows(batch: dict[str, list]) -> list[dict]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def read_choices(row: dict, choices_column: str | None, ending_columns: list[str] | None = None,
                 text_key: str = "text", label_key: str = "label") -> tuple[list[str], list[str]]:
    """The texts of a row's choices and their labels (``A``, ``B``... when the data has none): one column per choice
    (``ending_columns``), or a list in ``choices_column`` of strings or of dicts with ``text_key``/``label_key``."""
    if ending_columns:
        texts = [str(dotted_field(row, c)) for c in ending_columns]
        return texts, [chr(ord("A") + i) for i in range(len(texts))]
    if not choices_column:
        raise KeyError("no choices column")
    choices = dotted_field(row, choices_column)
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

    packed_token_keys = ("input_ids", "token_type_ids")  # dataset.packing=true: every choice a packed example

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

    def predict_columns(self) -> dict[str, Any]:
        return {"question_column": self.question_column, "choices_column": self.choices_column,
                "ending_columns": self.ending_columns or None, "context_column": self.context_column}

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
        value = dotted_field(row, self.label_column)
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
                question = dotted_field(row, self.question_column)
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
                    f"{name} of the {split} split has answer {dotted_field(row, self.label_column)!r}, which is "
                    f"neither a choice index (0-{len(texts) - 1}), a choice label ({', '.join(labels)}) nor a "
                    "choice's text."
                )
        if self.num_choices < 2:
            raise UserError(f"the examples have {self.num_choices} choice: multiple choice needs at least two.")

    def head_kwargs(self) -> dict[str, Any]:
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
            question = str(dotted_field(row, self.question_column))
            if self.context_column:
                firsts += [str(dotted_field(row, self.context_column))] * len(texts)
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

    def make_collator(self) -> Any:
        from transformers import DataCollatorForMultipleChoice

        return DataCollatorForMultipleChoice(self.tokenizer, pad_to_multiple_of=self.pad_to_multiple_of)

    def collate_packed(self, features: list[dict]) -> dict:
        """Every choice of the batch's questions packed into rows of up to ``max_length`` tokens, question by
        question, choice by choice (the order the model's scores are read back in); one label per question."""
        from lightning_ft.packing import pack_batch

        padded = self.collate(features)
        texts = {key: value.flatten(0, 1) if value.dim() == 3 else value for key, value in padded.items()}
        return pack_batch(texts, self.max_length, self.packed_token_keys, self.tokenizer.pad_token_id or 0,
                          self.pad_to_multiple_of)
