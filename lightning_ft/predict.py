"""Predictions for a file with a trained model of any task, from its exported directory or a Lightning checkpoint.

    python -m lightning_ft.predict model_dir=<run dir or hf_model> input=rows.jsonl output=predictions.jsonl
    python -m lightning_ft.predict ckpt_path=<run dir>/checkpoints/last.ckpt input=rows.csv output=predictions.csv
    python -m lightning_ft.predict MODEL INPUT OUTPUT [--batch-size 32] [--column text] ...   (the same, positionally)

The task comes from the model: the exported config's architecture (...ForSequenceClassification and so on, a
sentence-transformers ``modules.json``) or the task a lightning_ft checkpoint records. Input: ``.jsonl`` (or
``.json``), ``.csv``, ``.tsv``, or ``.txt`` (a row a line, as ``text``); token classification also reads CoNLL column
files. Input is UTF-8 (a byte-order mark is fine); a CSV/TSV row has as many fields as the header. Output: ``.jsonl``
or ``.csv`` (``.npy`` for embeddings, CoNLL columns for token classification); every row is the input row (ids and
all) plus the prediction's fields, written to a temporary file of this run's own in the output's directory and renamed
into place, so a failure never leaves a partial file or touches an existing one. An existing output is replaced only
with ``overwrite=true`` (``--overwrite``), and never when it is the input.

Options, as ``key=value`` or ``--key value``: ``overwrite`` (false; a bare ``--overwrite`` is true), ``batch_size``
(32), ``task`` (the task the model must be: refuses a model of another), ``device`` (auto: a GPU when there is one),
``input_format``/``output_format`` (by suffix), and each task's own, the fields of the options dataclass its
``Prediction`` declares (in ``lightning_ft/tasks/<task>/predict.py``): the column options (``column``,
``pair_column``, ``question_column``...) and settings such as ``max_new_tokens``. A column option left unset takes
the first of its usual names that the input has.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from lightning_ft import tasks
from lightning_ft.errors import UserError
from lightning_ft.tasks.spec import Prediction, TaskSpec

log = logging.getLogger("lightning_ft")


GLOBAL_OPTIONS = {"model_dir": None, "ckpt_path": None, "input": None, "output": None, "overwrite": False,
                  "batch_size": 32, "task": None, "device": "auto", "input_format": "auto", "output_format": "auto"}
BOOLEAN_WORDS = {"true", "false", "1", "0", "yes", "no"}
INPUT_FORMATS = {".txt": "text", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
OUTPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".npy": "npy"}


# ---- the command line ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[dict[str, str], bool]:
    """The options as raw strings, and whether they came as ``--flags`` (the positional form) or ``key=value``.
    Positionals are MODEL (a directory, or a ``.ckpt`` file), INPUT and OUTPUT. A boolean global option given as a
    bare flag (``--overwrite``, not followed by true/false) is true."""
    options: dict[str, str] = {}
    positionals: list[str] = []
    flags = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--") and len(arg) > 2:
            flags = True
            key, _, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not _:
                if isinstance(GLOBAL_OPTIONS.get(key), bool):
                    value = args.pop(0) if args and args[0].lower() in BOOLEAN_WORDS else "true"
                elif not args:
                    raise UserError(f"option {arg} needs a value: {arg} <value>.")
                else:
                    value = args.pop(0)
            _set(options, key, value, arg)
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


def _all_option_names() -> list[str]:
    names = list(GLOBAL_OPTIONS)
    for prediction in tasks.predictions():
        names += [n for n in prediction.option_fields() if n not in names]
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
            if raw.lower() not in BOOLEAN_WORDS:
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


def task_settings(prediction: Prediction, options: dict[str, str], flags: bool) -> dict[str, Any]:
    """The task's own options that the user gave, typed by the fields of its options dataclass; an option of another
    task is an error naming this task's options."""
    fields = prediction.option_fields()
    settings = {}
    for key, raw in options.items():
        if key in GLOBAL_OPTIONS:
            continue
        if key not in fields:
            raise UserError(f"{_option(key, flags)} is not an option of a {prediction.title} model: its options are "
                            f"{', '.join(_option(k, flags) for k in [*GLOBAL_OPTIONS, *fields])}.")
        settings[key] = _coerce(key, raw, fields[key].default, fields[key].type, flags)
    return settings


