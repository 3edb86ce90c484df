"""Predictions for a file with a trained model of any task, from its exported directory or a Lightning checkpoint.

    python -m lightning_ft.predict model_dir=<run dir or hf_model> input=rows.jsonl output=predictions.jsonl
    python -m lightning_ft.predict ckpt_path=<run dir>/checkpoints/last.ckpt input=rows.csv output=predictions.csv
    python -m lightning_ft.predict MODEL INPUT OUTPUT [--batch-size 32] [--column text] ...   (the same, positionally)

The task comes from the model: the exported config's architecture (...ForSequenceClassification and so on, a
sentence-transformers ``modules.json``) or the task a lightning_ft checkpoint records. Input: ``.jsonl`` (or
``.json``), ``.csv``, ``.tsv``, or ``.txt`` (a row a line, as ``text``); token classification also reads CoNLL column
files. Output: ``.jsonl`` or ``.csv`` (``.npy`` for embeddings, CoNLL columns for token classification); every row is
the input row (ids and all) plus the prediction's fields, written to ``<output>.tmp`` and renamed into place, so a
failure never leaves a partial file or touches an existing one.

Options, as ``key=value`` or ``--key value``: ``batch_size`` (32), ``task`` (the task the model must be: refuses a
model of another), ``device`` (auto: a GPU when there is one), ``input_format``/``output_format`` (by suffix), and each
task's own, the keyword arguments of its ``predict_rows`` function (in ``lightning_ft/tasks/<task>.py``): the column
options (``column``, ``pair_column``, ``question_column``...) and settings such as ``max_new_tokens``. A column
option left unset takes the first of its usual names the input has (the task module's ``PREDICT_COLUMNS``).
"""

from __future__ import annotations

import csv
import difflib
import importlib
import inspect
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ft.errors import UserError

log = logging.getLogger("lightning_ft")


@dataclass(frozen=True)
class Kind:
    """What predicting a kind of model takes: its task module's function (and optional column defaults, row check
    and report), the transformers class that loads an exported directory, and the words its messages use."""

    title: str  # "text classification (task=text_classification)"
    module: str
    auto_class: str | None  # None: a sentence-embedding directory, loaded by SentenceEncoder
    noun: str  # "texts", in "has no texts to classify" and "classified 3 texts"
    verb: str
    past: str
    function: str = "predict_rows"
    columns: str = "PREDICT_COLUMNS"
    check: str | None = None  # check_rows(rows, source, tokenizer, **settings), before the model loads
    report: str | None = None  # predict_report(stats, settings, option) -> (summary suffix, warnings)

    def attribute(self, name: str | None) -> Any:
        return getattr(importlib.import_module(self.module), name, None) if name else None


TASKS = "lightning_ft.tasks."
KINDS = {
    "text_classification": Kind("text classification (task=text_classification)", TASKS + "text_classification",
                                "AutoModelForSequenceClassification", "texts", "classify", "classified"),
    "token_classification": Kind("token classification (task=ner)", TASKS + "ner", "AutoModelForTokenClassification",
                                 "sentences", "tag", "tagged", check="check_rows", report="predict_report"),
    "question_answering": Kind("extractive question answering (task=qa)", TASKS + "qa",
                               "AutoModelForQuestionAnswering", "questions", "answer", "answered"),
    "multiple_choice": Kind("multiple choice (task=multiple_choice)", TASKS + "multiple_choice",
                            "AutoModelForMultipleChoice", "questions", "answer", "answered", check="check_rows"),
    "seq2seq": Kind("sequence-to-sequence generation (task=translation or task=summarization)", TASKS + "seq2seq",
                    "AutoModelForSeq2SeqLM", "texts", "generate from", "generated text for"),
    "causal_lm": Kind("causal language modelling (task=clm)", TASKS + "language_modeling", "AutoModelForCausalLM",
                      "prompts", "continue", "continued", function="predict_continuations",
                      columns="CLM_PREDICT_COLUMNS"),
    "masked_lm": Kind("masked language modelling (task=mlm)", TASKS + "language_modeling", "AutoModelForMaskedLM",
                      "texts", "fill", "filled", function="predict_masks", columns="MLM_PREDICT_COLUMNS",
                      check="check_masked_rows"),
    "embedding": Kind("sentence embedding (task=similarity)", TASKS + "similarity", None, "texts", "embed",
                      "embedded"),
}
# task= names (the training task names, and the kinds' own) -> kind
TASK_NAMES = {"text_classification": "text_classification", "ner": "token_classification", "qa": "question_answering",
              "multiple_choice": "multiple_choice", "translation": "seq2seq", "summarization": "seq2seq",
              "clm": "causal_lm", "mlm": "masked_lm", "similarity": "embedding", **{k: k for k in KINDS}}
