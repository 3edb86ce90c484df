"""The model: a multiple-choice head, softmax over each question's choices, corpus accuracy."""

from __future__ import annotations

from typing import Any

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModelForMultipleChoice

from lightning_ft.tasks.base import TaskModule


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