def complete_options(prediction: Prediction, settings: dict[str, Any]) -> dict[str, Any]:
    """Every option of the task: the given ones over the declared defaults (checked against the dataclass)."""
    return dataclasses.asdict(prediction.options(**settings))


# ---- paths -------------------------------------------------------------------------------------------------------
def check_input(value: str | None, flags: bool) -> Path:
    if not value:
        raise UserError(f"no input file: give {'INPUT' if flags else 'input=<file>'} (.jsonl, .csv, .tsv or .txt).")
    source = Path(value)
    if not source.is_file():
        raise UserError(f"input '{value}' does not exist (resolved to {source.resolve()}): fix the path.")
    return source


def check_output(value: str | None, flags: bool, source: Path | None = None) -> Path:
    """The output path: in a directory, not the input (``source``), and checked writable by creating (and removing)
    a temporary file of the kind ``write`` uses, in its directory."""
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
    if source is not None and _same_file(source, target):
        raise UserError(f"output '{value}' is the input file '{source}': give another output path (predict never "
                        "writes over its input, not even with overwrite).")
    try:
        descriptor, probe = _temporary(target)
    except OSError as err:
        raise UserError(f"output '{value}' cannot be written ({err.strerror or type(err).__name__} in '{folder}'): "
                        "give a path in a directory you can write to.") from err
    os.close(descriptor)
    os.unlink(probe)
    return target


def check_overwrite(target: Path, overwrite: bool, flags: bool) -> None:
    """An existing output is replaced only when the user said so. Checked once the input has been read and checked
    (so a bad input is said first) but before any model loads."""
    if (target.exists() or target.is_symlink()) and not overwrite:
        replace = "--overwrite" if flags else "overwrite=true"
        raise UserError(f"output '{target}' exists: give another output path, or {replace} to replace it.")


def _same_file(source: Path, target: Path) -> bool:
    """Whether ``target`` is ``source``: the same resolved path, or (both existing) the same file through a symlink or
    a hard link."""
    if source.resolve() == target.resolve():
        return True
    try:
        return target.exists() and os.path.samefile(source, target)
    except OSError:
        return False


def _temporary(target: Path) -> tuple[int, Path]:
    """A new file of this process's own beside ``target`` (``.<name>.<random>.tmp``), open as a descriptor: two
    predictions of the same output never write into one temporary file."""
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    return descriptor, Path(name)


def formats(prediction: Prediction, source: Path, target: Path, input_format: str, output_format: str
            ) -> tuple[str, str]:
    """Input and output formats: given, or by suffix. A task with a format of its own for unknown suffixes (token
    classification: CoNLL columns) reads and writes it for any suffix the tables do not name (``.conll``,
    ``.iob``, ``.tsv``...)."""
    own = prediction.any_suffix
    if input_format == "auto":
        suffix = source.suffix.lower()
        if own:
            input_format = INPUT_FORMATS.get(suffix, own) if suffix != ".tsv" else own
        elif suffix in INPUT_FORMATS:
            input_format = INPUT_FORMATS[suffix]
        else:
            raise UserError(f"input '{source}' has an unknown extension '{suffix}': use .jsonl, .csv, .tsv or .txt "
                            "(or give input_format=).")
    if output_format == "auto":
        suffix = target.suffix.lower()
        if own:
            output_format = OUTPUT_FORMATS.get(suffix, own) if suffix not in (".tsv", ".npy") else own
        elif suffix in OUTPUT_FORMATS:
            output_format = OUTPUT_FORMATS[suffix]
        else:
            raise UserError(f"output '{target}' has an unknown extension '{suffix}': use .jsonl or .csv"
                            f"{' (or .npy)' if prediction.matrix_field else ''}.")
    known_in = {"text", "jsonl", "csv", "tsv"} | set(prediction.readers)
    known_out = {"jsonl", "csv", "tsv"} | set(prediction.writers) | ({"npy"} if prediction.matrix_field else set())
    if input_format not in known_in:
        raise UserError(f"input_format '{input_format}' is not one of {', '.join(sorted(known_in))} for this model.")
    if output_format not in known_out:
        raise UserError(f"output_format '{output_format}' is not one of {', '.join(sorted(known_out))} for this "
                        "model (.npy: embeddings only; CoNLL: token classification only).")
    return input_format, output_format


