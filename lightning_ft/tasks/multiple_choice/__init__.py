"""Multiple choice: pick one of N answers (SWAG, OpenBookQA, ARC...), as the Hugging Face ``run_swag`` example does.

Each choice is encoded with the question (and the context, if any) as one sequence pair, and the model scores the
N pairs of an example against each other (``AutoModelForMultipleChoice``). Two data layouts work:

- SWAG style: ``context_column: sent1``, ``question_column: sent2``, ``ending_columns: [ending0, ...]`` and an
  integer ``label``; the pair is (context, question + " " + ending).
- A question with a list of choices, e.g. OpenBookQA's ``question.stem``, ``question.choices`` (dicts with
  ``text`` and ``label``) and ``answerKey`` "A".."D"; the pair is (question, choice). Column names may be dotted
  paths into nested fields.

The answer (``label_column``) may be the choice's index, its label (``A``..) or its text."""

from __future__ import annotations

from transformers import AutoModelForMultipleChoice

from lightning_ft.tasks.multiple_choice.data import MultipleChoiceData
from lightning_ft.tasks.multiple_choice.model import MultipleChoiceTask
from lightning_ft.tasks.multiple_choice.predict import ChooseOptions, check_rows, predict_rows
from lightning_ft.tasks.spec import Prediction, TaskSpec

SPEC = TaskSpec(
    name="multiple_choice",
    module=MultipleChoiceTask,
    data=MultipleChoiceData,
    auto_class=AutoModelForMultipleChoice,
    architectures=("ForMultipleChoice",),
    prediction=Prediction(
        title="multiple choice (task=multiple_choice)", rows=predict_rows, options=ChooseOptions,
        noun="questions", verb="answer", past="answered", check=check_rows,
    ),
)
