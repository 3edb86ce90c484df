"""Prediction: the best answer span of each question's context, with its score and character offsets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_ft.metrics.squad import SpanCandidates
from lightning_ft.tasks.qa.data import EXAMPLE_INDEX, tokenize_windows
from lightning_ft.tasks.qa.model import best_answers
from lightning_ft.tasks.spec import column_option, option


@dataclass
class AnswerOptions:
    """The options of ``python -m lightning_ft.predict`` for an extractive QA model."""

    question_column: str = column_option("question", help="the question column")
    context_column: str = column_option("context", help="the context column")
    max_length: int = option(384, "tokens of a window (question and context)")
    doc_stride: int = option(128, "context tokens shared by consecutive windows")
    max_answer_length: int = option(30, "the longest answer, in tokens")
    n_best_size: int = option(20, "start/end candidates kept per window")
    handle_impossible_answer: bool = option(False, "SQuAD v2.0: allow no answer")
    null_score_diff_threshold: float = option(0.0, "v2.0: answer nothing when no-answer beats the best span by more")


def scored_answers(spans: list[dict]) -> list[dict]:
    """``best_answers``' spans of one question as answers: text, character span, and ``score``, the span's
    probability among the n-best (a softmax over their start + end logits)."""
    import math

    top = max(s["score"] for s in spans)
    total = sum(math.exp(s["score"] - top) for s in spans)
    return [{"answer": s["text"], "score": math.exp(s["score"] - top) / total, "start": s["start"], "end": s["end"]}
            for s in spans]


@torch.no_grad()
def predict_rows(model: Any, tokenizer: Any, rows: list[dict], *, question_column: str, context_column: str,
                 max_length: int, doc_stride: int, max_answer_length: int, n_best_size: int,
                 handle_impossible_answer: bool, null_score_diff_threshold: float) -> list[dict]:
    """The best answer to each row's question in its context: ``answer`` (the text, ``context[start:end]``), its
    probability ``score`` and character ``start``/``end``. Long contexts are read in overlapping windows and
    post-processed as at evaluation (``tokenize_windows``, ``SpanCandidates``, ``best_answers``).
    ``handle_impossible_answer`` (SQuAD v2.0 models): the empty answer (start -1) wins by the null-score rule."""
    import datasets

    questions = [str(row[question_column]).lstrip() for row in rows]
    contexts = [str(row[context_column]) for row in rows]
    encoding, windows = tokenize_windows(tokenizer, questions, contexts, max_length, min(doc_stride, max_length // 2))
    names = [k for k in encoding if k in ("input_ids", "attention_mask", "token_type_ids")]
    inputs = tokenizer.pad({k: encoding[k] for k in names}, return_tensors="pt").to(model.device)
    outputs = model(**inputs)
    column = {k: torch.tensor([w[k] for w in windows]) for k in ("sample", "window", "context_start", "context_end",
                                                                 "cls_index")}
    collector = SpanCandidates(top_k=n_best_size)
    collector.update(column["sample"], column["window"], outputs.start_logits.cpu(), outputs.end_logits.cpu(),
                     column["context_start"], column["context_end"], column["cls_index"])
    answers = best_answers(
        collector.compute(),
        datasets.Dataset.from_list([{**w, EXAMPLE_INDEX: w["sample"], "offset_mapping": o}
                                    for w, o in zip(windows, encoding["offset_mapping"])]),
        datasets.Dataset.from_list([{"id": str(i), "context": c} for i, c in enumerate(contexts)]),
        n_best_size=n_best_size, max_answer_length=max_answer_length, version_2=handle_impossible_answer,
        null_score_diff_threshold=null_score_diff_threshold,
    )
    return [scored_answers(answers[str(i)])[0] for i in range(len(rows))]
