"""Entity-level precision/recall/F1 as seqeval computes them, as a torchmetrics Metric (corpus level, DDP-safe).

torchmetrics has no span-level sequence-labelling metric, and seqeval itself works on Python lists gathered over
the whole split, which does not sync across DDP ranks. Here each rank counts true positives, predicted and gold
entities per type into tensor states that are summed across ranks before ``compute``: the same numbers seqeval
gives on the concatenated corpus.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

PREFIXES = ("B-", "I-", "E-", "S-")


def is_entity_scheme(labels: Sequence[str]) -> bool:
    """True when every label is ``O`` or a ``B-/I-/E-/S-`` tag (IOB1, IOB2, BIOES), i.e. spans can be read off."""
    return any(label != "O" for label in labels) and all(label == "O" or label.startswith(PREFIXES) for label in labels)


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    # conlleval's chunk boundaries, as seqeval's default (non-strict) mode implements them.
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The ``(type, first, last)`` spans of one tag sequence, read like conlleval/seqeval (an ``I-`` with no ``B-``
    before it starts an entity; IOB1, IOB2 and BIOES all work)."""
    entities = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, label in enumerate([*tags, "O"]):
        tag, type_ = label[0], label[1:].split("-", maxsplit=1)[-1] or "_"
        if _ends(prev_tag, tag, prev_type, type_):
            entities.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return entities


class EntityScores(Metric):
    """Entity-level micro precision/recall/F1, the same per entity type (with support), and word accuracy.

    ``update(preds, targets)`` takes batches of tag sequences (lists of label strings, one per word). For label sets
    that are not entity tags (e.g. POS), only ``accuracy`` is computed.

    Args:
        labels: every label the model can predict (its ``id2label`` values).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, labels: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.entity_mode = is_entity_scheme(labels)
        self.types = sorted({label[2:] for label in labels if label != "O"}) if self.entity_mode else []
        self._type_index = {t: i for i, t in enumerate(self.types)}
        n = len(self.types)
        for name in ("true_positives", "predicted", "gold"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct_words", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("words", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _count(self, spans: set[tuple[str, int, int]]) -> torch.Tensor:
        counts = torch.zeros(len(self.types), dtype=torch.long)
        for type_, _, _ in spans:
            counts[self._type_index[type_]] += 1
        return counts

    def update(self, preds: Sequence[Sequence[str]], targets: Sequence[Sequence[str]]) -> None:
        correct = words = 0
        tp, predicted, gold = (torch.zeros(len(self.types), dtype=torch.long) for _ in range(3))
        for pred, target in zip(preds, targets, strict=True):
            if len(pred) != len(target):
                raise ValueError(f"a prediction has {len(pred)} tags for {len(target)} gold tags")
            correct += sum(p == t for p, t in zip(pred, target))
            words += len(target)
            if self.entity_mode:
                pred_spans, gold_spans = set(get_entities(pred)), set(get_entities(target))
                tp += self._count(pred_spans & gold_spans)
                predicted += self._count(pred_spans)
                gold += self._count(gold_spans)
        self.correct_words += correct
        self.words += words
        if self.entity_mode:
            device = self.true_positives.device
            self.true_positives += tp.to(device)
            self.predicted += predicted.to(device)
            self.gold += gold.to(device)

    @staticmethod
    def _prf(tp: torch.Tensor, predicted: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # seqeval's zero_division: a ratio with a zero denominator is 0.
        tp, predicted, gold = tp.double(), predicted.double(), gold.double()
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
        recall = torch.where(gold > 0, tp / gold.clamp(min=1), 0.0)
        denominator = precision + recall
        f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-12), 0.0)
        return precision, recall, f1

    def compute(self) -> dict[str, torch.Tensor]:
        result = {"accuracy": self.correct_words.double() / self.words.clamp(min=1)}
        if not self.entity_mode:
            return result
        p, r, f = self._prf(self.true_positives.sum(), self.predicted.sum(), self.gold.sum())
        result.update(precision=p, recall=r, f1=f)
        per_type = self._prf(self.true_positives, self.predicted, self.gold)
        for i, type_ in enumerate(self.types):
            for name, values in zip(("precision", "recall", "f1"), per_type):
                result[f"{type_}/{name}"] = values[i]
            result[f"{type_}/support"] = self.gold[i].double()
        return result