# The TaskModule class a checkpoint names -> kind (LanguageModelingTask: by its objective)
MODULE_KINDS = {"TextClassificationTask": "text_classification", "TokenClassificationTask": "token_classification",
                "QuestionAnsweringTask": "question_answering", "MultipleChoiceTask": "multiple_choice",
                "Seq2SeqTask": "seq2seq", "TranslationTask": "seq2seq", "SummarizationTask": "seq2seq",
                "SimilarityTask": "embedding"}
GLOBAL_OPTIONS = {"model_dir": None, "ckpt_path": None, "input": None, "output": None, "batch_size": 32,
                  "task": None, "device": "auto", "input_format": "auto", "output_format": "auto"}
INPUT_FORMATS = {".txt": "text", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
OUTPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".npy": "npy"}
_RESERVED = {"model", "tokenizer", "rows", "stats"}  # predict_rows parameters that are not options


# ---- the command line ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[dict[str, str], bool]:
    """The options as raw strings, and whether they came as ``--flags`` (the positional form) or ``key=value``.
    Positionals are MODEL (a directory, or a ``.ckpt`` file), INPUT and OUTPUT."""
    options: dict[str, str] = {}
    positionals: list[str] = []
    flags = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--") and len(arg) > 2:
            flags = True
            key, _, value = arg[2:].partition("=")
            if not _:
                if not args:
                    raise UserError(f"option {arg} needs a value: {arg} <value>.")
                value = args.pop(0)
            _set(options, key.replace("-", "_"), value, arg)
        elif "=" in arg and arg.split("=", 1)[0].isidentifier():
            key, value = arg.split("=", 1)
            _set(options, key, value, arg)
        else:
            positionals.append(arg)
    if len(positionals) > 3:
        raise UserError(f"too many arguments ({' '.join(positionals[3:])}): give MODEL INPUT OUTPUT, or model_dir= "
                        "(or ckpt_path=), input= and output=.")
    for name, value in zip(("model", "input", "output"), positionals):
        if name == "model":
            name = "ckpt_path" if value.endswith(".ckpt") and not Path(value).is_dir() else "model_dir"
        _set(options, name, value, value)
    return options, flags


def _set(options: dict[str, str], key: str, value: str, given: str) -> None:
    if key in options:
        raise UserError(f"'{key}' is given twice (again as '{given}'): give it once.")
    options[key] = value


def _option(name: str, flags: bool) -> str:
    """How the user writes option ``name`` in the form they used."""
    return "--" + name.replace("_", "-") if flags else name


def _given(name: str, value: str, flags: bool) -> str:
    """Option ``name`` with ``value``, as the user writes it."""
    return f"{_option(name, flags)} {value}" if flags else f"{name}={value}"


def _task_parameters(kind: Kind) -> dict[str, inspect.Parameter]:
    function = kind.attribute(kind.function)
    return {name: p for name, p in inspect.signature(function).parameters.items()
            if p.kind == p.KEYWORD_ONLY and name not in _RESERVED}


def _all_option_names() -> list[str]:
    names = list(GLOBAL_OPTIONS)
    for kind in KINDS.values():
        names += [n for n in _task_parameters(kind) if n not in names]
    return names


def check_option_names(options: dict[str, str], flags: bool) -> None:
    """A key no task knows is a typo: say so, with the closest known key, before anything loads."""
    known = _all_option_names()
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {_option(close[0], flags)}?)" if close else ""
            raise UserError(f"unknown option '{_option(key, flags)}'{hint}: the options are "
                            f"{', '.join(_option(k, flags) for k in known)}.")


