"""Translation and summarization with encoder-decoder models (T5, BART, Marian, mBART), as the HF
``run_translation``/``run_summarization`` examples do them.

Data: parallel plain-text files (``train.de`` + ``train.en``, gz allowed), rows with ``source``/``target`` columns
(jsonl, csv...; a list source is joined, a list target gives several references, the first one trains), or the hub's
``translation: {de: ..., en: ...}`` layout. ``source_prefix`` is prepended (T5's "translate German to English: "),
sources and targets are cut to ``max_source_length``/``max_target_length`` (counted), label padding is ignored by the
loss, and rows with no target are left out (counted).

Evaluation generates (``predict_with_generate``) with the model's generation settings (``num_beams``,
``max_new_tokens``, ``length_penalty``, ``no_repeat_ngram_size``), which the export keeps, so a pipeline generates
what the module does. While training, only the first ``val_generate_limit`` validation rows generate (the loss
covers all of them); ``trainer.validate`` and ``test`` generate the whole split. Scores are corpus-level against the
raw reference texts (not decoded labels): sacreBLEU and chrF for translation, ROUGE-1/2/L/Lsum for summarization."""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForSeq2SeqLM

from lightning_ft.tasks.seq2seq.data import Seq2SeqData
from lightning_ft.tasks.seq2seq.model import Seq2SeqTask, SummarizationTask, TranslationTask
from lightning_ft.tasks.seq2seq.predict import GenerateOptions, predict_rows
from lightning_ft.tasks.spec import Prediction, TaskSpec


def _register_pipelines() -> None:
    from lightning_ft.tasks.seq2seq.pipeline import register

    register()


def _checkpoint_model(module: Seq2SeqTask, tokenizer: Any) -> Any:
    tokenizer.model_max_length = module.max_source_length  # sources cut where training cut them, as the export does
    return module.model.eval()


# Translation and summarization predict alike: one way of predicting, shared by both specs.
GENERATE = Prediction(
    title="sequence-to-sequence generation (task=translation or task=summarization)", rows=predict_rows,
    options=GenerateOptions, noun="texts", verb="generate from", past="generated text for",
    from_module=_checkpoint_model,
)
_EXPORT = {"data": Seq2SeqData, "auto_class": AutoModelForSeq2SeqLM, "architectures": ("ForConditionalGeneration",),
           "encoder_decoder": True, "register_pipeline": _register_pipelines, "prediction": GENERATE}
TRANSLATION = TaskSpec(name="translation", aliases=("seq2seq",), module=TranslationTask, pipeline="translation",
                       **_EXPORT)
SUMMARIZATION = TaskSpec(name="summarization", module=SummarizationTask, pipeline="summarization", **_EXPORT)
