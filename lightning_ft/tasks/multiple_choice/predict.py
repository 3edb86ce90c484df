"""Prediction: the chosen answer of each row, with every choice's probability."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_ft.data.base import dotted_field
from lightning_ft.errors import UserError
from lightning_ft.tasks.multiple_choice.data import read_choices
from lightning_ft.tasks.spec import column_option, option


@dataclass
class ChooseOptions:
    """The options of ``python -m lightning_ft.predict`` for a multiple-choice model."""

    question_column: str = column_option("question", help="the question column")
    choices_column: str | None = column_option("choices", None, help="the column of choices (a list, or ARC's dict)")
    ending_columns: list[str] | None = column_option(None, help="columns holding one choice each (SWAG's ending0..3)")
    context_column: str | None = column_option(None, help="a context put before the question")
    choice_text_key: str = option("text", "the key of a choice's text in a dict of choices")
    choice_label_key: str = option("label", "the key of a choice's label in a dict of choices")
    max_length: int = option(512, "tokens kept of each (question, choice) pair")


def _example(row: dict, question_column: str, choices_column: str | None, ending_columns: list[str] | None,
             text_key: str, label_key: str) -> tuple[str, list[str], list[str]]:
    """A row's question, choice texts and choice labels. A question that is a dict with ``stem`` and ``choices``
    (OpenBookQA's own layout) gives both."""
    question = dotted_field(row, question_column)
    if isinstance(question, dict) and "stem" in question:
        if not choices_column and not ending_columns and "choices" in question:
            choices_column = f"{question_column}.choices"
        question = question["stem"]
    texts, labels = read_choices(row, choices_column, ending_columns, text_key, label_key)
    return str(question), texts, labels


def check_rows(rows: list[dict], source: Any, tokenizer: Any, *, question_column: str, choices_column: str | None,
               ending_columns: list[str] | None, choice_text_key: str, choice_label_key: str, **_: Any) -> None:
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
def predict_rows(model: Any, tokenizer: Any, rows: list[dict], *, question_column: str, choices_column: str | None,
                 ending_columns: list[str] | None, context_column: str | None, choice_text_key: str,
                 choice_label_key: str, max_length: int) -> list[dict]:
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
                firsts += [str(dotted_field(rows[i], context_column))] * count
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
