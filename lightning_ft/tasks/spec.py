"""What a task declares about itself, so that train, predict, search and the pipelines need no table of tasks.

Each task package's ``__init__.py`` exports one ``TaskSpec`` (two for a package that serves two config names, such as
seq2seq's translation and summarization); ``lightning_ft.tasks`` collects them into the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def column_option(*usual: str | None, help: str) -> Any:
    """A predict option naming an input column. Left unset, predict takes the first of the ``usual`` names that the
    input has; a trailing ``None`` makes the column optional."""
    return field(default=usual[0], metadata={"usual": usual, "help": help})


def option(default: Any, help: str) -> Any:
    """A predict option with its default and the sentence ``--help`` shows."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: tasks share a Prediction object
class Prediction:
    """How ``python -m lightning_ft.predict`` runs a task's model over rows.

    ``rows(model, tokenizer, batch, **options[, stats])`` returns one dict of prediction fields per row of the batch;
    ``options`` is a dataclass whose fields are the task's own predict options (their names, types, defaults and help:
    the command line is built from it). Tasks that predict alike (translation and summarization) share one.
    """

    title: str  # "text classification (task=text_classification)", in messages
    rows: Callable[..., list[dict]]
    options: type
    noun: str  # "texts", in "has no texts to classify" and "classified 3 texts"
    verb: str
    past: str
    check: Callable[..., None] | None = None  # check(rows, source, tokenizer, **options), before the model loads
    report: Callable[..., tuple[str, list[str]]] | None = None  # report(stats, options, spell) -> (suffix, warnings)
    readers: dict[str, Callable[[Path], list[dict]]] = field(default_factory=dict)  # input formats of its own
    writers: dict[str, Callable[[dict], str]] = field(default_factory=dict)  # output formats of its own: row -> text
    any_suffix: str | None = None  # the format of an input or output whose suffix no table names ("conll")
    matrix_field: str | None = None  # a field that can be written as one .npy matrix ("embedding")
    load_export: Callable[[Path], Any] | None = None  # an exported directory -> what ``rows`` takes
    from_module: Callable[[Any, Any], Any] | None = None  # (checkpoint's module, tokenizer) -> what ``rows`` takes

    def option_fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.options)}


@dataclass(frozen=True, eq=False)  # by identity: the registry hands out the one spec of each task
class TaskSpec:
    """One task: its config name, its classes, how an export of it is recognised and loaded, and how it predicts."""

    name: str  # task=<name>: the config file conf/task/<name>.yaml
    module: type  # the LightningModule (head, loss, metrics, export)
    data: type  # the DataModule
    aliases: tuple[str, ...] = ()  # other names users type (predict's task=token_classification...)
    auto_class: Any = None  # the transformers class an export loads with (None: ``Prediction.load_export``)
    architectures: tuple[str, ...] = ()  # endings of an exported config's architectures (ForTokenClassification)
    encoder_decoder: bool | None = None  # an export must (True) or must not (False) be an encoder-decoder
    export_file: str | None = None  # a file that marks an export of this task (sentence-transformers modules.json)
    chat: bool = False  # of the tasks an export's architecture fits, this one where its tokenizer has a chat template
    hparams: dict[str, Any] = field(default_factory=dict)  # saved hyper-parameters telling a checkpoint apart (clm/mlm)
    pipeline: str | None = None  # the transformers pipeline task that loads the export
    register_pipeline: Callable[[], None] | None = None  # registers lightning_ft's pipeline where transformers has none
    prediction: Prediction | None = None

    def matches_architecture(self, config: Any) -> bool:
        """Whether an exported transformers config describes a model with this task's head."""
        if not self.architectures:
            return False
        if self.encoder_decoder is not None and bool(getattr(config, "is_encoder_decoder", False)) != \
                self.encoder_decoder:
            return False
        return any(a.endswith(self.architectures) for a in config.architectures or [])

    def matches_checkpoint(self, class_name: str, hparams: dict[str, Any]) -> bool:
        """Whether a checkpoint whose module class is ``class_name`` (its last dotted part, so checkpoints written
        before the task packages, ``lightning_ft.tasks.ner.TokenClassificationTask``, match too) is this task's."""
        if class_name != self.module.__name__:
            return False
        return all(hparams.get(key) == value for key, value in self.hparams.items())
