"""Prediction: an embedding per text, from an exported directory or a checkpoint (SentenceEncoder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModel

from lightning_ft.backbones import resolve_name
from lightning_ft.data.base import iter_jsonl
from lightning_ft.errors import UserError
from lightning_ft.tasks.similarity.model import pool, pooling_of
from lightning_ft.tasks.spec import column_option


# ---- using an exported model ---------------------------------------------------------------------------------------
class SentenceEncoder:
    """Embeds texts with an exported bi-encoder (or any sentence-transformers directory) without
    sentence-transformers: the Hugging Face model plus the pooling and normalisation saved beside it."""

    def __init__(self, model: Any, tokenizer: Any, pooling: str, normalize: bool, max_length: int) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length

    @classmethod
    def from_directory(cls, name: str | Path) -> SentenceEncoder:
        """From an exported directory, a run directory, or a sentence-transformers directory or hub name."""
        from lightning_ft.backbones import load_tokenizer

        root = Path(resolve_name(str(name)))
        if (root / "hf_model" / "config.json").is_file():  # a run directory
            root = root / "hf_model"
        modules = json.loads((root / "modules.json").read_text()) if (root / "modules.json").is_file() else []
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        settings = root / "sentence_bert_config.json"
        max_length = json.loads(settings.read_text()).get("max_seq_length") if settings.is_file() else None
        tokenizer = load_tokenizer(str(root))
        return cls(AutoModel.from_pretrained(root), tokenizer, pooling_of(str(root)) or "mean", normalize,
                   int(max_length or min(tokenizer.model_max_length, 512)))

    def to(self, device: str | torch.device) -> SentenceEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """One embedding per text (rows in input order); texts are batched by length to save padding."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        device = self.model.device
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(device)
            hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            pooled = pool(hidden, enc["attention_mask"], self.pooling)
            out[rows] = (F.normalize(pooled, dim=-1) if self.normalize else pooled).float().cpu()
        return out


def read_texts(source: Path, column: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """Texts to embed and their rows: ``.txt`` (a text a line), ``.jsonl``, ``.csv`` or ``.tsv`` (``column``, by
    default ``text`` or ``sentence``)."""
    import csv

    suffix = source.suffix.lower()
    if suffix == ".txt":
        rows = [{"text": line.rstrip("\r\n")} for line in source.open(encoding="utf-8") if line.strip()]
    elif suffix in {".jsonl", ".json"}:
        rows = []
        for number, row in iter_jsonl(source):
            if not isinstance(row, dict):
                raise UserError(f"{source}:{number} is not a JSON object: write one object a line.")
            rows.append(row)
    elif suffix in {".csv", ".tsv"}:
        with source.open(encoding="utf-8", newline="") as handle:
            delimiter = "\t" if suffix == ".tsv" else ","
            rows = list(csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t"
                                       else csv.QUOTE_MINIMAL))
    else:
        raise UserError(f"input '{source}' has an unknown extension '{suffix}': use .txt, .jsonl, .csv or .tsv.")
    if not rows:
        raise UserError(f"{source} has no texts.")
    keys = list(rows[0])
    column = column or next((k for k in ("text", "sentence", "sentence1") if k in keys), None)
    if column is None or column not in keys:
        raise UserError(
            f"{source} has no text column {('' if column is None else repr(column) + ' ')}(it has: {', '.join(keys)})"
            ": name it with --column."
        )
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get(column), str):
            raise UserError(f"row {number} of {source} has no text in '{column}'.")
    return [row[column] for row in rows], rows


@dataclass
class EmbedOptions:
    """The options of ``python -m lightning_ft.predict`` for a sentence-embedding model."""

    column: str = column_option("text", "sentence", "sentence1", help="the text column")


def predict_rows(model: SentenceEncoder, tokenizer: Any, rows: list[dict], *, column: str) -> list[dict]:
    """The ``embedding`` (a list of floats; unit length when the model normalises) of each row's ``column`` text.
    ``model`` is a ``SentenceEncoder`` (its own tokenizer, pooling and normalisation)."""
    vectors = model.encode([str(row[column]) for row in rows], batch_size=max(len(rows), 1))
    return [{"embedding": vector} for vector in vectors.tolist()]