def _coerce(name: str, raw: str, default: Any, annotation: Any, flags: bool) -> Any:
    text = str(annotation)
    try:
        if isinstance(default, bool) or text.startswith("bool"):
            if raw.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError
            return raw.lower() in {"true", "1", "yes"}
        if raw.lower() in {"null", "none"} and (default is None or "None" in text):
            return None
        if isinstance(default, int) or text.startswith("int"):
            return int(raw)
        if isinstance(default, float) or text.startswith("float"):
            return float(raw)
        if "list" in text:  # [a,b], ["a", "b"] or a,b
            items = json.loads(raw) if raw.startswith("[") and '"' in raw else raw.strip("[]").split(",")
            return [str(item).strip() for item in items if str(item).strip()]
    except (ValueError, json.JSONDecodeError):
        wanted = "true or false" if isinstance(default, bool) else "a list such as [a,b]" if "list" in text else \
            f"a number ({text.split(' ')[0]})"
        raise UserError(f"{_given(name, repr(raw), flags)} is not {wanted}.") from None
    return raw


def task_settings(kind: Kind, options: dict[str, str], flags: bool) -> dict[str, Any]:
    """The options of ``kind``'s prediction function that the user gave, typed; an option of another task is an
    error naming this task's options."""
    parameters = _task_parameters(kind)
    settings = {}
    for key, raw in options.items():
        if key in GLOBAL_OPTIONS:
            continue
        if key not in parameters:
            raise UserError(f"{_option(key, flags)} is not an option of a {kind.title} model: its options are "
                            f"{', '.join(_option(k, flags) for k in [*GLOBAL_OPTIONS, *parameters])}.")
        settings[key] = _coerce(key, raw, parameters[key].default, parameters[key].annotation, flags)
    return settings


# ---- paths -------------------------------------------------------------------------------------------------------
def check_input(value: str | None, flags: bool) -> Path:
    if not value:
        raise UserError(f"no input file: give {'INPUT' if flags else 'input=<file>'} (.jsonl, .csv, .tsv or .txt).")
    source = Path(value)
    if not source.is_file():
        raise UserError(f"input '{value}' does not exist (resolved to {source.resolve()}): fix the path.")
    return source


def check_output(value: str | None, flags: bool) -> Path:
    """The output path, checked writable by creating (and removing) ``<output>.tmp`` beside it."""
    if not value:
        raise UserError(f"no output file: give {'OUTPUT' if flags else 'output=<file>'} (.jsonl or .csv).")
    target = Path(value)
    if target.is_dir():
        raise UserError(f"output '{value}' is a directory: give a file path inside it, e.g. "
                        f"{target / 'predictions.jsonl'}.")
    folder = target.parent
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise UserError(f"output '{value}' cannot be written: its directory '{folder}' {what} (resolved to "
                        f"{folder.resolve()}): create it first, or give another output path.")
    probe = _temporary(target)
    try:
        probe.open("x").close()
    except FileExistsError:
        pass  # left by a killed run: it is overwritten at the end
    except OSError as err:
        raise UserError(f"output '{value}' cannot be written ({err.strerror or type(err).__name__} in '{folder}'): "
                        "give a path in a directory you can write to.") from err
    else:
        probe.unlink()
    return target


def _temporary(target: Path) -> Path:
    return target.with_name(target.name + ".tmp")


def formats(kind_name: str, source: Path, target: Path, input_format: str, output_format: str) -> tuple[str, str]:
    """Input and output formats: given, or by suffix. Token classification reads and writes CoNLL columns for any
    suffix the tables do not name (``.conll``, ``.iob``, ``.tsv``...)."""
    tagging = kind_name == "token_classification"
    if input_format == "auto":
        suffix = source.suffix.lower()
        if tagging:
            input_format = INPUT_FORMATS.get(suffix, "conll") if suffix != ".tsv" else "conll"
        elif suffix in INPUT_FORMATS:
            input_format = INPUT_FORMATS[suffix]
        else:
            raise UserError(f"input '{source}' has an unknown extension '{suffix}': use .jsonl, .csv, .tsv or .txt "
                            "(or give input_format=).")
    if output_format == "auto":
        suffix = target.suffix.lower()
        if tagging:
            output_format = OUTPUT_FORMATS.get(suffix, "conll") if suffix not in (".tsv", ".npy") else "conll"
        elif suffix in OUTPUT_FORMATS:
            output_format = OUTPUT_FORMATS[suffix]
        else:
            raise UserError(f"output '{target}' has an unknown extension '{suffix}': use .jsonl or .csv"
                            f"{' (or .npy)' if kind_name == 'embedding' else ''}.")
    known_in = {"text", "jsonl", "csv", "tsv"} | ({"conll"} if tagging else set())
    known_out = {"jsonl", "csv", "tsv"} | ({"conll"} if tagging else set()) | ({"npy"} if kind_name == "embedding"
                                                                               else set())
    if input_format not in known_in:
        raise UserError(f"input_format '{input_format}' is not one of {', '.join(sorted(known_in))} for this model.")
    if output_format not in known_out:
        raise UserError(f"output_format '{output_format}' is not one of {', '.join(sorted(known_out))} for this "
                        "model (.npy: embeddings only; CoNLL: token classification only).")
    return input_format, output_format