# ---- reading -------------------------------------------------------------------------------------------------------
def read_rows(source: Path, input_format: str, prediction: Prediction) -> list[dict[str, Any]]:
    """Every row of the input as a dict: ``text`` for a line of a ``.txt`` file (blank lines skipped). The input is
    UTF-8, with or without a byte-order mark; a file in another encoding is refused naming the line."""
    from lightning_ft.data.base import iter_jsonl

    try:
        if input_format == "text":
            with source.open(encoding="utf-8-sig") as handle:
                rows = [{"text": line.rstrip("\r\n")} for line in handle if line.strip()]
        elif input_format == "jsonl":
            if _first_character(source) == "[":  # a JSON array of objects
                try:
                    values = list(enumerate(json.loads(source.read_text(encoding="utf-8-sig")), start=1))
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
            rows = read_table(source, tab=input_format == "tsv")
        else:
            rows = prediction.readers[input_format](source)
    except UnicodeDecodeError as err:
        raise _not_utf8(source, err) from None
    if not rows:
        raise UserError(f"{source} has no {prediction.noun} to {prediction.verb}.")
    return rows


def read_table(source: Path, tab: bool) -> list[dict[str, str]]:
    """The rows of a CSV (quoted values may hold commas, doubled quotes and line breaks) or TSV file (no quoting) as
    dicts by the header's names, blank lines skipped. A row with more or fewer fields than the header, or a quote
    left open, is refused naming the row (counted after the header, as every predict message counts them) and its
    line."""
    separator = "tab" if tab else "comma"
    with source.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if tab else ",",
                            quoting=csv.QUOTE_NONE if tab else csv.QUOTE_MINIMAL, strict=True)
        header, rows, number, line = None, [], 0, 1
        try:
            while True:
                line = reader.line_num + 1
                fields = next(reader, None)
                if fields is None:
                    break
                if not fields:  # a blank line
                    continue
                if header is None:
                    header = fields
                    continue
                number += 1
                if len(fields) != len(header):
                    lines = f"lines {line}-{reader.line_num}" if reader.line_num > line else f"line {line}"
                    if any("\n" in value or "\r" in value for value in fields):
                        raise UserError(f"row {number} of {source} ({lines}) has an unclosed quote that runs over "
                                        "line breaks into the next rows: close the quoted value (write a quote "
                                        'inside one as "").')
                    if len(fields) > len(header):
                        fix = ("remove the extra tabs" if tab else
                               'quote a value that holds a comma ("a, b"), or remove the extra commas')
                    else:
                        fix = f"add the missing ones (an empty value is still a {separator}), or drop the row"
                    raise UserError(f"row {number} of {source} ({lines}) has {len(fields)} fields but the header has "
                                    f"{len(header)}: {fix}.")
                rows.append(dict(zip(header, fields)))
        except csv.Error as err:
            which = f"row {number + 1} of {source}" if header is not None else f"the header of {source}"
            raise UserError(f"{which} (from line {line}) has an unclosed or stray quote ({err}): close the quoted "
                            'value, and write a quote inside one as "".') from None
    return rows


def _not_utf8(source: Path, err: UnicodeDecodeError) -> UserError:
    """The refusal of an input that is not UTF-8, naming the line and byte offset of its first byte that is not."""
    data = source.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as found:
        line = data.count(b"\n", 0, found.start) + 1
        where = f"line {line}, byte offset {found.start}: 0x{data[found.start]:02x}"
    else:  # decoded after all (a reader of its own format, say): what the reader said
        where = str(err)
    return UserError(f"input '{source}' is not UTF-8 ({where}): save it as UTF-8 (in a spreadsheet or editor: "
                     "Save As, encoding UTF-8).")


def _first_character(source: Path) -> str:
    with source.open(encoding="utf-8-sig") as handle:
        while chunk := handle.read(4096):
            if chunk.strip():
                return chunk.strip()[0]
    return ""


