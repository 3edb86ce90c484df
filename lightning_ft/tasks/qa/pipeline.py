"""``transformers.pipeline("question-answering")`` for exported QA models.

transformers 5.3 removed its question-answering pipeline (huggingface/transformers#43325). Importing
``lightning_ft.pipelines`` registers one under the same name, built on the task's own windowing and n-best post-
processing, so a pipeline gives the answers the trained module gives. (An exported QA directory is a plain
``AutoModelForQuestionAnswering`` one: transformers 4.x's own pipeline loads it too.) The model directory is not
given code to run (``custom_pipelines``): that would make every user pass ``trust_remote_code=True``.

Calls take ``question=`` and ``context=`` (or a dict, or a list of dicts) and return, like the old pipeline,
``{"answer", "score", "start", "end"}`` (a list of ``top_k`` of them when ``top_k > 1``); ``score`` is the span's
probability among the n-best spans.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForQuestionAnswering, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "question-answering"


class QuestionAnsweringPipeline(Pipeline):
    """Extractive QA over contexts of any length (overlapping windows), answers taken from character offsets."""

    _load_tokenizer = True

    def _sanitize_parameters(self, max_seq_len: int | None = None, doc_stride: int | None = None,
                             max_answer_len: int | None = None, n_best_size: int | None = None,
                             top_k: int | None = None, handle_impossible_answer: bool | None = None,
                             null_score_diff_threshold: float | None = None, **_: Any):
        pre = {k: v for k, v in {"max_seq_len": max_seq_len, "doc_stride": doc_stride}.items() if v is not None}
        post = {k: v for k, v in {"max_answer_len": max_answer_len, "n_best_size": n_best_size, "top_k": top_k,
                                  "handle_impossible_answer": handle_impossible_answer,
                                  "null_score_diff_threshold": null_score_diff_threshold}.items() if v is not None}
        return pre, {}, post

    def __call__(self, inputs: Any = None, *, question: str | None = None, context: str | None = None, **kwargs):
        if inputs is None:
            if question is None or context is None:
                raise ValueError("give question= and context= (or a dict with both, or a list of such dicts)")
            inputs = {"question": question, "context": context}
        return super().__call__(inputs, **kwargs)

    def preprocess(self, inputs: dict, max_seq_len: int = 384, doc_stride: int = 128) -> dict:
        from lightning_ft.tasks.qa.data import tokenize_windows

        question, context = inputs["question"].lstrip(), inputs["context"]
        doc_stride = min(doc_stride, max_seq_len // 2)
        encoding, windows = tokenize_windows(self.tokenizer, [question], [context], max_seq_len, doc_stride)
        names = [k for k in encoding if k in ("input_ids", "attention_mask", "token_type_ids")]
        model_inputs = self.tokenizer.pad({k: encoding[k] for k in names}, return_tensors="pt")
        return {"model_inputs": dict(model_inputs), "windows": windows, "offsets": encoding["offset_mapping"],
                "context": context}

    def _forward(self, inputs: dict) -> dict:
        outputs = self.model(**inputs["model_inputs"])
        return {**inputs, "start_logits": outputs.start_logits, "end_logits": outputs.end_logits}

    def postprocess(self, outputs: dict, max_answer_len: int = 30, n_best_size: int = 20, top_k: int = 1,
                    handle_impossible_answer: bool = False, null_score_diff_threshold: float = 0.0):
        import datasets
        import torch

        from lightning_ft.metrics.squad import SpanCandidates
        from lightning_ft.tasks.qa.data import EXAMPLE_INDEX
        from lightning_ft.tasks.qa.model import best_answers
        from lightning_ft.tasks.qa.predict import scored_answers

        windows = [{**w, EXAMPLE_INDEX: 0, "offset_mapping": o} for w, o in zip(outputs["windows"], outputs["offsets"])]
        column = {k: torch.tensor([w[k] for w in windows]) for k in ("window", "context_start", "context_end",
                                                                     "cls_index", EXAMPLE_INDEX)}
        collector = SpanCandidates(top_k=n_best_size)
        collector.update(column[EXAMPLE_INDEX], column["window"], outputs["start_logits"], outputs["end_logits"],
                         column["context_start"], column["context_end"], column["cls_index"])
        spans = best_answers(
            collector.compute(), datasets.Dataset.from_list(windows),
            datasets.Dataset.from_list([{"id": "0", "context": outputs["context"]}]),
            n_best_size=n_best_size, max_answer_length=max_answer_len, version_2=handle_impossible_answer,
            null_score_diff_threshold=null_score_diff_threshold,
        )["0"]
        answers = scored_answers(spans)[:top_k]
        return answers[0] if top_k == 1 else answers


def register() -> None:
    """Make ``transformers.pipeline("question-answering", ...)`` build ``QuestionAnsweringPipeline``."""
    from transformers import pipelines

    # transformers lists the name as removed (it points beginners to chat models) and refuses it before looking at
    # registered pipelines: take it off that list, for extractive models only this pipeline serves.
    getattr(pipelines, "REMOVED_TASKS", {}).pop(TASK, None)
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=QuestionAnsweringPipeline,
                                        pt_model=AutoModelForQuestionAnswering, type="text")

