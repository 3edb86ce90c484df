"""SQuAD scores (the official v1.1 and v2.0 evaluation scripts' rules) and a DDP-safe collector of span candidates.

``squad_scores`` reproduces the official scripts: answers are normalised (lower case, no punctuation, no articles
``a``/``an``/``the``, single spaces), exact match and token F1 take the best over the gold answers, and the corpus
score is the mean over questions, times 100. Version 2 adds ``HasAns_*`` and ``NoAns_*`` (an empty prediction is
"no answer"; it is right exactly when the question has no gold answer).

``SpanCandidates`` keeps, per evaluated window, only the ``top_k`` start and end positions and their logits plus the
no-answer score: what n-best post-processing reads, a few dozen numbers a window instead of two full logit rows. Its
states are concatenated across ranks and de-duplicated by window before ``compute``, so the windows that a
``DistributedSampler`` repeats to even out the ranks count once.
"""

from __future__ import annotations

import collections
import re
import string

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official scripts' normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str, version_2: bool = False) -> float:
    """Token-overlap F1 of the normalised strings. When either is empty, v2.0 scores 1 if both are and 0 otherwise;
    v1.1 scores 0 (no overlap)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version_2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], references: dict[str, list[str]], version_2: bool = False) -> dict:
    """Corpus EM/F1 (0-100) of ``predictions`` (id -> text) against ``references`` (id -> gold answer texts; an
    empty list means unanswerable). A reference with no prediction scores 0, as in the official scripts."""
    exact, f1, has_answer = [], [], []
    for qid, golds in references.items():
        prediction = predictions.get(qid)
        if version_2:  # the v2.0 script drops gold answers that normalise to nothing
            golds = [g for g in golds if normalize_answer(g)]
        golds = golds or [""]  # no gold answer: "" (no answer) is right
        has_answer.append(golds != [""])
        if prediction is None:
            exact.append(0.0)
            f1.append(0.0)
            continue
        exact.append(max(exact_match(prediction, g) for g in golds))
        f1.append(max(token_f1(prediction, g, version_2) for g in golds))

    def mean(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values) if values else 0.0

    scores = {"exact_match": mean(exact), "f1": mean(f1), "total": float(len(exact))}
    if version_2:
        for name, keep in (("HasAns", True), ("NoAns", False)):
            picked = [i for i, h in enumerate(has_answer) if h == keep]
            scores[f"{name}_exact"] = mean([exact[i] for i in picked])
            scores[f"{name}_f1"] = mean([f1[i] for i in picked])
            scores[f"{name}_total"] = float(len(picked))
    return scores


class SpanCandidates(Metric):
    """Per-window top-k answer-span candidates, gathered over the whole split and all ranks.

    ``update(example_index, window, start_logits, end_logits, context_start, context_end, cls_index)`` takes a
    batch of windows; logits outside ``[context_start, context_end]`` cannot start or end an answer and are masked
    before the top-k. ``compute`` returns a dict of tensors, one row per distinct ``(example_index, window)``.
    """

    full_state_update = False

    def __init__(self, top_k: int = 20, **kwargs) -> None:
        super().__init__(**kwargs)
        self.top_k = top_k
        for name in ("example_index", "window", "start_index", "end_index", "start_logit", "end_logit", "null_score"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        example_index: torch.Tensor,
        window: torch.Tensor,
        start_logits: torch.Tensor,
        end_logits: torch.Tensor,
        context_start: torch.Tensor,
        context_end: torch.Tensor,
        cls_index: torch.Tensor,
    ) -> None:
        start_logits, end_logits = start_logits.float(), end_logits.float()
        positions = torch.arange(start_logits.shape[1], device=start_logits.device)
        outside = (positions < context_start[:, None]) | (positions > context_end[:, None])
        k = min(self.top_k, start_logits.shape[1])
        starts = start_logits.masked_fill(outside, float("-inf")).topk(k, dim=1)
        ends = end_logits.masked_fill(outside, float("-inf")).topk(k, dim=1)
        rows = torch.arange(len(cls_index), device=cls_index.device)
        self.example_index.append(example_index.long())
        self.window.append(window.long())
        self.start_index.append(self._pad(starts.indices))
        self.end_index.append(self._pad(ends.indices))
        self.start_logit.append(self._pad(starts.values))
        self.end_logit.append(self._pad(ends.values))
        self.null_score.append(start_logits[rows, cls_index] + end_logits[rows, cls_index])

    def _pad(self, values: torch.Tensor) -> torch.Tensor:
        # A batch shorter than top_k tokens has fewer candidates; pad so every batch's rows have the same width.
        missing = self.top_k - values.shape[1]
        if missing <= 0:
            return values
        fill = float("-inf") if values.is_floating_point() else 0
        return torch.nn.functional.pad(values, (0, missing), value=fill)

    def compute(self) -> dict[str, torch.Tensor]:
        states = {name: dim_zero_cat(getattr(self, name)) for name in self._defaults}
        if not len(states["example_index"]):
            return states
        key = states["example_index"] * (states["window"].max() + 1) + states["window"]
        unique, inverse = torch.unique(key, return_inverse=True)
        first = torch.full_like(unique, len(key)).scatter_reduce(
            0, inverse, torch.arange(len(key), device=key.device), reduce="amin"
        )
        return {name: values[first] for name, values in states.items()}
