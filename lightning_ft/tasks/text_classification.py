"""Text classification: single-label, multi-label and regression, over single sentences or sentence pairs.

The problem type comes from the data unless given: a list label is multi-label, a non-integer number is
regression (one output, MSE), anything else is single-label. The label set and its order come from the
training split (or ``label_names``) and travel with the model as ``id2label``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
    MultilabelExactMatch,
    MultilabelF1Score,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from transformers import AutoModelForSequenceClassification

from lightning_ft.data.base import TaskDataModule
from lightning_ft.errors import UserError
from lightning_ft.tasks.base import TaskModule

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
PROBLEM_TYPES = (SINGLE, MULTI, REGRESSION)


class TextClassificationData(TaskDataModule):
    """Rows of ``text_column`` (and ``text_pair_column`` for pairs) with a label in ``label_column``.

    Args:
        problem_type: ``single_label_classification``, ``multi_label_classification`` or ``regression``;
            inferred from the training labels when null.
        label_names: the label order (and, for integer labels, their names); from the training data when null.
        label_separator: split string labels on it to get multi-label lists (e.g. ``"a,b"`` in a CSV).
    """

    def __init__(
        self,
        *,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        problem_type: str | None = None,
        label_names: list[str] | None = None,
        label_separator: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise UserError(f"dataset.problem_type '{problem_type}' is not one of {', '.join(PROBLEM_TYPES)}.")
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.problem_type = problem_type
        self.label_names = list(label_names) if label_names else None
        self.label_separator = label_separator
        self.label2id: dict[Any, int] = {}

    # ---- labels ------------------------------------------------------------------------------------------------
    def _labels_of(self, value: Any) -> list:
        if self.label_separator is not None and isinstance(value, str):
            return [v.strip() for v in value.split(self.label_separator) if v.strip()]
        return list(value)

    def fit_labels(self, train: Any) -> None:
        values = train[self.label_column]
        if self.problem_type is None:
            self.problem_type = self._infer_problem_type(values)
        if self.problem_type == REGRESSION:
            self.label2id = {}
            return
        feature = train.features[self.label_column]
        if self.problem_type == MULTI:
            seen = sorted({v for row in values for v in self._labels_of(row)}, key=str)
        else:
            seen = sorted(set(values), key=lambda v: (isinstance(v, str), v))
        if self.label_names is None and hasattr(feature, "names"):  # a hub ClassLabel carries its names
            self.label_names = list(feature.names)
        if self.label_names is not None:
            if all(isinstance(v, int) for v in seen):  # integer labels index into the given names
                bad = [v for v in seen if not 0 <= v < len(self.label_names)]
                if bad:
                    raise UserError(
                        f"label {bad[0]} in the train split has no entry in dataset.label_names "
                        f"({len(self.label_names)} names): give one name per label index."
                    )
                self.label2id = {i: i for i in range(len(self.label_names))}
            else:
                unknown = [v for v in seen if v not in self.label_names]
                if unknown:
                    raise UserError(
                        f"label '{unknown[0]}' in the train split is not in dataset.label_names: add it there."
                    )
                self.label2id = {name: i for i, name in enumerate(self.label_names)}
        else:
            self.label2id = {v: i for i, v in enumerate(seen)}
        if len(self.label2id) < 2 and self.problem_type == SINGLE:
            raise UserError(
                f"the train split has a single label ({seen[0]!r}) in column '{self.label_column}': a classifier "
                "needs at least two; check dataset.label_column."
            )

    def _infer_problem_type(self, values: list) -> str:
        first = next((v for v in values if v is not None), None)
        if isinstance(first, (list, tuple)) or (self.label_separator is not None and isinstance(first, str)):
            return MULTI
        if isinstance(first, float) and any(not float(v).is_integer() for v in values if v is not None):
            return REGRESSION
        return SINGLE

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == REGRESSION else len(self.label2id)

    @property
    def id2label(self) -> dict[int, str]:
        if self.problem_type == REGRESSION:
            return {0: self.label_column}
        if self.label_names is not None:
            return dict(enumerate(self.label_names))
        return {i: str(v) for v, i in self.label2id.items()}

    def model_kwargs(self) -> dict[str, Any]:
        """What the classifier head needs to know about the labels."""
        self._prepare()
        return {"num_labels": self.num_labels, "id2label": self.id2label, "problem_type": self.problem_type}

    def check_split(self, split: str, data: Any) -> None:
        if self.label_column not in data.column_names:
            return
        for row, value in enumerate(data[self.label_column]):
            if value is None:
                raise UserError(f"row {row} of the {split} split has no label in column '{self.label_column}'.")
            if self.problem_type == REGRESSION:
                if not isinstance(value, (int, float)) or math.isnan(value):
                    raise UserError(f"row {row} of the {split} split has a non-numeric score {value!r}.")
                continue
            for label in self._labels_of(value) if self.problem_type == MULTI else [value]:
                if label not in self.label2id:
                    raise UserError(
                        f"label {label!r} in row {row} of the {split} split never appears in the train split "
                        f"(known: {', '.join(map(str, self.label2id))}): add training examples with it, list it in "
                        "dataset.label_names, or drop those rows."
                    )

    # ---- preprocessing -----------------------------------------------------------------------------------------
    def required_columns(self, split: str) -> list[str]:
        columns = [self.text_column, self.label_column]
        return columns + ([self.text_pair_column] if self.text_pair_column else [])

    def preprocessing_settings(self) -> dict[str, Any]:
        return {
            **super().preprocessing_settings(),
            "columns": self.required_columns("train"),
            "problem_type": self.problem_type,
            "label2id": sorted((str(k), v) for k, v in self.label2id.items()),
            "label_separator": self.label_separator,
        }

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        pairs = batch[self.text_pair_column] if self.text_pair_column else None
        encoding = self.tokenizer(batch[self.text_column], pairs, truncation=True, max_length=self.max_length)
        self.count_truncated(encoding)
        labels = batch[self.label_column]
        if self.problem_type == REGRESSION:
            encoding["labels"] = [float(v) for v in labels]
        elif self.problem_type == MULTI:
            encoding["labels"] = [self._multi_hot(v) for v in labels]
        else:
            encoding["labels"] = [self.label2id[v] for v in labels]
        return dict(encoding)

    def _multi_hot(self, value: Any) -> list[float]:
        hot = [0.0] * len(self.label2id)
        for label in self._labels_of(value):
            hot[self.label2id[label]] = 1.0
        return hot


class TextClassificationTask(TaskModule):
    """A sequence-classification head on the backbone, with corpus-level metrics for its problem type.

    Args:
        num_labels, id2label, problem_type: from ``TextClassificationData.model_kwargs()``.
        threshold: the sigmoid probability above which a multi-label class is predicted.
    """

    auto_class = AutoModelForSequenceClassification

    def __init__(
        self,
        *,
        num_labels: int,
        id2label: dict[int, str],
        problem_type: str = SINGLE,
        threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        self.problem_type = problem_type
        self.threshold = threshold
        self.num_labels = num_labels
        id2label = {int(k): str(v) for k, v in id2label.items()}
        head = {"num_labels": num_labels, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        super().__init__(model_config={**head, "problem_type": problem_type}, **kwargs)

    @property
    def monitor(self) -> tuple[str, str]:
        return {SINGLE: ("val/accuracy", "max"), MULTI: ("val/f1_micro", "max"), REGRESSION: ("val/spearman", "max")}[
            self.problem_type
        ]

    def make_metrics(self, prefix: str) -> MetricCollection:
        n = self.num_labels
        if self.problem_type == REGRESSION:
            metrics = {"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef(), "mse": MeanSquaredError()}
        elif self.problem_type == MULTI:
            metrics = {
                "f1_micro": MultilabelF1Score(n, threshold=self.threshold, average="micro"),
                "f1_macro": MultilabelF1Score(n, threshold=self.threshold, average="macro"),
                "exact_match": MultilabelExactMatch(n, threshold=self.threshold),
            }
        else:
            metrics = {
                "accuracy": MulticlassAccuracy(n, average="micro"),
                "f1_macro": MulticlassF1Score(n, average="macro"),
                "mcc": MulticlassMatthewsCorrCoef(n),
            }
        return MetricCollection(metrics, prefix=prefix)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        logits = outputs.logits.float()
        if self.problem_type == REGRESSION:
            metrics.update(logits.squeeze(-1), batch["labels"].float())
        elif self.problem_type == MULTI:
            metrics.update(torch.sigmoid(logits), batch["labels"].int())
        else:
            metrics.update(logits.argmax(-1), batch["labels"])


# ---- prediction (python -m lightning_ft.predict) -------------------------------------------------------------------
# The columns predict reads when none is named: the first of these the input has (a trailing None: optional).
PREDICT_COLUMNS = {"column": ("text", "sentence", "sentence1"), "pair_column": ("text_pair", "sentence2", None)}


@torch.no_grad()
def predict_rows(model: Any, tokenizer: Any, rows: list[dict], *, column: str = "text", pair_column: str | None = None,
                 threshold: float = 0.5, max_length: int = 512) -> list[dict]:
    """The prediction for each row's ``column`` text (with its ``pair_column`` text, for a model of pairs), by the
    problem type the model was trained for (its config's ``problem_type``): single-label ``label`` and its
    probability ``score``; multi-label the ``labels`` whose sigmoid probability is above ``threshold`` and those
    probabilities, ``scores``; regression the predicted ``score``."""
    pairs = [str(row[pair_column]) for row in rows] if pair_column else None
    encoding = tokenizer([str(row[column]) for row in rows], pairs, truncation=True, padding=True,
                         max_length=min(max_length, tokenizer.model_max_length), return_tensors="pt")
    logits = model(**encoding.to(model.device)).logits.float().cpu()
    config = model.config
    id2label = {int(k): str(v) for k, v in config.id2label.items()}
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
