"""Predictions for files with a trained model: ``python -m lightning_ft.predict MODEL INPUT OUTPUT``.

MODEL is an exported Hugging Face directory (a run's ``hf_model``) or the run directory itself. The task comes from
the model's architecture. Sentence-embedding models (task=similarity, or any sentence-transformers directory) read
texts (``.txt`` a line each, or a column of ``.jsonl``/``.csv``/``.tsv``) and write ``.npy`` or ``.jsonl`` embeddings.
Token classification reads raw text (``.txt``: a sentence a line), CoNLL column files
(``.conll``, ``.iob``, ``.bio``, ``.tsv``...) or jsonl (``tokens`` or ``text``), and writes jsonl (with entities) or
CoNLL columns (token, input columns, predicted tag).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lightning_ft.errors import UserError

log = logging.getLogger("lightning_ft")
_JSONL = {".jsonl", ".json"}


def _formats(source: Path, target: Path, input_format: str, output_format: str) -> tuple[str, str]:
    if input_format == "auto":
        suffix = source.suffix.lower()
        input_format = "jsonl" if suffix in _JSONL else "text" if suffix == ".txt" else "conll"
    if output_format == "auto":
        output_format = "jsonl" if target.suffix.lower() in _JSONL else "conll"
    return input_format, output_format


def exported_model(model_dir: str | Path) -> tuple[str, Path]:
    """What an exported directory (or ``<run dir>/hf_model``, or a sentence-transformers model) holds, and where:
    ``token_classification`` or ``embedding``."""
    from transformers import AutoConfig

    from lightning_ft.backbones import resolve_name

    path = Path(resolve_name(str(model_dir)))
    if (path / "hf_model" / "config.json").is_file():
        path = path / "hf_model"
    if not (path / "config.json").is_file():
        raise UserError(
            f"'{model_dir}' is not an exported model (no config.json in it or in its hf_model/): give a run's hf_model "
            "directory, or the run directory."
        )
    architectures = AutoConfig.from_pretrained(path).architectures or []
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return "token_classification", path
    if (path / "modules.json").is_file():
        return "embedding", path
    raise UserError(
        f"'{path}' holds a {', '.join(architectures) or 'model of unknown architecture'}; predict handles token "
        "classification (task=ner) and sentence-embedding (task=similarity) models so far."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_ft.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="exported Hugging Face directory or run directory")
    parser.add_argument("input", help="file to tag")
    parser.add_argument("output", help="file to write (.jsonl for jsonl, anything else for CoNLL columns)")
    parser.add_argument("--input-format", choices=["auto", "text", "conll", "jsonl"], default="auto")
    parser.add_argument("--output-format", choices=["auto", "jsonl", "conll"], default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512, help="sub-tokens per sentence; words beyond are 'O'")
    parser.add_argument("--column", help="embedding models: the text column of a jsonl/csv/tsv input (default: text)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        source, target = Path(args.input), Path(args.output)
        if not source.is_file():
            raise UserError(f"input '{args.input}' does not exist (resolved to {source.resolve()}): fix the path.")
        kind, model_dir = exported_model(args.model)
        if kind == "embedding":
            from lightning_ft.tasks.similarity import SentenceEncoder, embed_file

            count = embed_file(SentenceEncoder.from_directory(model_dir), source, target, args.column, args.batch_size)
            log.info("embedded %d texts from %s into %s", count, source, target)
            return 0
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        from lightning_ft.tasks.ner import predict_file

        model = AutoModelForTokenClassification.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        input_format, output_format = _formats(source, target, args.input_format, args.output_format)
        counts = predict_file(model, tokenizer, source, target, input_format, output_format,
                              args.batch_size, args.max_length)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("tagged %d sentences (%d words) from %s (%s) into %s (%s)", counts["sentences"], counts["words"],
             source, input_format, target, output_format)
    if counts["words_cut"]:
        log.warning("%d words were beyond --max-length=%d sub-tokens and are tagged 'O': raise --max-length.",
                    counts["words_cut"], args.max_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
