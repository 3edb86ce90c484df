"""``transformers.pipeline`` for every task's export: importing this module registers the pipelines that lightning_ft's
tasks declare where transformers has none (transformers 5.3 removed "question-answering", "translation" and
"summarization"; huggingface/transformers#43325).

    import lightning_ft.pipelines  # noqa: F401
    pipeline("question-answering", model="<run dir>/hf_model")
"""

from __future__ import annotations

from lightning_ft import tasks


def register() -> None:
    """Register each task's own pipeline (``TaskSpec.register_pipeline``); registering twice is harmless."""
    for spec in tasks.specs():
        if spec.register_pipeline is not None:
            spec.register_pipeline()


register()
