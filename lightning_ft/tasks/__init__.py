"""The task registry: one package per task (``data.py``, ``model.py``, ``predict.py``), each declaring a ``TaskSpec``.

Adding a task: write its package and its configs (``conf/task/<name>.yaml``, ``conf/dataset/sample_<name>.yaml``),
then add its spec to ``SPECS`` below. Nothing else in lightning_ft names a task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_ft.errors import UserError
from lightning_ft.tasks.spec import Prediction, TaskSpec


def _specs() -> list[TaskSpec]:
    from lightning_ft.tasks import (
        language_modeling,
        multiple_choice,
        ner,
        qa,
        seq2seq,
        sft,
        similarity,
        text_classification,
    )

    return [
        text_classification.SPEC,
        ner.SPEC,
        qa.SPEC,
        multiple_choice.SPEC,
        seq2seq.TRANSLATION,
        seq2seq.SUMMARIZATION,
        language_modeling.CLM,
        language_modeling.MLM,
        sft.SPEC,
        similarity.SPEC,
    ]


_REGISTRY: list[TaskSpec] = []


def specs() -> list[TaskSpec]:
    """Every task's spec, in registry order (imported on first use: the task packages import torch)."""
    if not _REGISTRY:
        _REGISTRY.extend(_specs())
    return _REGISTRY


def names() -> list[str]:
    """Every name ``task=`` takes: the tasks' own and their aliases."""
    return [name for spec in specs() for name in (spec.name, *spec.aliases)]


def get(name: str) -> TaskSpec:
    """The task called ``name`` (or one of its aliases); a UserError listing the tasks for an unknown name."""
    for spec in specs():
        if name == spec.name or name in spec.aliases:
            return spec
    raise UserError(f"task={name} is not a task: use one of {', '.join(sorted(names()))}.")


def of_module(module: Any) -> TaskSpec:
    """The spec of a task module instance."""
    hparams = dict(getattr(module, "hparams", {}) or {})
    found = of_checkpoint_class(type(module).__name__, hparams)
    if found is None:
        raise UserError(f"{type(module).__name__} is not a registered lightning_ft task.")
    return found


def of_checkpoint_class(class_name: str, hparams: dict[str, Any]) -> TaskSpec | None:
    """The spec whose module class is ``class_name`` and whose telling hyper-parameters the checkpoint has."""
    return next((s for s in specs() if s.matches_checkpoint(class_name, hparams)), None)


def of_export(config: Any, path: Path, wanted: TaskSpec | None = None) -> TaskSpec | None:
    """The task an exported directory holds: ``wanted`` where the model fits it (a causal LM serves clm and sft), else
    as its ``lightning_ft.json`` names it, else by its config's architecture (where its tokenizer has a chat template, a
    task declared ``chat`` first: sft before clm), else by a file that marks it."""
    import json

    def read(name: str) -> dict:
        try:
            found = json.loads((path / name).read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    if wanted is not None and wanted.matches_architecture(config):
        return wanted
    named = read("lightning_ft.json").get("task")
    found = next((s for s in specs() if s.name == named), None)
    if found is not None and found.matches_architecture(config):
        return found
    fitting = [spec for spec in specs() if spec.matches_architecture(config)]
    if bool(read("tokenizer_config.json").get("chat_template")) or (path / "chat_template.jinja").is_file():
        fitting.sort(key=lambda spec: not spec.chat)  # a task for chat models first
    if fitting:
        return fitting[0]
    return next((s for s in specs() if s.export_file and (path / s.export_file).is_file()), None)


def predictions() -> list[Prediction]:
    """Every distinct way of predicting (tasks that predict alike share one)."""
    return list(dict.fromkeys(s.prediction for s in specs() if s.prediction is not None))


__all__ = ["Prediction", "TaskSpec", "get", "names", "of_checkpoint_class", "of_export", "of_module", "predictions",
           "specs"]
