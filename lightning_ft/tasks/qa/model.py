"""The model: a span head with n-best post-processing over all windows of a question, official SQuAD EM/F1."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForQuestionAnswering

from lightning_ft.metrics.squad import SpanCandidates, squad_scores
from lightning_ft.tasks.base import TaskModule
from lightning_ft.tasks.qa.data import EXAMPLE_INDEX, WINDOW_COLUMNS


def best_answers(
    candidates: dict[str, torch.Tensor],
    windows: Any,
    examples: Any,
    *,
    id_column: str = "id",
    context_column: str = "context",
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, list[dict]]:
    """Each question's n-best answers (text, score, character span), best first, from its windows' candidates.

    For v2.0 the list holds the empty "no answer" too, ranked by the rule of ``null_score_diff_threshold``.
    """
    import numpy as np

    # The windows of a question are consecutive rows: its first row plus the window number finds each.
    indices, first = np.unique(np.asarray(windows[EXAMPLE_INDEX]), return_index=True)
    first_row = dict(zip(indices.tolist(), first.tolist()))
    # torchmetrics squeezes one-element results to scalars: give every state back its row dimension.
    count = candidates[EXAMPLE_INDEX].numel()
    values = {k: v.cpu().reshape(count, -1).tolist() if k.endswith(("_index", "_logit")) and k != EXAMPLE_INDEX
              else v.cpu().reshape(count).tolist() for k, v in candidates.items()}
    by_example: dict[int, list[int]] = {}
    for i, example in enumerate(values[EXAMPLE_INDEX]):
        by_example.setdefault(example, []).append(i)
    answers: dict[str, list[dict]] = {}
    for example, rows in by_example.items():
        context = examples[example][context_column]
        spans, null_score = [], None
        for i in rows:
            window = windows[first_row[example] + values["window"][i]]
            offsets = window["offset_mapping"]
            low, high = window["context_start"], window["context_end"]
            null_score = min(null_score, values["null_score"][i]) if null_score is not None else values["null_score"][i]
            for start, start_logit in zip(values["start_index"][i], values["start_logit"][i]):
                for end, end_logit in zip(values["end_index"][i], values["end_logit"][i]):
                    if not (low <= start <= end <= high) or end - start + 1 > max_answer_length:
                        continue
                    if start_logit == float("-inf") or end_logit == float("-inf"):
                        continue
                    begin, finish = offsets[start][0], offsets[end][1]
                    spans.append({"text": context[begin:finish], "score": start_logit + end_logit,
                                  "start": begin, "end": finish})
        spans = sorted(spans, key=lambda s: s["score"], reverse=True)[:n_best_size]
        if version_2:
            best = spans[0]["score"] if spans else float("-inf")
            null = {"text": "", "score": null_score, "start": -1, "end": -1}
            # The HF example's rule: answer nothing when the null score beats the best span by the threshold.
            spans = [null, *spans] if null_score - best > null_score_diff_threshold else [*spans, null]
        answers[str(examples[example][id_column])] = spans or [{"text": "", "score": 0.0, "start": -1, "end": -1}]
    return answers


class QuestionAnsweringTask(TaskModule):
    """A span-prediction head (start and end logits) with SQuAD EM/F1 over the whole split.

    Args:
        n_best_size: start and end candidates kept per window, and answers kept per question.
        max_answer_length: the longest answer, in tokens.
        version_2_with_negative: SQuAD v2.0: questions may have no answer (adds HasAns/NoAns scores).
        null_score_diff_threshold: v2.0: answer nothing when the no-answer score exceeds the best span's by more.
    """

    auto_class = AutoModelForQuestionAnswering
    default_monitor = ("val/f1", "max")
    non_model_keys = WINDOW_COLUMNS

    def __init__(
        self,
        *,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        version_2_with_negative: bool = False,
        null_score_diff_threshold: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        self.version_2_with_negative = version_2_with_negative
        self.null_score_diff_threshold = null_score_diff_threshold
        super().__init__(**kwargs)  # self.predictions: stage -> question id -> answer, of the last evaluation

    def make_metrics(self, prefix: str) -> SpanCandidates:
        return SpanCandidates(top_k=self.n_best_size)

    def update_metrics(self, metrics: SpanCandidates, outputs: Any, batch: dict) -> None:
        metrics.update(batch[EXAMPLE_INDEX], batch["window"], outputs.start_logits, outputs.end_logits,
                       batch["context_start"], batch["context_end"], batch["cls_index"])

    def _log_epoch_metrics(self, stage: str) -> None:
        candidates = self.metrics[stage].compute()
        self.metrics[stage].reset()
        datamodule = self.data
        windows, examples = datamodule.references("validation" if stage == "val" else "test")
        answers = best_answers(
            candidates, windows, examples, id_column=datamodule.id_column, context_column=datamodule.context_column,
            n_best_size=self.n_best_size, max_answer_length=self.max_answer_length,
            version_2=self.version_2_with_negative, null_score_diff_threshold=self.null_score_diff_threshold,
        )
        self.predictions[stage] = {qid: spans[0]["text"] for qid, spans in answers.items()}
        # Score the questions this evaluation saw (all of them, unless limit_val_batches cut the split short).
        seen = sorted(set(candidates[EXAMPLE_INDEX].tolist())) if answers else []
        rows = examples.select(seen).select_columns([datamodule.id_column, datamodule.answers_column])
        references = {str(r[datamodule.id_column]): r[datamodule.answers_column]["text"] for r in rows}
        scores = squad_scores(self.predictions[stage], references, self.version_2_with_negative)
        self.log_dict({f"{stage}/{name}": value for name, value in scores.items()}, prog_bar=stage == "val")
