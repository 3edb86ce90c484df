"""Extractive question answering (SQuAD v1.1 and v2.0), as the Hugging Face ``run_qa`` example does it.

Preprocessing: question + context, the context cut into ``max_length`` windows that overlap by ``doc_stride``
tokens; each window is labelled with the answer's first and last token, or with the CLS token when the answer is not
wholly inside it (or the question has none). Evaluation keeps, per window, only the ``n_best_size`` best start and
end positions (``SpanCandidates``), never the full logits of the split. Post-processing joins the windows of each
question, scores spans by start + end logit (at most ``max_answer_length`` tokens, inside the context), takes the
text from the character offsets and, for v2.0, answers nothing when the no-answer score beats the best span by more
than ``null_score_diff_threshold``. Scores are the official SQuAD EM/F1 over the whole split."""

from __future__ import annotations

from transformers import AutoModelForQuestionAnswering

from lightning_ft.tasks.qa.data import QuestionAnsweringData
from lightning_ft.tasks.qa.model import QuestionAnsweringTask
from lightning_ft.tasks.qa.predict import AnswerOptions, predict_rows
from lightning_ft.tasks.spec import Prediction, TaskSpec


def _register_pipeline() -> None:
    from lightning_ft.tasks.qa.pipeline import register

    register()


SPEC = TaskSpec(
    name="qa",
    aliases=("question_answering",),
    module=QuestionAnsweringTask,
    data=QuestionAnsweringData,
    auto_class=AutoModelForQuestionAnswering,
    architectures=("ForQuestionAnswering",),
    pipeline="question-answering",
    register_pipeline=_register_pipeline,
    prediction=Prediction(
        title="extractive question answering (task=qa)", rows=predict_rows, options=AnswerOptions,
        noun="questions", verb="answer", past="answered",
    ),
)
