"""One class's score out of a per-class torchmetrics metric: the binary F1, precision or recall of the positive
class that GLUE reports for MRPC and QQP, over predictions and labels of any number of classes."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class OneClass(Metric):
    """``metric`` (a per-class metric, ``average="none"``) read at class ``index``.

    torchmetrics' binary metrics want 0/1 inputs, and MetricCollection hands every metric the same class indices;
    this wrapper lets the positive class's F1 sit beside accuracy in one collection. The wrapped metric syncs its
    own states across processes when computed."""

    full_state_update = False

    def __init__(self, metric: Metric, index: int) -> None:
        super().__init__()
        self.metric = metric
        self.index = index

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.metric.update(preds, target)

    def compute(self) -> torch.Tensor:
        return self.metric.compute()[self.index]

    def reset(self) -> None:
        self.metric.reset()
        super().reset()
