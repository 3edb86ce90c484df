"""Token classification (NER, POS, chunking): one tag per word, evaluated per entity span as seqeval does.

Words are aligned to sub-tokens with a fast tokenizer's ``word_ids``. The first sub-token of a word carries its tag;
with ``label_all_tokens`` the others carry it too (``B-X`` turned into ``I-X``), as in the Hugging Face example.
Predictions are read back at the first sub-token of every word. Words that ``max_length`` cut off (or that the
tokenizer turns into nothing) are predicted ``O`` and still count at evaluation, and a warning says how many."""

from __future__ import annotations

from transformers import AutoModelForTokenClassification

from lightning_ft.tasks.ner.data import TokenClassificationData
from lightning_ft.tasks.ner.model import TokenClassificationTask
from lightning_ft.tasks.ner.predict import (
    TagOptions,
    check_rows,
    conll_lines,
    predict_report,
    predict_rows,
    read_conll_rows,
)
from lightning_ft.tasks.spec import Prediction, TaskSpec

SPEC = TaskSpec(
    name="ner",
    aliases=("token_classification",),
    module=TokenClassificationTask,
    data=TokenClassificationData,
    auto_class=AutoModelForTokenClassification,
    architectures=("ForTokenClassification",),
    pipeline="token-classification",
    prediction=Prediction(
        title="token classification (task=ner)", rows=predict_rows, options=TagOptions, noun="sentences",
        verb="tag", past="tagged", check=check_rows, report=predict_report, readers={"conll": read_conll_rows},
        writers={"conll": conll_lines}, any_suffix="conll",
    ),
)
