"""The model: a sequence-classification head with corpus-level metrics for its problem type."""

from __future__ import annotations

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

from lightning_ft.tasks.base import TaskModule, label_maps
from lightning_ft.tasks.text_classification.data import MULTI, REGRESSION, SINGLE


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
        head = {**label_maps(id2label), "num_labels": num_labels}
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