def resolve_columns(prediction: Prediction, rows: list[dict], settings: dict[str, Any], source: Path, flags: bool,
                    trained: dict[str, Any] | None = None) -> None:
    """Fill in the column options the user left unset and check that every row has a value in each column used,
    before any model loads. An unset column option takes the column the model was trained on (``trained``, saved
    with it) when the input has it, else the first of the task's usual names that the input has; a trailing None
    among a column's usual names makes it optional."""
    present = list(dict.fromkeys(key for row in rows for key in row))
    for name, declared in prediction.option_fields().items():
        if "usual" not in declared.metadata:  # not a column option: a setting the model was trained with, if saved
            if name not in settings and name in (trained or {}):
                settings[name] = trained[name]  # (text classification's long_inputs=window and its stride)
            continue
        role = name.removesuffix("s").removesuffix("column").rstrip("_").replace("_", " ") or "text"
        known = (trained or {}).get(name)
        if name not in settings and known and all(c.split(".")[0] in present for c in
                                                  (known if isinstance(known, list) else [known])):
            settings[name] = known  # the training data's column: checked below like a given one
        if name in settings:
            wanted = [c for c in (settings[name] if isinstance(settings[name], list) else [settings[name]]) if c]
            for column in wanted:
                if column.split(".")[0] not in present:
                    raise UserError(f"input '{source}' has no {role} column '{column}' (it has: {', '.join(present)})"
                                    f": name one of those with {_given(name, '<column>', flags)}.")
        else:
            candidates = declared.metadata["usual"]
            found = next((c for c in candidates if c and c.split(".")[0] in present), None)
            if found is None and candidates[-1] is not None:
                looked = " or ".join(f"'{c}'" for c in candidates)
                raise UserError(f"input '{source}' has no {role} column ({looked}; it has: {', '.join(present)}): "
                                f"name the {role} column with {_given(name, '<column>', flags)}.")
            settings[name] = found
            wanted = [found] if found else []
        for column in wanted:
            for number, row in enumerate(rows, start=1):
                if _value(row, column) is None:
                    raise UserError(f"row {number} of {source} has no value in column '{column}': fill it in or drop "
                                    "the row.")


COLUMNS_FILE = "lightning_ft.json"  # in an export: {"task": ..., "columns": the training data's column options}


def trained_columns(checkpoint: dict[str, Any] | None, where: Any) -> dict[str, Any]:
    """The column options of the data the model was trained on, as its checkpoint or export records them ({} for
    models written before lightning_ft saved them, or by something else)."""
    if checkpoint is not None:
        return dict((checkpoint.get("lightning_ft") or {}).get("columns") or {})
    saved = Path(where) / COLUMNS_FILE
    try:
        return dict(json.loads(saved.read_text()).get("columns") or {}) if saved.is_file() else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _value(row: dict, column: str) -> Any:
    from lightning_ft.data.base import dotted_field

    try:
        return dotted_field(row, column)
    except (KeyError, TypeError, IndexError):
        return None


# ---- models --------------------------------------------------------------------------------------------------------
def exported_model(model_dir: str | Path, wanted: TaskSpec | None = None) -> tuple[TaskSpec, Path]:
    """What an exported directory (or ``<run dir>/hf_model``, or a sentence-transformers model) holds, and where;
    ``wanted`` (predict's ``task=``) where the model serves more than one task (a causal LM: clm or sft)."""
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
    spec = tasks.of_export(config, path, wanted)
    if spec is None or spec.prediction is None:
        handled = "; ".join(p.title for p in tasks.predictions())
        raise UserError(f"'{path}' holds a {', '.join(config.architectures or []) or 'model of unknown architecture'}"
                        f", which has no task head predict knows: it handles {handled}.")
    return spec, path


def load_exported(spec: TaskSpec, path: Path) -> Any:
    """The model of an exported directory (what the task's ``rows`` function takes), in eval mode."""
    if spec.prediction.load_export is not None:
        return spec.prediction.load_export(path)
    return spec.auto_class.from_pretrained(path).eval()


def read_checkpoint(value: str) -> dict[str, Any]:
    """A lightning_ft checkpoint's contents (tensors memory-mapped), or a UserError saying what the file is not."""
    from lightning_ft import lifecycle

    checkpoint = lifecycle.read_checkpoint(value)
    if not isinstance(checkpoint.get("lightning_ft"), dict) or not checkpoint["lightning_ft"].get("task"):
        raise UserError(f"ckpt_path '{value}' was not written by a lightning_ft run (it does not record its task): "
                        "give a checkpoint of a lightning_ft run, or model_dir= with an exported model.")
    return checkpoint


