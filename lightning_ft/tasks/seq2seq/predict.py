"""Prediction: generated text for each source, with the settings the model was exported with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_ft.tasks.spec import column_option, option


@dataclass
class GenerateOptions:
    """The options of ``python -m lightning_ft.predict`` for an encoder-decoder."""

    column: str = column_option("source", "text", "document", help="the source-text column")
    max_new_tokens: int | None = option(None, "tokens generated at most (default: the model's generation config)")
    num_beams: int | None = option(None, "beam width (default: the model's generation config)")


@torch.no_grad()
def predict_rows(model: Any, tokenizer: Any, rows: list[dict], *, column: str, max_new_tokens: int | None,
                 num_beams: int | None) -> list[dict]:
    """The text generated from each row's ``column`` (a list of sentences is joined, as training joined it), as the
    translation/summarization pipeline of ``lightning_ft.seq2seq_pipeline`` generates it: the model config's
    ``prefix`` (the training ``source_prefix``) first, cut at the tokenizer's ``model_max_length`` (the training
    ``max_source_length``), generated with the model's generation config (the task's ``num_beams``,
    ``max_new_tokens``...) unless ``max_new_tokens``/``num_beams`` are given."""
    prefix = getattr(model.config, "prefix", None) or ""
    sources = [" ".join(map(str, v)) if isinstance(v, list) else str(v) for v in (row[column] for row in rows)]
    encoding = tokenizer([prefix + source for source in sources], truncation=True, padding=True, return_tensors="pt")
    settings = {k: v for k, v in {"max_new_tokens": max_new_tokens, "num_beams": num_beams}.items() if v is not None}
    generated = model.generate(input_ids=encoding["input_ids"].to(model.device),
                               attention_mask=encoding["attention_mask"].to(model.device), **settings)
    return [{"generated_text": text.strip()}
            for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