# ---- reading -------------------------------------------------------------------------------------------------------
def read_rows(source: Path, input_format: str, kind: Kind) -> list[dict[str, Any]]:
    """Every row of the input as a dict: ``text`` for a line of a ``.txt`` file (blank lines skipped)."""
    from lightning_ft.data.base import iter_jsonl

    if input_format == "text":
        with source.open(encoding="utf-8") as handle:
            rows = [{"text": line.rstrip("\r\n")} for line in handle if line.strip()]
    elif input_format == "jsonl":
        if _first_character(source) == "[":  # a JSON array of objects
            try:
                values = list(enumerate(json.loads(source.read_text(encoding="utf-8")), start=1))
            except json.JSONDecodeError as err:
                raise UserError(f"{source} is not JSON ({err.msg} at line {err.lineno}).") from err
        else:
            values = list(iter_jsonl(source))
        rows = []
        for number, row in values:
            if not isinstance(row, dict):
                raise UserError(f"{source}:{number} is not a JSON object: write one object a line.")
            rows.append(row)
    elif input_format in ("csv", "tsv"):
        with source.open(encoding="utf-8", newline="") as handle:
            tab = input_format == "tsv"
            rows = list(csv.DictReader(handle, delimiter="\t" if tab else ",",
                                       quoting=csv.QUOTE_NONE if tab else csv.QUOTE_MINIMAL))
    else:
        from lightning_ft.tasks.ner import read_conll_rows

        rows = read_conll_rows(source)
    if not rows:
        raise UserError(f"{source} has no {kind.noun} to {kind.verb}.")
    return rows


def _first_character(source: Path) -> str:
    with source.open(encoding="utf-8") as handle:
        while chunk := handle.read(4096):
            if chunk.strip():
                return chunk.strip()[0]
    return ""


def resolve_columns(kind: Kind, rows: list[dict], settings: dict[str, Any], source: Path, flags: bool) -> None:
    """Fill in the column options the user left unset (the first of the task's usual names that the input has) and
    check that every row has a value in each column used, before any model loads. A trailing None among a column's
    usual names makes it optional."""
    present = list(dict.fromkeys(key for row in rows for key in row))
    defaults = kind.attribute(kind.columns) or {}
    for name, parameter in _task_parameters(kind).items():
        if not name.endswith(("column", "columns")):
            continue
        role = name.removesuffix("s").removesuffix("column").rstrip("_").replace("_", " ") or "text"
        if name in settings:
            wanted = [c for c in (settings[name] if isinstance(settings[name], list) else [settings[name]]) if c]
            for column in wanted:
                if column.split(".")[0] not in present:
                    raise UserError(f"input '{source}' has no {role} column '{column}' (it has: {', '.join(present)})"
                                    f": name one of those with {_given(name, '<column>', flags)}.")
        else:
            candidates = defaults.get(name, (parameter.default,))
            found = next((c for c in candidates if c and c.split(".")[0] in present), None)
            if found is None and candidates[-1] is not None:
                looked = " or ".join(f"'{c}'" for c in candidates)
                raise UserError(f"input '{source}' has no {role} column ({looked}; it has: {', '.join(present)}): "
                                f"name the {role} column with {_given(name, '<column>', flags)}.")
            settings[name] = found
            wanted = [found] if found else []
        for column in wanted:
            for number, row in enumerate(rows, start=1):
                if _field(row, column) is None:
                    raise UserError(f"row {number} of {source} has no value in column '{column}': fill it in or drop "
                                    "the row.")


