"""``python -m lightning_ft.search MODEL QUERY [QUERY ...]``: semantic search with a sentence-embedding model (the
similarity task's tool, in ``lightning_ft/tasks/similarity/search.py``)."""

import sys

from lightning_ft.tasks.similarity.search import main, nearest, sample_corpus

__all__ = ["main", "nearest", "sample_corpus"]

if __name__ == "__main__":
    sys.exit(main())
