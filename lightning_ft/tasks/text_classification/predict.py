"""Prediction: a label and its probability (multi-label: the labels above a threshold; regression: a score)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_ft.data.base import LONG_INPUTS
from lightning_ft.errors import UserError
from lightning_ft.tasks.base import label_maps
from lightning_ft.tasks.spec import column_option, option
from lightning_ft.tasks.text_classification.data import MULTI, REGRESSION, WINDOW_REDUCTIONS
from lightning_ft.tasks.text_classification.model import pool_windows


# ---- prediction (python -m lightning_ft.predict) -------------------------------------------------------------------
@dataclass
class ClassifyOptions:
    """The options of ``python -m lightning_ft.predict`` for a text classifier."""

    column: str = column_option("text", "sentence", "sentence1", help="the text column")
    pair_column: str | None = column_option("text_pair", "sentence2", None,
                                            help="the second text of a pair, for a model of pairs")
    threshold: float = option(0.5, "multi-label: the probability above which a label is predicted")
    max_length: int = option(512, "tokens kept of each text (of each window, with long_inputs=window)")
    long_inputs: str = option("truncate", "truncate: a text past max_length loses the rest; window: read in "
                                          "overlapping windows, one prediction from all (the model's training "
                                          "setting when it was trained so)")
    stride: int = option(32, "long_inputs=window: tokens shared by neighbouring windows")
    window_reduce: str = option("mean", "long_inputs=window: mean or max of the windows' logits")


@torch.no_grad()
def predict_rows(model: Any, tokenizer: Any, rows: list[dict], *, column: str, pair_column: str | None,
                 threshold: float, max_length: int, long_inputs: str = "truncate", stride: int = 32,
                 window_reduce: str = "mean") -> list[dict]:
    """The prediction for each row's ``column`` text (with its ``pair_column`` text, for a model of pairs), by the
    problem type the model was trained for (its config's ``problem_type``): single-label ``label`` and its
    probability ``score``; multi-label the ``labels`` whose sigmoid probability is above ``threshold`` and those
    probabilities, ``scores``; regression the predicted ``score``. With ``long_inputs=window`` a long text is read
    in overlapping windows and predicted once, from its windows' logits (``window_reduce``)."""
    if long_inputs not in LONG_INPUTS or window_reduce not in WINDOW_REDUCTIONS:
        raise UserError(f"--long_inputs {long_inputs} --window_reduce {window_reduce}: give long_inputs "
                        f"{' or '.join(LONG_INPUTS)} and window_reduce {' or '.join(WINDOW_REDUCTIONS)}.")
    pairs = [str(row[pair_column]) for row in rows] if pair_column else None
    texts = [str(row[column]) for row in rows]
    length = min(max_length, tokenizer.model_max_length)
    if long_inputs == "window":
        room = length - tokenizer.num_special_tokens_to_add(pair=bool(pairs))
        if not 0 <= stride < room:
            raise UserError(f"--stride {stride} leaves no new tokens in a window of {length} ({room} after the "
                            f"special tokens): give a stride below {room}.")
        encoding = tokenizer(texts, pairs, truncation="only_second" if pairs else True, padding=True,
                             max_length=length, stride=stride, return_overflowing_tokens=True, return_tensors="pt")
        owner = encoding.pop("overflow_to_sample_mapping")
        windows = model(**encoding.to(model.device)).logits.float().cpu()
        logits = pool_windows(windows, owner, len(rows), window_reduce)
    else:
        encoding = tokenizer(texts, pairs, truncation=True, padding=True, max_length=length, return_tensors="pt")
        logits = model(**encoding.to(model.device)).logits.float().cpu()
    config = model.config
    id2label = label_maps(config.id2label)["id2label"]
    if config.problem_type == REGRESSION or (config.problem_type is None and config.num_labels == 1):
        return [{"score": value} for value in logits[:, 0].tolist()]
    if config.problem_type == MULTI:
        out = []
        for probabilities in torch.sigmoid(logits).tolist():
            chosen = [i for i, p in enumerate(probabilities) if p > threshold]
            out.append({"labels": [id2label[i] for i in chosen], "scores": [probabilities[i] for i in chosen]})
        return out
    best = torch.softmax(logits, -1).max(-1)
    return [{"label": id2label[i], "score": p} for p, i in zip(best.values.tolist(), best.indices.tolist())]
