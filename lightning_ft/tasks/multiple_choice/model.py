"""The model: a multiple-choice head, softmax over each question's choices, corpus accuracy."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModelForMultipleChoice
from transformers.modeling_outputs import MultipleChoiceModelOutput

from lightning_ft import packing
from lightning_ft.errors import UserError
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

    def packed_forward(self, inputs: dict[str, torch.Tensor], layout: dict[str, torch.Tensor]) -> Any:
        """Every choice of the batch packed in rows (``MultipleChoiceData.collate_packed``): the backbone's pooler
        and the head read each choice's own first token, and the scores come back a row of choices per question.
        (The model's own forward cannot take packed rows: it flattens a 3D batch's attention mask.)"""
        labels = inputs.pop("labels", None)
        base = getattr(self.model, self.model.base_model_prefix)
        classifier, dropout = getattr(self.model, "classifier", None), getattr(self.model, "dropout", None)
        if getattr(base, "pooler", None) is None or classifier is None or dropout is None:
            raise UserError(f"dataset.packing=true does not know how {type(self.model).__name__} scores a choice "
                            "(it needs a pooler, dropout and classifier): set dataset.packing=false.")
        with packing.first_tokens_to_head(base, layout):
            pooled = base(**inputs).pooler_output
        # The packing check runs single texts without labels: one choice each.
        logits = classifier(dropout(pooled)).view(-1, 1 if labels is None else self.num_choices)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return MultipleChoiceModelOutput(loss=loss, logits=logits)

    def _output_alone(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids[:, None]).logits[0]  # one question with one choice
