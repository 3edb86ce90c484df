"""A reader for CoNLL-style column files: one token per line, blank lines between sentences, ``-DOCSTART-`` lines
between documents (CoNLL-2003, WNUT-17, most NER/POS/chunking corpora).

Our own rather than the ``conll`` builder that ``datasets`` ships since 5.0 (``load_dataset("conll", ...)``, and what
``.conll``/``.conllu`` files load with; the 3.x and 4.x that pyproject allows have none): that one pads or cuts each
line to its ``column_names`` (by default the token alone) without a word (a shifted tag column trains silently on
garbage) and cannot say which file and line is wrong; this one refuses such a line by file and line, and records
where each sentence starts for later errors.
"""

from __future__ import annotations

from pathlib import Path

from lightning_ft.data.base import open_text
from lightning_ft.errors import UserError

# CoNLL-2003's four columns, named as the Hugging Face `conll2003` dataset names them.
CONLL2003_COLUMNS = ["tokens", "pos_tags", "chunk_tags", "ner_tags"]


def default_columns(count: int) -> list[str]:
    """Column names for a file with ``count`` columns: token + NER tag, or CoNLL-2003's token/POS/chunk/NER."""
    if count == 2:
        return ["tokens", "ner_tags"]
    if count == 4:
        return list(CONLL2003_COLUMNS)
    return ["tokens", *[f"column_{i}" for i in range(1, count - 1)], "ner_tags"]


def _split(line: str) -> list[str]:
    # Tab-separated when the line has a tab (WNUT-17), else space-separated (CoNLL-2003).
    return line.split("\t") if "\t" in line else line.split()


def iter_sentences(path: str | Path):
    """Yield the sentences of a column file as lists of ``(line number, fields)``; ``-DOCSTART-`` lines and blank
    (or whitespace-only) lines end a sentence. Gzip files (``.gz``) are read transparently."""
    path = Path(path)
    current: list[tuple[int, list[str]]] = []
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            fields = _split(line.strip()) if line.strip() else []
            if not fields or fields[0] == "-DOCSTART-":
                if current:
                    yield current
                current = []
                continue
            current.append((number, fields))
    if current:
        yield current


def read_conll(path: str | Path, columns: list[str] | None = None) -> dict[str, list]:
    """The sentences of ``path`` as columns of lists (``tokens``, ``ner_tags``...) plus ``location``
    (``file:line`` of each sentence's first token, for error messages).

    Every non-blank line must have the same number of columns (``len(columns)`` when given); a wrong line raises a
    ``UserError`` naming the file and line.
    """
    rows: dict[str, list] = {}
    for sentence in iter_sentences(path):
        for number, fields in sentence:
            if columns is None:
                if len(fields) < 2:
                    raise UserError(
                        f"{path}:{number} has one column ({' '.join(fields)!r}): a CoNLL file needs a token and at "
                        "least one tag per line, separated by a space or a tab."
                    )
                columns = default_columns(len(fields))
            if len(fields) != len(columns):
                raise UserError(
                    f"{path}:{number} has {len(fields)} columns ({' '.join(fields)!r}) where the file has "
                    f"{len(columns)} ({' '.join(columns)}): fix that line, or set dataset.columns to this file's "
                    "column names."
                )
        for i, name in enumerate(columns):
            rows.setdefault(name, []).append([fields[i] for _, fields in sentence])
        rows.setdefault("location", []).append(f"{path}:{sentence[0][0]}")
    if not rows:
        raise UserError(f"{path} has no sentences: a CoNLL file has one 'token tag...' line per word.")
    return rows
