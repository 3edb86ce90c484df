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
from transformers.modeling_outputs import SequenceClassifierOutput

from lightning_ft import packing
from lightning_ft.errors import UserError
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

    def packed_forward(self, inputs: dict[str, torch.Tensor], layout: dict[str, torch.Tensor]) -> Any:
        """Packed rows through the backbone; the head reads each example's own token: an encoder head (BERT's pooler,
        RoBERTa's classifier...) its first, a decoder's ``score`` its last."""
        base = getattr(self.model, self.model.base_model_prefix)
        if self.packing_causal:
            labels = inputs.pop("labels", None)
            if not hasattr(self.model, "score"):
                raise UserError(f"dataset.packing=true does not know where the {type(self.model).__name__} head "
                                "reads a decoder's examples: set dataset.packing=false.")
            logits = self.model.score(packing.gather(base(**inputs).last_hidden_state, layout, last=True))
            loss = None if labels is None else self.model.loss_function(
                logits=logits, labels=labels, pooled_logits=logits, config=self.model.config)
            return SequenceClassifierOutput(loss=loss, logits=logits)
        stack = getattr(base, "encoder", None) or getattr(base, "transformer", None)
        if stack is None:
            raise UserError(f"dataset.packing=true does not know the layer stack of {type(base).__name__}: set "
                            "dataset.packing=false.")

        def first_tokens(module: Any, args: Any, output: Any) -> Any:
            # The head reads position 0 of what the encoder returns: hand it one row per example, its first token.
            hidden = packing.gather(output[0], layout)[:, None]
            return (hidden, *output[1:]) if isinstance(output, tuple) else type(output)(last_hidden_state=hidden)

        handle = stack.register_forward_hook(first_tokens)
        try:
            return self.model(**inputs)
        finally:
            handle.remove()

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        logits = outputs.logits.float()
        if self.problem_type == REGRESSION:
            metrics.update(logits.squeeze(-1), batch["labels"].float())
        elif self.problem_type == MULTI:
            metrics.update(torch.sigmoid(logits), batch["labels"].int())
        else:
            metrics.update(logits.argmax(-1), batch["labels"])
