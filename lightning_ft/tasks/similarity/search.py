"""Semantic search with a sentence-embedding model: ``python -m lightning_ft.search MODEL QUERY [QUERY ...]``.

Embeds a corpus of texts (``--corpus``: ``.txt`` a line each, or a column of ``.jsonl``/``.csv``/``.tsv``; by default
the sentences of the embedded STS-B sample) and prints each query's nearest texts by cosine similarity. MODEL is a
run directory, its ``hf_model``, or any sentence-transformers directory or name (e.g. the offline MiniLM).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lightning_ft.errors import UserError
from lightning_ft.paths import sample_dir

log = logging.getLogger("lightning_ft")


def sample_corpus() -> list[str]:
    """The distinct sentences of the embedded STS-B sample (both sides of every pair, all splits)."""
    from lightning_ft.tasks.similarity.predict import read_texts

    texts: dict[str, None] = {}
    for split in ("train", "validation", "test"):
        _, rows = read_texts(sample_dir("stsb") / f"{split}.tsv", "sentence1")
        texts.update(dict.fromkeys(text for row in rows for text in (row["sentence1"], row["sentence2"])))
    return list(texts)


def nearest(encoder, queries: list[str], corpus: list[str], top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each query, the ``top_k`` corpus texts of highest cosine similarity, best first."""
    import torch.nn.functional as F

    documents = F.normalize(encoder.encode(corpus), dim=-1)
    similarity = F.normalize(encoder.encode(queries), dim=-1) @ documents.T
    best = similarity.topk(min(top_k, len(corpus)), dim=1)
    return [[(corpus[i], float(s)) for s, i in zip(scores.tolist(), rows.tolist())]
            for scores, rows in zip(best.values, best.indices)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_ft.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run directory, exported hf_model, or sentence-transformers model")
    parser.add_argument("queries", nargs="+", help="texts to search for")
    parser.add_argument("--corpus", help="texts to search in (default: the embedded STS-B sample's sentences)")
    parser.add_argument("--column", help="the text column of a jsonl/csv/tsv corpus (default: text)")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from lightning_ft.predict import exported_model
        from lightning_ft.tasks.similarity import SPEC
        from lightning_ft.tasks.similarity.predict import SentenceEncoder, read_texts

        spec, model_dir = exported_model(args.model)
        if spec is not SPEC:
            raise UserError(f"'{args.model}' is a {spec.prediction.title} model: search needs a sentence-embedding "
                            "model (task=similarity, or a sentence-transformers directory).")
        if args.corpus:
            if not Path(args.corpus).is_file():
                raise UserError(f"--corpus '{args.corpus}' does not exist (resolved to {Path(args.corpus).resolve()}).")
            corpus = list(dict.fromkeys(read_texts(Path(args.corpus), args.column)[0]))
        else:
            corpus = sample_corpus()
        hits = nearest(SentenceEncoder.from_directory(model_dir), args.queries, corpus, args.top_k)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for query, found in zip(args.queries, hits):
        table = Table(title=f"nearest to: {query}  ({len(corpus)} texts)")
        table.add_column("cosine", justify="right")
        table.add_column("text")
        for text, score in found:
            table.add_row(f"{score:.3f}", text)
        console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
