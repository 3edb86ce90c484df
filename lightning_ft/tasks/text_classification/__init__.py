"""Text classification: single-label, multi-label and regression, over single sentences or sentence pairs.

The problem type comes from the data unless given: a list label is multi-label, a non-integer number is
regression (one output, MSE), anything else is single-label. The label set and its order come from the
training split (or ``label_names``) and travel with the model as ``id2label``."""

from __future__ import annotations

from transformers import AutoModelForSequenceClassification

from lightning_ft.tasks.spec import Prediction, TaskSpec
from lightning_ft.tasks.text_classification.data import TextClassificationData
from lightning_ft.tasks.text_classification.model import TextClassificationTask
from lightning_ft.tasks.text_classification.predict import ClassifyOptions, predict_rows

SPEC = TaskSpec(
    name="text_classification",
    module=TextClassificationTask,
    data=TextClassificationData,
    auto_class=AutoModelForSequenceClassification,
    architectures=("ForSequenceClassification",),
    pipeline="text-classification",
    prediction=Prediction(
        title="text classification (task=text_classification)", rows=predict_rows, options=ClassifyOptions,
        noun="texts", verb="classify", past="classified",
    ),
)
