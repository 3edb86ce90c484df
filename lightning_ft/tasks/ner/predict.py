"""Prediction: tags and entities for pre-split words or raw text (CoNLL files in and out)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_ft.data.base import LONG_INPUTS
from lightning_ft.errors import UserError
from lightning_ft.metrics.entity import get_entities
from lightning_ft.tasks.ner.data import require_fast_tokenizer
from lightning_ft.tasks.ner.model import tag_sentences
from lightning_ft.tasks.spec import column_option, option


def split_words(tokenizer: Any, text: str) -> list[tuple[str, tuple[int, int]]]:
    """Raw text as words with character offsets, split by the tokenizer's own pre-tokenizer (as ``pipeline`` sees
    them: BERT splits on spaces and punctuation)."""
    require_fast_tokenizer(tokenizer)
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    spans = [span for _, span in pre.pre_tokenize_str(text)] if pre else [m.span() for m in re.finditer(r"\S+", text)]
    words = []
    for start, end in spans:  # byte-level pre-tokenizers include the leading space in a word's offsets
        while start < end and text[start].isspace():
            start += 1
        if start < end:
            words.append((text[start:end], (start, end)))
    return words


# ---- predicting files (python -m lightning_ft.predict) -------------------------------------------------------------
def _entities(words: Sequence[str], tags: Sequence[str], offsets: Sequence[tuple[int, int]] | None, text: str | None):
    out = []
    for type_, first, last in get_entities(tags):
        if offsets is not None and text is not None:
            start, end = offsets[first][0], offsets[last][1]
            out.append({"type": type_, "text": text[start:end], "start": start, "end": end})
        else:  # word indices, end exclusive
            out.append({"type": type_, "text": " ".join(words[first:last + 1]), "start": first, "end": last + 1})
    return out


def read_conll_rows(source: Path) -> list[dict[str, Any]]:
    """The sentences of a CoNLL column file as rows: ``tokens`` (the first column) and ``columns`` (the others, per
    token, e.g. gold tags), which ``conll_lines`` writes back with the predicted tag appended."""
    from lightning_ft.data.conll import iter_sentences

    return [{"tokens": [f[0] for _, f in sentence], "columns": [f[1:] for _, f in sentence]}
            for sentence in iter_sentences(source)]


def conll_lines(row: dict[str, Any]) -> str:
    """A tagged row as CoNLL lines (token, kept columns, predicted tag) and the blank line that ends a sentence, so
    conlleval can read the result."""
    words, tags = row["tokens"], row["tags"]
    columns = row.get("columns") or [[] for _ in words]
    return "".join("\t".join([w, *c, t]) + "\n" for w, c, t in zip(words, columns, tags)) + "\n"


def _tokens(value: Any) -> list[str] | None:
    if isinstance(value, str):  # a csv/tsv cell: a JSON list, or words split on spaces
        value = json.loads(value) if value.startswith("[") else value.split()
    return [str(t) for t in value] if isinstance(value, list) else None


@dataclass
class TagOptions:
    """The options of ``python -m lightning_ft.predict`` for a token classifier."""

    column: str | None = column_option(None, help="the raw-text column (default: text)")
    tokens_column: str | None = column_option(None, help="the column of pre-split words (default: tokens)")
    max_length: int = option(512, "sub-tokens seen of each sentence (of each window, with long_inputs=window); words "
                                  "beyond are tagged O")
    long_inputs: str = option("truncate", "truncate: words beyond max_length are tagged O; window: a long sentence "
                                          "is read in overlapping windows (the model's training setting when it "
                                          "was trained so)")
    stride: int = option(32, "long_inputs=window: sub-tokens shared by neighbouring windows")


def check_rows(rows: list[dict], source: Path, tokenizer: Any, *, column: str | None, tokens_column: str | None,
               max_length: int = 512, long_inputs: str = "truncate", stride: int = 32, **_: Any) -> None:
    """Every row needs pre-split words (``tokens``) or raw text (``text``), and the tokenizer must be a fast one."""
    require_fast_tokenizer(tokenizer)
    if long_inputs not in LONG_INPUTS:
        raise UserError(f"long_inputs={long_inputs} is not one of {', '.join(LONG_INPUTS)}.")
    room = min(max_length, tokenizer.model_max_length) - tokenizer.num_special_tokens_to_add()
    if long_inputs == "window" and not 0 <= stride < room:
        raise UserError(f"stride={stride} leaves no new sub-tokens in a window of {max_length} ({room} after the "
                        f"special tokens): give a stride below {room}.")
    tokens_key, text_key = tokens_column or "tokens", column or "text"
    for number, row in enumerate(rows, start=1):
        try:
            has_tokens = tokens_key in row and _tokens(row[tokens_key]) is not None
        except json.JSONDecodeError:
            has_tokens = False
        if not has_tokens and not isinstance(row.get(text_key), str):
            raise UserError(f"row {number} of {source} needs a '{tokens_key}' list or a '{text_key}' string (name "
                            "other columns with tokens_column= or column=).")


@torch.no_grad()
def predict_rows(model: Any, tokenizer: Any, rows: list[dict], *, column: str | None, tokens_column: str | None,
                 max_length: int, long_inputs: str = "truncate", stride: int = 32, stats: Any = None) -> list[dict]:
    """Tags and entities for each row: its ``tokens`` list (pre-split words; entity ``start``/``end`` are word
    indices, end exclusive) or else its ``text`` (split into words as the tokenizer splits them; entity
    ``start``/``end`` are character offsets). Words beyond ``max_length`` sub-tokens are tagged ``O`` (counted in
    ``stats["words_cut"]``), unless ``long_inputs=window`` reads them in overlapping windows."""
    records = [_words_of(tokenizer, row, tokens_column or "tokens", column or "text") for row in rows]
    tags, lost = tag_sentences(model, tokenizer, [r["tokens"] for r in records], len(rows) or 1,
                               min(max_length, tokenizer.model_max_length),
                               stride=stride if long_inputs == "window" else None)
    if stats is not None:
        stats["words"] += sum(len(r["tokens"]) for r in records)
        stats["words_cut"] += lost
    return [{"tokens": r["tokens"], "tags": t, "entities": _entities(r["tokens"], t, r.get("offsets"), r.get("text"))}
            for r, t in zip(records, tags)]


def predict_report(stats: Any, settings: dict[str, Any], option: Any) -> tuple[str, list[str]]:
    """The word count for the summary line, and a warning when ``max_length`` cut words off."""
    warnings = []
    if stats["words_cut"]:
        name = option("max_length")
        warnings.append(f"{stats['words_cut']} words were beyond {name}={settings.get('max_length', 512)} sub-tokens "
                        f"and are tagged 'O': raise {name}.")
    return f" ({stats['words']} words)", warnings


def _words_of(tokenizer: Any, row: dict[str, Any], tokens_key: str, text_key: str) -> dict[str, Any]:
    tokens = _tokens(row[tokens_key]) if tokens_key in row else None
    if tokens is not None:
        return {"tokens": tokens}
    text = str(row[text_key]).rstrip("\r\n")
    words = split_words(tokenizer, text)
    return {"tokens": [w for w, _ in words], "offsets": [span for _, span in words], "text": text}
