"""The model: a sequence-classification head with corpus-level metrics for its problem type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchmetrics import MeanSquaredError, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelExactMatch,
    MultilabelF1Score,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from transformers import AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from lightning_ft import packing
from lightning_ft.errors import UserError
from lightning_ft.metrics.classification import OneClass
from lightning_ft.tasks.base import TaskModule, label_maps
from lightning_ft.tasks.text_classification.data import MULTI, REGRESSION, SINGLE

# What each problem type reports when task.metrics is null; its first is the monitored metric.
DEFAULT_METRICS = {SINGLE: ["accuracy", "f1_macro", "mcc"], MULTI: ["f1_micro", "f1_macro", "exact_match"],
                   REGRESSION: ["spearman", "pearson", "mse"]}
LOWER_IS_BETTER = {"mse"}


class TextClassificationTask(TaskModule):
    """A sequence-classification head on the backbone, with corpus-level metrics for its problem type.

    Args:
        num_labels, id2label, problem_type: from ``TextClassificationData.model_kwargs()``.
        threshold: the sigmoid probability above which a multi-label class is predicted.
        metrics: the metrics to report, by name, the first one monitored (``task.metrics``): single-label
            ``accuracy``, ``f1``, ``precision`` and ``recall`` (of ``positive_label``), ``f1_macro``, ``mcc``;
            multi-label ``f1_micro``, ``f1_macro``, ``exact_match``; regression ``pearson``, ``spearman``, ``mse``.
            None: the problem type's defaults (``DEFAULT_METRICS``). The GLUE dataset configs set the metrics each
            GLUE task is published with (MRPC: ``[f1, accuracy]``, CoLA: ``[mcc]``).
        positive_label: the class whose ``f1``/``precision``/``recall`` are reported: a label name or index; None:
            the second of two labels (index 1, GLUE's positive class).
        window_reduce: from the data (``dataset.window_reduce``, with ``dataset.long_inputs=window``): how a
            document's windows' logits make its one prediction, ``mean`` or ``max``.
    """

    # A windowed evaluation batch's entries for the metrics (TextClassificationData.collate), not for the model.
    non_model_keys = ("window_document", "document_labels")

    auto_class = AutoModelForSequenceClassification

    def __init__(
        self,
        *,
        num_labels: int,
        id2label: dict[int, str],
        problem_type: str = SINGLE,
        threshold: float = 0.5,
        metrics: list[str] | None = None,
        positive_label: str | int | None = None,
        window_reduce: str = "mean",
        **kwargs: Any,
    ) -> None:
        self.window_reduce = window_reduce
        self.problem_type = problem_type
        self.threshold = threshold
        self.num_labels = num_labels
        self.positive_index = _positive_index(positive_label, id2label, problem_type)
        available = self._metric_factories()
        self.metric_names = list(metrics or DEFAULT_METRICS[problem_type])
        unknown = [m for m in self.metric_names if m not in available]
        if unknown:
            raise UserError(f"task.metrics names '{unknown[0]}', which a {problem_type.replace('_', ' ')} task does "
                            f"not report: choose from {', '.join(available)}.")
        if self.positive_index is None and {"f1", "precision", "recall"} & set(self.metric_names):
            raise UserError(f"task.metrics 'f1', 'precision' and 'recall' score one class, and these {num_labels} "
                            "labels have no default positive one: set task.positive_label to a label name, or use "
                            "f1_macro.")
        head = {**label_maps(id2label), "num_labels": num_labels}
        super().__init__(model_config={**head, "problem_type": problem_type}, **kwargs)

    @property
    def monitor(self) -> tuple[str, str]:
        first = self.metric_names[0]
        return f"val/{first}", "min" if first in LOWER_IS_BETTER else "max"

    def _metric_factories(self) -> dict[str, Callable[[], Metric]]:
        n, threshold = self.num_labels, self.threshold
        if self.problem_type == REGRESSION:
            return {"pearson": PearsonCorrCoef, "spearman": SpearmanCorrCoef, "mse": MeanSquaredError}
        if self.problem_type == MULTI:
            return {"f1_micro": lambda: MultilabelF1Score(n, threshold=threshold, average="micro"),
                    "f1_macro": lambda: MultilabelF1Score(n, threshold=threshold, average="macro"),
                    "exact_match": lambda: MultilabelExactMatch(n, threshold=threshold)}
        positive = self.positive_index
        return {"accuracy": lambda: MulticlassAccuracy(n, average="micro"),
                "f1": lambda: OneClass(MulticlassF1Score(n, average="none"), positive),
                "precision": lambda: OneClass(MulticlassPrecision(n, average="none"), positive),
                "recall": lambda: OneClass(MulticlassRecall(n, average="none"), positive),
                "f1_macro": lambda: MulticlassF1Score(n, average="macro"),
                "mcc": lambda: MulticlassMatthewsCorrCoef(n)}

    def make_metrics(self, prefix: str) -> MetricCollection:
        factories = self._metric_factories()
        return MetricCollection({name: factories[name]() for name in self.metric_names}, prefix=prefix)

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
        with packing.first_tokens_to_head(base, layout):
            return self.model(**inputs)

    def _eval_step(self, stage: str, batch: dict) -> None:
        if "window_document" not in batch:
            return super()._eval_step(stage, batch)
        # Windowed documents: each scored once, from its windows' logits; the loss is the document's too.
        labels = batch["document_labels"]
        own = self.own_rows(stage, len(labels))
        if own == 0:
            return
        logits = pool_windows(self(**batch).logits.float(), batch["window_document"], len(labels),
                              self.window_reduce)[:own]
        labels = labels[:own]
        if self.problem_type == REGRESSION:
            loss = torch.nn.functional.mse_loss(logits.squeeze(-1), labels)
        elif self.problem_type == MULTI:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        else:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        self.eval_loss[stage].update(loss.detach(), labels.numel())
        self.update_metrics(self.metrics[stage], SequenceClassifierOutput(logits=logits), {"labels": labels})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        logits = outputs.logits.float()
        if self.problem_type == REGRESSION:
            metrics.update(logits.squeeze(-1), batch["labels"].float())
        elif self.problem_type == MULTI:
            metrics.update(torch.sigmoid(logits), batch["labels"].int())
        else:
            metrics.update(logits.argmax(-1), batch["labels"])


def pool_windows(logits: torch.Tensor, owner: torch.Tensor, documents: int, reduce: str) -> torch.Tensor:
    """One row of logits per document from its windows' rows (``owner``: each window's document): their mean or
    their element-wise max."""
    index = owner.to(logits.device)[:, None].expand_as(logits)
    pooled = logits.new_zeros(documents, logits.shape[-1])
    return pooled.scatter_reduce(0, index, logits, reduce="mean" if reduce == "mean" else "amax", include_self=False)


def _positive_index(positive_label: str | int | None, id2label: dict[int, str], problem_type: str) -> int | None:
    """The index of ``task.positive_label`` among the labels; None given, the second of two."""
    names = {int(i): str(name) for i, name in id2label.items()}
    if positive_label is None:
        return 1 if problem_type == SINGLE and len(names) == 2 else None
    if problem_type != SINGLE:
        raise UserError(f"task.positive_label={positive_label!r} is for single-label classification, and this task "
                        f"is {problem_type.replace('_', ' ')}: drop it.")
    by_name = {name: i for i, name in names.items()}
    if str(positive_label) in by_name:
        return by_name[str(positive_label)]
    if isinstance(positive_label, int) and not isinstance(positive_label, bool) and positive_label in names:
        return positive_label
    raise UserError(f"task.positive_label={positive_label!r} is not one of the labels "
                    f"({', '.join(names.values())}): give a label name or index.")
