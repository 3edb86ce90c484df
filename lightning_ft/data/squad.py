"""Reader for the SQuAD JSON format (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``).

The rows it makes are those of the Hugging Face ``squad``/``squad_v2`` datasets: ``id, title, context, question,
answers{text, answer_start}``; a v2.0 question marked ``is_impossible`` gets empty answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_ft.errors import UserError


def is_squad_json(path: Path) -> bool:
    """True for a ``.json`` file whose top level is an object with a ``data`` list (not JSON lines)."""
    if path.suffix.lower() != ".json":
        return False
    with path.open(encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith("{") and '"data"' in head and "\n{" not in head


def read_squad_json(path: Path) -> list[dict]:
    """One row per question of a SQuAD v1.1/v2.0 file."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}): fix or re-download it.") from err
    rows = []
    for article in document.get("data", []):
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            if context is None:
                raise UserError(f"{path}: a paragraph of article '{article.get('title')}' has no 'context'.")
            for qa in paragraph.get("qas", []):
                if "id" not in qa or "question" not in qa:
                    raise UserError(f"{path}: a question in article '{article.get('title')}' lacks 'id' or 'question'.")
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows.append({
                    "id": str(qa["id"]),
                    "title": article.get("title", ""),
                    "context": context,
                    "question": qa["question"],
                    "answers": {"text": [a["text"] for a in answers],
                                "answer_start": [int(a["answer_start"]) for a in answers]},
                })
    if not rows:
        raise UserError(f"{path} holds no questions: expected SQuAD JSON with data -> paragraphs -> qas.")
    return rows