def _field(row: dict, path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# ---- models --------------------------------------------------------------------------------------------------------
def kind_of_config(config: Any, path: Path) -> str | None:
    """The kind of model an exported config describes (None: no head predict knows)."""
    architectures = config.architectures or []
    ends = {"ForSequenceClassification": "text_classification", "ForTokenClassification": "token_classification",
            "ForQuestionAnswering": "question_answering", "ForMultipleChoice": "multiple_choice",
            "ForMaskedLM": "masked_lm", "ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm"}
    for architecture in architectures:
        for end, kind in ends.items():
            if architecture.endswith(end) and not (end == "LMHeadModel" and getattr(config, "is_encoder_decoder", 0)):
                return kind
        if architecture.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
            return "seq2seq"
    if (path / "modules.json").is_file():
        return "embedding"
    return None


def exported_model(model_dir: str | Path) -> tuple[str, Path]:
    """What an exported directory (or ``<run dir>/hf_model``, or a sentence-transformers model) holds, and where:
    one of ``KINDS`` (``token_classification``, ``embedding``...)."""
    from transformers import AutoConfig

    from lightning_ft.backbones import resolve_name

    path = Path(resolve_name(str(model_dir)))
    if (path / "hf_model" / "config.json").is_file():
        path = path / "hf_model"
    if not (path / "config.json").is_file():
        saved = sorted(path.glob("checkpoints/*.ckpt")) if path.is_dir() else []
        hint = f", or ckpt_path={saved[-1]} for its checkpoint" if saved else ", or the run directory"
        raise UserError(f"'{model_dir}' is not an exported model (no config.json in it or in its hf_model/): give a "
                        f"run's hf_model directory{hint}.")
    config = AutoConfig.from_pretrained(path)
    kind = kind_of_config(config, path)
    if kind is None:
        handled = "; ".join(k.title for k in KINDS.values())
        raise UserError(f"'{path}' holds a {', '.join(config.architectures or []) or 'model of unknown architecture'}"
                        f", which has no task head predict knows: it handles {handled}.")
    return kind, path


def load_exported(kind_name: str, path: Path, tokenizer: Any) -> Any:
    """The model of an exported directory (a ``SentenceEncoder`` for embeddings), in eval mode."""
    import transformers

    kind = KINDS[kind_name]
    if kind.auto_class is None:
        from lightning_ft.tasks.similarity import SentenceEncoder

        return SentenceEncoder.from_directory(path)
    return getattr(transformers, kind.auto_class).from_pretrained(path).eval()


def read_checkpoint(value: str) -> dict[str, Any]:
    """A lightning_ft checkpoint's contents (tensors memory-mapped), or a UserError saying what the file is not."""
    from lightning_ft import lifecycle

    checkpoint = lifecycle.read_checkpoint(value)
    if not isinstance(checkpoint.get("lightning_ft"), dict) or not checkpoint["lightning_ft"].get("task"):
        raise UserError(f"ckpt_path '{value}' was not written by a lightning_ft run (it does not record its task): "
                        "give a checkpoint of a lightning_ft run, or model_dir= with an exported model.")
    return checkpoint


def kind_of_checkpoint(checkpoint: dict[str, Any], value: str) -> str:
    task = checkpoint["lightning_ft"]["task"]
    name = task.rsplit(".", 1)[-1]
    if name == "LanguageModelingTask":
        objective = (checkpoint.get("hyper_parameters") or {}).get("objective", "clm")
        return "causal_lm" if objective == "clm" else "masked_lm"
    if name not in MODULE_KINDS:
        raise UserError(f"ckpt_path '{value}' holds a {name}, a task predict does not know: it handles "
                        f"{', '.join(MODULE_KINDS)} and LanguageModelingTask.")
    return MODULE_KINDS[name]


def checkpoint_backbone(checkpoint: dict[str, Any], value: str) -> dict[str, Any]:
    """The backbone settings the checkpoint's module was built with; a tokenizer trained for the run (in
    ``<run dir>/tokenizer``) is looked for beside the checkpoint when its saved path is gone (a moved run directory,
    or one named relative to another working directory)."""
    backbone = dict((checkpoint.get("hyper_parameters") or {}).get("backbone")
                    or checkpoint["lightning_ft"].get("backbone") or {})
    folder = backbone.get("tokenizer")
    if folder and not Path(folder).is_dir() and Path(folder).name == "tokenizer":
        beside = Path(value).resolve().parent.parent / "tokenizer"
        if not beside.is_dir():
            raise UserError(f"the checkpoint's model was built for the tokenizer in '{folder}', which no longer "
                            f"exists (nor does {beside}): restore that folder (its run directory's tokenizer/).")
        backbone["tokenizer"] = str(beside)
    return backbone


def load_checkpoint(checkpoint: dict[str, Any], value: str, tokenizer: Any) -> Any:
    """Rebuild the checkpoint's task module from its saved arguments (the backbone included) and load its weights;
    return what the task's prediction function takes: the model in eval mode (a ``SentenceEncoder`` for
    embeddings)."""
    from lightning_ft.tasks.base import TaskModule

    written = checkpoint["lightning_ft"]
    module_name, _, class_name = written["task"].rpartition(".")
    try:
        task_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"ckpt_path '{value}' was written by {written['task']}, which this lightning_ft does not "
                        "have: predict with the lightning_ft version that trained it.") from err
    if not (isinstance(task_class, type) and issubclass(task_class, TaskModule)):
        raise UserError(f"ckpt_path '{value}' names {written['task']}, which is not a lightning_ft task.")
    backbone = checkpoint_backbone(checkpoint, value)
    module = task_class(**{**(checkpoint.get("hyper_parameters") or {}), "backbone": backbone})
    _check_fits(module, checkpoint["state_dict"], value, backbone)
    module.load_state_dict(checkpoint["state_dict"])
    model = module.model.eval()
    if hasattr(module, "max_source_length"):  # seq2seq: sources cut where training cut them, as the export does
        tokenizer.model_max_length = module.max_source_length
    if class_name == "SimilarityTask":
        from lightning_ft.tasks.similarity import SentenceEncoder

        return SentenceEncoder(model, tokenizer, module.pooling, module.normalize, module.max_seq_length)
    return model