def spec_of_checkpoint(checkpoint: dict[str, Any], value: str) -> TaskSpec:
    """The task a checkpoint's module belongs to (by its class name, so checkpoints written before the task
    packages match too)."""
    name = checkpoint["lightning_ft"]["task"].rsplit(".", 1)[-1]
    spec = tasks.of_checkpoint_class(name, checkpoint.get("hyper_parameters") or {})
    if spec is None or spec.prediction is None:
        known = ", ".join(dict.fromkeys(s.module.__name__ for s in tasks.specs()))
        raise UserError(f"ckpt_path '{value}' holds a {name}, a task predict does not know: it handles {known}.")
    return spec


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


def load_checkpoint(spec: TaskSpec, checkpoint: dict[str, Any], value: str, tokenizer: Any) -> Any:
    """Rebuild the checkpoint's task module from its saved arguments (the backbone included) and load its weights;
    return what the task's ``rows`` function takes: the model in eval mode, unless the task says otherwise."""
    backbone = checkpoint_backbone(checkpoint, value)
    module = spec.module(**{**(checkpoint.get("hyper_parameters") or {}), "backbone": backbone})
    _check_fits(module, checkpoint["state_dict"], value, backbone)
    module.load_state_dict(checkpoint["state_dict"])
    if spec.prediction.from_module is not None:
        return spec.prediction.from_module(module, tokenizer)
    return module.model.eval()


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


def predict(prediction: Prediction, model: Any, tokenizer: Any, rows: list[dict], batch_size: int,
            options: dict[str, Any], stats: Counter):
    """``(row, prediction fields)`` for every row, a batch at a time. A task that reports counts (its ``report``)
    gets ``stats`` to count into."""
    import torch

    function = prediction.rows
    extra = {"stats": stats} if prediction.report is not None else {}
    progress = _progress()
    with progress, torch.inference_mode():
        bar = progress.add_task("predicting", total=len(rows))
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            yield from zip(batch, function(model, tokenizer, batch, **options, **extra))
            progress.advance(bar, len(batch))


def merged(pairs: list[tuple[dict, dict]]) -> tuple[list[dict], list[str]]:
    """Each input row with its prediction's fields. A field the input has too, with another value in some row (a
    gold ``label``, say), keeps the input's value, and the prediction goes in ``predicted_<field>`` in every row;
    a field the input has with the same values (token classification's ``tokens``) is written once."""
    clashes = sorted({k for row, prediction in pairs for k, v in prediction.items() if k in row and row[k] != v})
    rows = [{**row, **{(f"predicted_{k}" if k in clashes else k): v for k, v in prediction.items()}}
            for row, prediction in pairs]
    return rows, clashes


def write(results, target: Path, output_format: str, columns: list[str], prediction: Prediction,
          overwrite: bool = True, flags: bool = False) -> int:
    """Write the rows to a temporary file of this run's own beside ``target`` and move it into place: all or nothing.
    With ``overwrite`` it is renamed over ``target`` (of two runs writing one output, the later to finish wins, whole);
    without, ``target`` is never replaced, not even by one that another run wrote meanwhile. Returns the row count."""
    descriptor, temporary = _temporary(target)
    count = 0
    try:
        binary = output_format == "npy"
        with os.fdopen(descriptor, "wb") if binary else os.fdopen(descriptor, "w", encoding="utf-8", newline="") \
                as handle:
            os.chmod(temporary, 0o666 & ~_umask())  # what a plain open() would give, not mkstemp's 0600
            if binary:
                import numpy as np

                vectors = []
                for row in results:
                    vectors.append(row[prediction.matrix_field])
                    count += 1
                np.save(handle, np.asarray(vectors, dtype=np.float32))
            else:
                writer = None
                for row in results:
                    count += 1
                    if output_format == "jsonl":
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                    elif output_format in prediction.writers:
                        handle.write(prediction.writers[output_format](row))
                    else:
                        if writer is None:  # the input's columns, then the prediction's (of the first row)
                            names = columns + [k for k in row if k not in columns]
                            tab = output_format == "tsv"
                            writer = csv.DictWriter(handle, names, delimiter="\t" if tab else ",",
                                                    extrasaction="ignore")
                            writer.writeheader()
                        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                                         for k, v in row.items()})
        _move(temporary, target, overwrite, flags)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return count