def _check_fits(module: Any, found: dict[str, Any], value: str, backbone: dict[str, Any]) -> None:
    from lightning_ft.lifecycle import weights_that_do_not_fit

    detail = weights_that_do_not_fit(module.state_dict(), found)
    if detail:
        built = backbone.get("name") or backbone.get("model_type")
        raise UserError(f"ckpt_path '{value}' does not fit the model its backbone '{built}' builds now: {detail}. The "
                        "backbone was changed or replaced since training: restore it, or predict with the run's "
                        "exported model (model_dir=<run dir>).")


# ---- predicting and writing ----------------------------------------------------------------------------------------
def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True))


def predict(kind: Kind, model: Any, tokenizer: Any, rows: list[dict], batch_size: int, settings: dict[str, Any],
            stats: Counter):
    """``(row, prediction fields)`` for every row, a batch at a time."""
    import torch

    function = kind.attribute(kind.function)
    extra = {"stats": stats} if "stats" in inspect.signature(function).parameters else {}
    progress = _progress()
    with progress, torch.inference_mode():
        bar = progress.add_task("predicting", total=len(rows))
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            yield from zip(batch, function(model, tokenizer, batch, **settings, **extra))
            progress.advance(bar, len(batch))


def merged(pairs: list[tuple[dict, dict]]) -> tuple[list[dict], list[str]]:
    """Each input row with its prediction's fields. A field the input has too, with another value in some row (a
    gold ``label``, say), keeps the input's value, and the prediction goes in ``predicted_<field>`` in every row;
    a field the input has with the same values (token classification's ``tokens``) is written once."""
    clashes = sorted({k for row, prediction in pairs for k, v in prediction.items() if k in row and row[k] != v})
    rows = [{**row, **{(f"predicted_{k}" if k in clashes else k): v for k, v in prediction.items()}}
            for row, prediction in pairs]
    return rows, clashes


def write(results, target: Path, output_format: str, columns: list[str]) -> int:
    """Write the rows to ``<target>.tmp`` and rename it to ``target``: all or nothing. Returns the row count."""
    temporary = _temporary(target)
    count = 0
    try:
        if output_format == "npy":
            import numpy as np

            vectors = []
            for row in results:
                vectors.append(row["embedding"])
                count += 1
            with temporary.open("wb") as handle:
                np.save(handle, np.asarray(vectors, dtype=np.float32))
        else:
            with temporary.open("w", encoding="utf-8", newline="") as handle:
                writer = None
                for row in results:
                    count += 1
                    if output_format == "jsonl":
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                    elif output_format == "conll":
                        from lightning_ft.tasks.ner import conll_lines

                        handle.write(conll_lines(row))
                    else:
                        if writer is None:  # the input's columns, then the prediction's (of the first row)
                            names = columns + [k for k in row if k not in columns]
                            tab = output_format == "tsv"
                            writer = csv.DictWriter(handle, names, delimiter="\t" if tab else ",",
                                                    extrasaction="ignore")
                            writer.writeheader()
                        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                                         for k, v in row.items()})
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return count


# ---- the entry point -----------------------------------------------------------------------------------------------
def run(options: dict[str, str], flags: bool) -> None:
    check_option_names(options, flags)
    if options.get("model_dir") and options.get("ckpt_path"):
        raise UserError("give model_dir= or ckpt_path=, not both.")
    if not options.get("model_dir") and not options.get("ckpt_path"):
        raise UserError("no model: give model_dir=<run dir or exported hf_model> or ckpt_path=<file.ckpt> "
                        "(or MODEL INPUT OUTPUT).")
    source = check_input(options.get("input"), flags)
    target = check_output(options.get("output"), flags)
    try:
        batch_size = int(options.get("batch_size", GLOBAL_OPTIONS["batch_size"]))
        if batch_size < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"{_given('batch_size', repr(options['batch_size']), flags)} is not a positive number."
                        ) from None
    device = _device(options.get("device", GLOBAL_OPTIONS["device"]), flags)
    expected = options.get("task")
    if expected is not None and expected not in TASK_NAMES:
        raise UserError(f"task={expected} is not a task: use one of {', '.join(sorted(TASK_NAMES))}.")

    # What the model is, from its config or the checkpoint's record: no weights are loaded yet.
    if options.get("model_dir"):
        kind_name, where = exported_model(options["model_dir"])
        checkpoint = None
    else:
        where = options["ckpt_path"]
        checkpoint = read_checkpoint(where)
        kind_name = kind_of_checkpoint(checkpoint, where)
    kind = KINDS[kind_name]
    if expected is not None and TASK_NAMES[expected] != kind_name:
        raise UserError(f"'{where}' holds a {kind.title} model, not task={expected}: give a model of that task, or "
                        "leave task= out.")
    settings = task_settings(kind, options, flags)
    input_format, output_format = formats(kind_name, source, target, options.get("input_format", "auto"),
                                          options.get("output_format", "auto"))
    rows = read_rows(source, input_format, kind)
    resolve_columns(kind, rows, settings, source, flags)

    from lightning_ft.backbones import load_tokenizer

    tokenizer = load_tokenizer(**checkpoint_backbone(checkpoint, where)) if checkpoint is not None else \
        load_tokenizer(str(where))
    check = kind.attribute(kind.check)
    if check is not None:  # what the rows need of the tokenizer (a mask token...), still before the model loads
        check(rows, source, tokenizer, **settings)
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, where, tokenizer)
    else:
        model = load_exported(kind_name, where, tokenizer)
    (model.model if kind_name == "embedding" else model).to(device)  # a SentenceEncoder holds its model

    stats: Counter = Counter()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    results, renamed = merged(list(predict(kind, model, tokenizer, rows, batch_size, settings, stats)))
    count = write(results, target, output_format, columns)
    report = kind.attribute(kind.report)
    suffix, warnings = report(stats, settings, lambda name: _option(name, flags)) if report else ("", [])
    log.info("%s %d %s%s from %s (%s) into %s (%s)", kind.past, count, kind.noun, suffix, source, input_format, target,
             output_format)
    if renamed:
        log.info("the input has %s columns of its own: the predictions are in %s.", ", ".join(renamed),
                 ", ".join(f"predicted_{k}" for k in renamed))
    for warning in warnings:
        log.warning(warning)


def _device(device: str, flags: bool) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{_given('device', device, flags)} but torch sees no GPU: use device cpu (or auto).")
    if not device.startswith(("cuda", "cpu", "mps")):
        raise UserError(f"{_given('device', device, flags)} is not a device: use auto, cpu, cuda or cuda:<n>.")
    return device


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        options, flags = parse_args(argv)
        run(options, flags)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