def _move(temporary: Path, target: Path, overwrite: bool, flags: bool) -> None:
    """Put the finished temporary file at ``target``: renamed over it with ``overwrite``; else linked there, which
    fails rather than replace a file that appeared while predicting."""
    if overwrite:
        os.replace(temporary, target)
        return
    appeared = UserError(f"output '{target}' was created by another program while predicting, and is left as it is: "
                         f"give another output path, or {'--overwrite' if flags else 'overwrite=true'} to replace it.")
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise appeared from None
    except OSError:  # a filesystem without hard links: rename, once more checking that there is no file
        if target.exists() or target.is_symlink():
            raise appeared from None
        os.replace(temporary, target)
    else:
        temporary.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- the entry point -----------------------------------------------------------------------------------------------
def run(options: dict[str, str], flags: bool) -> None:
    check_option_names(options, flags)
    if options.get("model_dir") and options.get("ckpt_path"):
        raise UserError("give model_dir= or ckpt_path=, not both.")
    if not options.get("model_dir") and not options.get("ckpt_path"):
        raise UserError("no model: give model_dir=<run dir or exported hf_model> or ckpt_path=<file.ckpt> "
                        "(or MODEL INPUT OUTPUT).")
    source = check_input(options.get("input"), flags)
    overwrite = _coerce("overwrite", options.get("overwrite", "false"), False, bool, flags)
    target = check_output(options.get("output"), flags, source)
    try:
        batch_size = int(options.get("batch_size", GLOBAL_OPTIONS["batch_size"]))
        if batch_size < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"{_given('batch_size', repr(options['batch_size']), flags)} is not a positive number."
                        ) from None
    device = _device(options.get("device", GLOBAL_OPTIONS["device"]), flags)
    expected = tasks.get(options["task"]) if options.get("task") is not None else None

    # What the model is, from its config or the checkpoint's record: no weights are loaded yet.
    if options.get("model_dir"):
        spec, where = exported_model(options["model_dir"], expected)
        checkpoint = None
    else:
        where = options["ckpt_path"]
        checkpoint = read_checkpoint(where)
        spec = spec_of_checkpoint(checkpoint, where)
    prediction = spec.prediction
    if expected is not None and expected.prediction is not prediction:
        raise UserError(f"'{where}' holds a {prediction.title} model, not task={options['task']}: give a model of "
                        "that task, or leave task= out.")
    settings = task_settings(prediction, options, flags)
    input_format, output_format = formats(prediction, source, target, options.get("input_format", "auto"),
                                          options.get("output_format", "auto"))
    rows = read_rows(source, input_format, prediction)
    resolve_columns(prediction, rows, settings, source, flags, trained_columns(checkpoint, where))
    settings = complete_options(prediction, settings)

    from lightning_ft.backbones import load_tokenizer

    tokenizer = load_tokenizer(**checkpoint_backbone(checkpoint, where)) if checkpoint is not None else \
        load_tokenizer(str(where))
    if prediction.check is not None:  # what the rows need of the tokenizer (a mask token...), still before the model
        prediction.check(rows, source, tokenizer, **settings)
    check_overwrite(target, overwrite, flags)
    if checkpoint is not None:
        model = load_checkpoint(spec, checkpoint, where, tokenizer)
    else:
        model = load_exported(spec, where)
    model.to(device)

    stats: Counter = Counter()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    results, renamed = merged(list(predict(prediction, model, tokenizer, rows, batch_size, settings, stats)))
    count = write(results, target, output_format, columns, prediction, overwrite, flags)
    report = prediction.report
    suffix, warnings = report(stats, settings, lambda name: _option(name, flags)) if report else ("", [])
    log.info("%s %d %s%s from %s (%s) into %s (%s)", prediction.past, count, prediction.noun, suffix, source,
             input_format, target, output_format)
    if renamed:
        log.info("the input has %s columns of its own: the predictions are in %s.", ", ".join(renamed),
                 ", ".join(f"predicted_{k}" for k in renamed))
    for warning in warnings:
        log.warning(warning)


def options_help() -> str:
    """Each task's own options, with their defaults and help, from the options dataclasses the tasks declare."""
    lines = []
    for prediction in tasks.predictions():
        lines.append(f"{prediction.title}:")
        for name, declared in prediction.option_fields().items():
            default = "the first of " + "/".join(str(c) for c in declared.metadata["usual"]) \
                if "usual" in declared.metadata else repr(declared.default)
            lines.append(f"  {name:<26} {declared.metadata.get('help', '')} (default: {default})")
    return "\n".join(lines)


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
        print(options_help())
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
