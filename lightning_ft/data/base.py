"""The base DataModule: load splits from the hub or local files, check them, tokenize once (cached), batch them.

A task subclass says which columns it needs (``required_columns``), how to read labels from the training split
(``fit_labels``) and how to turn a batch of raw rows into model inputs (``encode``). Everything else lives here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_ft.data.token_budget import TokenBudgetBatches, check_budget, example_tokens
from lightning_ft.errors import UserError
from lightning_ft.plan import check_data_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# The file stems each split is found under in a data_dir (train.tsv, dev.tsv...; train.de + train.en).
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}
# Builders of `datasets` for local files, by extension (".gz" and friends are stripped first).
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst"}
NO_SOURCE = ("the dataset has no source: set dataset.data_dir to the folder of its files (or dataset.hub_name to a "
             "Hugging Face Hub dataset).")
# Bump when what `encode` writes changes in a way the fingerprint cannot see, so stale caches are not reused.
CACHE_VERSION = 1


def _builder_for(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in _COMPRESSION]
    ext = suffixes[-1].lower() if suffixes else ""
    if ext not in _BUILDERS:
        raise UserError(
            f"dataset file '{path}' has an unknown extension '{ext}': use one of {', '.join(sorted(_BUILDERS))}."
        )
    return _BUILDERS[ext]


def open_text(path: Path):
    """A UTF-8 text file for reading (a byte-order mark skipped, as spreadsheets write one), gzip-, bzip2- and
    xz-compressed ones (``.gz``, ``.bz2``, ``.xz``) too."""
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower())
    return opener(path, "rt", encoding="utf-8-sig") if opener else path.open(encoding="utf-8-sig")


def split_files(root: Path, names: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """The files of ``root`` that hold one split, whose names (its own and its aliases, ``SPLIT_NAMES``) are given:
    those named exactly ``<name>.<ext>`` (a compression suffix allowed: ``train.jsonl.gz``), in the order of
    ``names``; and those that only start so (``train.bak.tsv``), which are not used."""
    exact: list[Path] = []
    near: list[Path] = []
    files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    for name in names:
        for path in files:
            if not path.name.startswith(f"{name}."):
                continue
            parts = path.name.split(".")
            if len(parts) > 2 and f".{parts[-1].lower()}" in _COMPRESSION:
                parts = parts[:-1]
            (exact if len(parts) == 2 else near).append(path)
    return exact, near


def iter_jsonl(source: Path):
    """``(line number, value)`` for every non-blank line of a JSON-lines file (``.gz`` too); a line that is not JSON
    is an error naming the file and line."""
    with open_text(source) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{source}:{number} is not JSON ({err.msg}): write one object a line.") from err


def _first_bad_json(path: Path) -> str | None:
    """Where a JSON or JSON-lines file stops being readable, as one sentence naming the file and line (None where
    every line is a JSON object, or a ``.json`` file holds one JSON document)."""
    if ".jsonl" not in path.suffixes:
        with open_text(path) as handle:
            text = handle.read()
        try:
            json.loads(text)
            return None  # one JSON document: whatever is wrong with it, it is not its syntax
        except json.JSONDecodeError as err:
            first = next((line for line in text.splitlines() if line.strip()), "")
            try:
                json.loads(first)
            except json.JSONDecodeError:  # not JSON lines either: the document's own error
                return f"{path}:{err.lineno} is not JSON ({err.msg}): fix the file."
    try:
        for number, value in iter_jsonl(path):
            if not isinstance(value, dict):
                return f"{path}:{number} is a JSON {type(value).__name__}, not an object: write one object a line."
    except UserError as err:
        return str(err)
    return None


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[0-9]+)?|Unnamed: [0-9]+")


def _looks_like_data(columns: list[str]) -> bool:
    """Whether a csv/tsv header row reads like a row of data (numbers, sentences), as a file without one gives."""
    return any(not _IDENTIFIER.fullmatch(str(c)) for c in columns)


def dotted_field(row: dict, path: str) -> Any:
    """``row["question"]["stem"]`` for the path ``question.stem`` (a plain column name works too); KeyError or
    TypeError where the row has no such field."""
    value: Any = row
    for part in path.split("."):
        value = value[part]
    return value


def _fingerprint(data: Any) -> str:
    """The raw split's identity for the tokenized-data cache key."""
    if data.cache_files:
        return data._fingerprint  # datasets' own: the source files and every transform applied since
    # Built in memory (e.g. CoNLL files a task reads itself): no cache file backs it, so map would not cache its
    # result; the key hashes the rows and the tokenized split gets an explicit cache file.
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.data.schema) as writer:
        writer.write_table(data.data.table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def tokenizer_signature(tokenizer: Any) -> str:
    """A stable identity of a tokenizer's vocabulary and rules, for the tokenized-data cache key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Truncation/padding state changes once the tokenizer has been called; it is not part of its identity.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((type(tokenizer).__name__ + text + special).encode()).hexdigest()[:16]


# dataset.long_inputs of the tasks that can read a long input in overlapping windows (text classification, NER).
LONG_INPUTS = ("truncate", "window")


def check_window_settings(long_inputs: Any, stride: Any) -> None:
    """``dataset.long_inputs`` and ``dataset.stride``, checked when the DataModule is made."""
    if long_inputs not in LONG_INPUTS:
        raise UserError(f"dataset.long_inputs={long_inputs!r} is not one of {', '.join(LONG_INPUTS)}: truncate cuts a "
                        "long input at max_length, window reads it in overlapping windows.")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
        raise UserError(f"dataset.stride={stride!r} is not a whole number of tokens >= 0: give the overlap of "
                        "neighbouring windows, e.g. dataset.stride=32.")


def check_window_room(tokenizer: Any, max_length: int, stride: int, pair: bool = False) -> None:
    """A window of ``max_length`` tokens, less the tokenizer's special tokens, must hold more than the ``stride``
    it shares with the one before (the tokenizer's overflow fails otherwise, deep in tokenizing)."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=pair)
    if stride >= room:
        raise UserError(f"dataset.stride={stride} leaves no new tokens in a window of dataset.max_length={max_length} "
                        f"({room} after the special tokens): set dataset.stride below {room}, e.g. {room // 4}.")


class EpochShuffle(Sampler[int]):
    """The training order: a new shuffle every epoch, drawn from ``seed + epoch`` alone (not the global random
    state), so a resumed run replays the very order it was interrupted in. With ``lengths``, rows are grouped by
    length as transformers' ``LengthGroupedSampler`` does (shuffled mega-batches of 50 batches, sorted by length
    inside): far less padding, the epoch still shuffled."""

    def __init__(self, size: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1,
                 epoch_of: Callable[[], int | None] | None = None) -> None:
        self.size, self.seed, self.lengths, self.batch_size = size, seed, lengths, batch_size
        self.epoch = 0
        # The epoch the next batch belongs to, from the batches trained so far (``_loader``). Lightning's own epoch
        # number (set_epoch) counts a resumed iteration-based run's end-of-epoch checkpoint twice: it would replay
        # the epoch after the one an uninterrupted run trains.
        self.epoch_of = epoch_of

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before each epoch (also through DDP's wrapper)
        self.epoch = epoch

    def __iter__(self):
        counted = self.epoch_of() if self.epoch_of is not None else None
        generator = torch.Generator().manual_seed(self.seed + (self.epoch if counted is None else counted))
        if self.lengths is None:
            return iter(torch.randperm(self.size, generator=generator).tolist())
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    def __len__(self) -> int:
        return self.size


def _collate_columns(collate: Callable[[list[dict]], dict], columns: dict[str, list]) -> dict:
    """``collate`` of the rows a dataset returns as columns when indexed with a list of rows (a token-budget batch)."""
    return collate([dict(zip(columns, values)) for values in zip(*columns.values())])


def _epoch_of_next_batch(trainer: Any) -> int | None:
    """Training batches fetched so far (over every epoch, restored from a checkpoint) over the batches an epoch has:
    the epoch an uninterrupted run would be in. None before Lightning knows the epoch's length."""
    per_epoch = trainer.num_training_batches
    if not isinstance(per_epoch, int) or per_epoch <= 0:
        return None
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready // per_epoch


class ResumableLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` (its state: how far into the epoch it has read), except that a checkpoint
    taken after the epoch's last batch (the end-of-epoch validation) starts the next epoch afresh, where torchdata
    would yield an empty first epoch (nothing left of the finished one). (The sampler's epoch is set when the loader
    is made: ``_loader``.)"""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("_num_yielded", 0) < len(self):
            super().load_state_dict(state)


class TaskDataModule(pl.LightningDataModule):
    """Loads ``train``/``validation``/``test`` splits and serves tokenized, dynamically padded batches.

    Data comes from local files (``data_dir`` and/or ``data_files``: csv, tsv, json, jsonl, parquet, txt, gz
    allowed) or, when no local path is given, from the Hugging Face Hub (``hub_name``, ``hub_config``; ``hub_splits``
    and ``hub_rename`` map the hub's split and column names to the local ones). In a ``data_dir``, each split is the
    one file named ``<split>.<ext>`` (validation: also ``valid``, ``dev`` or ``val``); ``data_files`` names them
    otherwise. ``column_names`` names the columns of csv/tsv files that have no header row.
    A null entry of ``data_files`` or ``hub_splits`` (the configs list every split) means "not given".
    ``group_by_length`` (default) batches training rows of similar length together: far less padding, same
    shuffling. ``max_tokens`` makes each training batch hold up to that many tokens (``budget_columns``) instead of
    ``batch_size`` rows (``token_budget.TokenBudgetBatches``). ``num_workers`` null picks loader workers for the
    device (some on a GPU, none on CPU).
    Tokenization runs once per split and is cached by ``datasets`` under a key made of the raw data's fingerprint,
    the tokenizer and the preprocessing settings: a second identical run, or another DDP rank, reads the cache.
    """

    # Write each row's position in its split as ``row_index``: metrics that must count an example once under DDP
    # (where the sampler repeats rows to even out the ranks) read it.
    keep_row_index: bool = False
    # What ``model_kwargs`` gives the task module besides ``head_kwargs``: data settings the module acts on.
    module_settings = ("packing",)
    # The per-token entries a packed batch lays out in rows (``dataset.packing``); None: the task does not pack.
    packed_token_keys: tuple[str, ...] | None = None
    # The columns whose tokens count against ``max_tokens`` (seq2seq adds its targets).
    budget_columns: tuple[str, ...] = ("input_ids",)

    def __init__(
        self,
        *,
        tokenizer: Any = None,
        hub_name: str | None = None,
        hub_config: str | None = None,
        hub_splits: dict[str, str] | None = None,
        hub_rename: dict[str, str] | None = None,
        data_dir: str | None = None,
        data_files: dict[str, str | list[str] | None] | None = None,
        column_names: list[str] | None = None,
        reader_kwargs: dict[str, Any] | None = None,
        val_fraction: float | None = None,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pad_to_multiple_of: int | None = None,
        group_by_length: bool | None = True,
        packing: bool | None = False,
        max_tokens: int | None = None,
        cache_dir: str | None = None,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.tokenizer: Any = None
        self.hub_name = hub_name
        self.hub_config = hub_config
        self.hub_splits = {k: v for k, v in (hub_splits or {}).items() if v is not None}
        self.hub_rename = dict(hub_rename or {})
        self.data_dir = data_dir
        self.data_files = {k: v for k, v in (data_files or {}).items() if v is not None}
        self.column_names = list(column_names) if column_names else None
        self.reader_kwargs = dict(reader_kwargs or {})
        self.val_fraction = val_fraction
        self.max_train_examples = max_train_examples
        self.max_eval_examples = max_eval_examples
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = bool(group_by_length)  # null (a task that decides for itself, left undecided): off
        if packing and self.packed_token_keys is None:
            raise UserError(f"dataset.packing=true is not available for {type(self).__name__} (text "
                            "classification, NER, similarity, multiple choice, translation and summarization pack "
                            "their examples): set dataset.packing=false.")
        # Packed batches are a random draw of examples like shuffled ones: length grouping does not apply to them.
        # None: packed where the task module finds that its backbone keeps packed examples apart (``packs_examples``).
        self.pack_examples = packing if self.packed_token_keys is not None else False
        check_budget(max_tokens, max_length)
        self.max_tokens = max_tokens
        self.cache_dir = cache_dir
        self.seed = seed
        self.datasets: dict[str, Any] | None = None
        self.examples_tokenized = 0  # rows this process tokenized itself (0 when every split came from the cache)
        self.tokenize_seconds = 0.0  # tokenizing, or reading the tokenized splits from the cache
        self.truncated: dict[str, int] = {}
        # split -> kind of bad input -> how many rows (or which example ids), reported in the run's summary
        self.problems: dict[str, dict[str, Any]] = {}
        self._read_as: dict[str, str] = {}  # split -> the datasets builder its local files were read with
        if tokenizer is not None:
            self.connect(tokenizer)

    def connect(self, tokenizer: Any) -> TaskDataModule:
        """Give the DataModule its tokenizer (an object, or a name or directory to load). It comes after
        construction because a backbone built from a config trains its tokenizer on this DataModule's training text
        (``training_texts``). Checks what the task needs of the tokenizer, before any data is read."""
        if isinstance(tokenizer, str):
            from lightning_ft.backbones import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = self.check_tokenizer(tokenizer)
        self._collator = None
        return self

    # ---- what a task subclass provides -------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer: Any) -> Any:
        """Refuse a tokenizer the task cannot use (a UserError); return the one to use (e.g. reloaded with
        ``add_prefix_space``). By default: ``max_length`` must fit the backbone's positions, which its tokenizer's
        ``model_max_length`` states (a longer batch would fail at the first long example, deep in the model)."""
        limit = getattr(tokenizer, "model_max_length", None)
        # A tokenizer that states no limit says 1e30 or so.
        if isinstance(limit, int) and limit < 1_000_000 and self.max_length > limit:
            raise UserError(f"dataset.max_length={self.max_length} is longer than the backbone takes ({limit} tokens: "
                            f"its tokenizer's model_max_length): set dataset.max_length={limit} or less.")
        return tokenizer

    def required_columns(self, split: str) -> list[str]:
        """The raw columns ``encode`` reads from ``split``."""
        raise NotImplementedError

    def column_options(self) -> dict[str, str]:
        """The config key that names each required column (``{"sentence": "dataset.text_column"}``), for the
        missing-column error; a column not in it is named "the dataset's column option"."""
        return {}

    def predict_columns(self) -> dict[str, Any]:
        """The columns this data names, as the task's predict options (``{"column": "review"}``): saved with the
        model, so predict reads a file laid out like the training data without being told its columns again."""
        return {}

    def fit_labels(self, train: Any) -> None:
        """Learn the label set from the raw training split (called before ``check_split`` and ``encode``)."""

    def label_columns(self) -> list[str]:
        """The columns that hold labels, which an unlabelled split lacks (a GLUE test file)."""
        return []

    def check_split(self, split: str, data: Any) -> None:
        """Raise a ``UserError`` for rows ``encode`` cannot handle (e.g. a label training never saw)."""

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        """Tokenize a batch of raw rows into model inputs (``input_ids``, ``labels``...)."""
        raise NotImplementedError

    def check_encoded(self, split: str, data: Any) -> None:
        """Look at a tokenized split (fresh or from the cache), e.g. to warn about what truncation dropped."""

    def head_kwargs(self) -> dict[str, Any]:
        """What the task module needs to know about the prepared data (e.g. ``num_labels``, ``id2label``)."""
        return {}

    def preprocessing_settings(self) -> dict[str, Any]:
        """Everything besides the raw data and tokenizer that changes what ``encode`` writes."""
        return {"max_length": self.max_length, "columns": self.required_columns("train")}

    def special_tokens(self) -> list[str]:
        """Tokens that a tokenizer trained for a fresh model (``backbone.train_tokenizer``) must hold as special
        tokens, besides its own (a chat template's markers)."""
        return []

    def make_collator(self) -> Any:
        """The object that pads a list of tokenized rows into a batch (made once, on first use)."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=self.pad_to_multiple_of)

    def collate(self, features: list[dict]) -> dict:
        """A batch of tokenized rows; a task whose rows carry more than the collator pads overrides this."""
        return self.collator(features)

    def collate_packed(self, features: list[dict]) -> dict:
        """The padded batch ``collate`` makes, its examples packed into rows of up to ``max_length`` tokens."""
        from lightning_ft.packing import pack_batch

        return pack_batch(self.collate(features), self.max_length, self.packed_token_keys,
                          self.tokenizer.pad_token_id or 0, self.pad_to_multiple_of)

    # ---- shared by every task ----------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """What the task module is built with: the data is prepared (checked, labels learned, tokenized) first."""
        self._prepare()
        return {**self.head_kwargs(), **({} if self.pack_examples is False else {"packing": self.pack_examples})}

    @property
    def collator(self) -> Any:
        if getattr(self, "_collator", None) is None:
            self._collator = self.make_collator()
        return self._collator

    # ---- loading -----------------------------------------------------------------------------------------------
    def _local_files(self) -> dict[str, list[Path]]:
        if not self.data_dir and not self.data_files:
            raise UserError(NO_SOURCE)
        check_data_dir(self.data_dir)
        root = Path(self.data_dir).expanduser() if self.data_dir else Path(".")
        files = self.data_files
        if not files:  # discover train/validation/test files in data_dir
            files = self._discover(root)
        resolved: dict[str, list[Path]] = {}
        for split, names in files.items():
            if split not in SPLITS:
                raise UserError(f"dataset.data_files has a split '{split}': use {', '.join(SPLITS)}.")
            paths = [root / n for n in ([names] if isinstance(names, str) else names)]
            for p in paths:
                if not p.is_file():
                    fix = ("fix dataset.data_dir or dataset.data_files" if self.data_dir or p.is_absolute() else
                           "set dataset.data_dir to the folder that holds it, or fix dataset.data_files")
                    raise UserError(
                        f"dataset.data_files.{split} '{p}' does not exist (resolved to {p.resolve()}): {fix}."
                    )
            resolved[split] = paths
        return resolved

    def _discover(self, root: Path) -> dict[str, list[str]]:
        """Each split's file in ``data_dir``: the one named exactly ``<split>.<ext>`` (or an alias: dev.tsv)."""
        files: dict[str, list[str]] = {}
        for split, names in SPLIT_NAMES.items():
            found, ignored = split_files(root, names)
            if len(found) > 1:
                raise UserError(
                    f"dataset.data_dir '{self.data_dir}' holds several {split} files "
                    f"({', '.join(p.name for p in found)}): name the one to use with "
                    f"dataset.data_files.{split}={found[0].name}."
                )
            if ignored:
                log.info("Not used as the %s split (not named exactly %s.<ext>): %s", split, "/".join(names),
                         ", ".join(p.name for p in ignored))
            if found:
                files[split] = [found[0].name]
        if not files:
            raise UserError(
                f"dataset.data_dir '{self.data_dir}' has no train/validation/test files: name them "
                "train.<ext>, validation.<ext>, test.<ext> or list them in dataset.data_files."
            )
        return files

    def read_local(self, split: str, paths: list[Path]) -> Any:
        """Read one split's local files with the ``datasets`` builder their extension names."""
        import datasets

        builder = _builder_for(paths[0])
        kwargs = dict(self.reader_kwargs)
        if builder == "csv" and paths[0].suffixes and ".tsv" in paths[0].suffixes:
            kwargs.setdefault("delimiter", "\t")
            kwargs.setdefault("quoting", 3)  # csv.QUOTE_NONE: GLUE-style TSVs hold bare quote characters
        if self.column_names:
            self._check_column_names(builder, paths, kwargs)
            kwargs.setdefault("column_names", self.column_names)
            kwargs.setdefault("header", None)
        self._read_as[split] = builder
        try:
            return datasets.load_dataset(
                builder, data_files=[str(p) for p in paths], split="train", cache_dir=self.cache_dir, **kwargs
            )
        except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
            # datasets' words for a file with no rows (json/csv), and for an empty text file
            if "corresponds to no data" in str(err) or "at least one example" in str(err.__cause__ or ""):
                raise UserError(
                    f"the {split} split of the dataset is empty ({', '.join(map(str, paths))}): "
                    "give it at least one row."
                ) from err
            if builder == "json":  # datasets does not say which line; find the first bad one
                where = next(filter(None, map(_first_bad_json, paths)), None)
                if where:
                    raise UserError(where) from err
            raise UserError(
                f"dataset.data_files.{split} {[str(p) for p in paths]} could not be read as {builder}: "
                f"{err.__cause__ or err}. Fix the file or dataset.reader_kwargs."
            ) from err

    def _check_column_names(self, builder: str, paths: list[Path], kwargs: dict[str, Any]) -> None:
        """``column_names`` is for header-less csv/tsv files, one name a column."""
        import csv

        if builder != "csv":
            raise UserError(
                f"dataset.column_names names the columns of header-less csv/tsv files, but {paths[0]} is read as "
                f"{builder}: drop dataset.column_names."
            )
        for path in (p for p in paths if p.suffix.lower() != ".zst"):  # zstd: no reader in the standard library
            with open_text(path) as handle:
                first = next(csv.reader(handle, delimiter=kwargs.get("delimiter", kwargs.get("sep", ",")),
                                        quoting=kwargs.get("quoting", csv.QUOTE_MINIMAL)), None)
            if first is not None and len(first) != len(self.column_names):
                raise UserError(
                    f"dataset.column_names has {len(self.column_names)} names but the first row of {path} has "
                    f"{len(first)} columns: give one name per column, in file order."
                )

    def read_splits(self) -> dict[str, Any]:
        """The splits the source holds (local files or the hub), as ``datasets.Dataset`` objects."""
        import datasets

        if self.data_dir or (self.data_files and not self.hub_name):
            raw = {split: self.read_local(split, paths) for split, paths in self._local_files().items()}
        elif self.hub_name:
            try:
                loaded = datasets.load_dataset(self.hub_name, self.hub_config, cache_dir=self.cache_dir)
            except Exception as err:  # the hub raises many types (ConnectionError, FileNotFoundError, ...)
                raise UserError(
                    f"dataset.hub_name '{self.hub_name}' ({self.hub_config or 'default config'}) could not be loaded "
                    f"({type(err).__name__}: {err}). Offline? Point dataset.data_dir at local files instead."
                ) from err
            raw = {}
            for split in SPLITS:
                source = self.hub_splits.get(split, split)
                if source in loaded:
                    raw[split] = loaded[source].rename_columns(self.hub_rename) if self.hub_rename else loaded[source]
        else:
            raise UserError(NO_SOURCE)
        return raw

    def load_raw(self) -> dict[str, Any]:
        """The raw splits, keyed ``train``/``validation``/``test``: validation held out of train when asked
        (``val_fraction``), and cut to ``max_train_examples``/``max_eval_examples``."""
        raw = self.read_splits()
        if "train" not in raw:
            raise UserError("the dataset has no train split: add dataset.data_files.train (or a train.<ext> file "
                            "in dataset.data_dir).")
        if "validation" not in raw and self.val_fraction:
            parts = raw["train"].train_test_split(test_size=self.val_fraction, seed=self.seed)
            raw["train"], raw["validation"] = parts["train"], parts["test"]
        if "validation" not in raw:
            raise UserError(
                "the dataset has no validation split: add dataset.data_files.validation, or set "
                "dataset.val_fraction=0.1 to hold out part of train."
            )
        limits = {"train": self.max_train_examples}
        limits["validation"] = limits["test"] = self.max_eval_examples
        for split, data in raw.items():
            if limits[split] is not None and len(data) > limits[split]:
                raw[split] = data.select(range(limits[split]))
        return raw

    def _check_columns(self, raw: dict[str, Any]) -> None:
        options = self.column_options()
        for split, data in raw.items():
            if len(data) == 0:
                raise UserError(f"the {split} split of the dataset is empty: give it at least one row.")
            missing = list(dict.fromkeys(c for c in self.required_columns(split) if c not in data.column_names))
            if not missing:
                continue
            if split != "train" and set(missing) <= set(self.label_columns()):
                # GLUE's test files: the rows without the labels, which GLUE keeps private; first column index/id
                glue = " (as a GLUE test file is: GLUE keeps those labels private)" if str(
                    data.column_names[0]).lower() in ("index", "id") else ""
                raise UserError(
                    f"the {split} split has no labels: column {', '.join(repr(c) for c in missing)} is missing"
                    f"{glue}, so it cannot be scored. Point dataset.data_files.{split} at a labelled file (for GLUE "
                    "the dev split, dev.tsv, as its dataset configs do), or get its predictions with "
                    "python -m lightning_ft.predict."
                )
            keys = list(dict.fromkeys(options.get(c, "the dataset's column option") for c in missing))
            if len(missing) == 1:
                what = f"column '{missing[0]}' is missing"
                fix = f"set {keys[0]} to one of those"
            else:
                what = f"columns {', '.join(repr(c) for c in missing)} are missing"
                fix = f"set {' and '.join(keys)} to columns it has"
            if self._read_as.get(split) == "csv" and not self.column_names and _looks_like_data(data.column_names):
                fix += (f", or, if the file has no header row, name its columns with dataset.column_names=[...] "
                        f"({len(data.column_names)} names, in file order)")
            has = ", ".join(c if len(c) <= 40 else f"{c[:37]}..." for c in map(str, data.column_names))
            raise UserError(f"{what} from the {split} split (it has: {has}): {fix}.")

    # ---- Lightning hooks ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        self._prepare()

    def _prepare(self) -> None:
        if self.datasets is not None:
            return
        raw = self.load_raw()
        self._check_columns(raw)
        self.fit_labels(raw["train"])
        for split, data in raw.items():
            self.check_split(split, data)
        settings = json.dumps(
            {"task": type(self).__name__, "version": CACHE_VERSION, **self.preprocessing_settings()},
            sort_keys=True,
            default=str,
        )
        tokenizer_id = tokenizer_signature(self.tokenizer)
        self.datasets = {}
        started = time.perf_counter()
        for split, data in raw.items():
            key = hashlib.sha256(f"{_fingerprint(data)}|{tokenizer_id}|{settings}".encode()).hexdigest()[:32]
            self._current_split = split
            self.datasets[split] = data.map(
                self._encode_counted,
                batched=True,
                with_indices=True,
                remove_columns=data.column_names,
                new_fingerprint=key,
                cache_file_name=None if data.cache_files else self._cache_file(key),
                desc=f"Tokenizing {split}",
            )
            self.check_encoded(split, self.datasets[split])
        self.tokenize_seconds = time.perf_counter() - started
        for split, count in self.truncated.items():
            if count:
                log.warning(
                    "%d of %d %s examples were longer than max_length=%d tokens and were truncated.",
                    count, len(raw[split]), split, self.max_length,
                )

    @property
    def preparation(self) -> dict[str, Any]:
        """What preparing the data cost: rows tokenized here (0 = all from the cache) and the seconds it took; and
        the bad input found, per split and kind (counts)."""
        out = {"examples_tokenized": self.examples_tokenized, "tokenize_seconds": round(self.tokenize_seconds, 3),
               "examples": {split: len(data) for split, data in (self.datasets or {}).items()}}
        counts = {split: {kind: len(found) if isinstance(found, (list, set)) else found
                          for kind, found in kinds.items()} for split, kinds in self.problems.items() if kinds}
        return {**out, **({"problems": counts} if counts else {})}

    def _cache_file(self, key: str) -> str:
        import datasets

        folder = Path(self.cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser() / "lightning_ft"
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder / f"tokenized-{key}.arrow")

    def _encode_counted(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = self.encode(batch)
        if self.keep_row_index:
            out["row_index"] = list(indices)
        self.examples_tokenized += len(next(iter(batch.values())))
        return out

    def count_truncated(self, encoding: Any) -> None:
        """Count the examples of a fast-tokenizer batch that lost tokens to ``max_length``."""
        lost = sum(1 for e in encoding.encodings if e.overflowing)
        self.truncated[self._current_split] = self.truncated.get(self._current_split, 0) + lost

    # ---- loaders -----------------------------------------------------------------------------------------------
    def _loader(self, split: str) -> DataLoader:
        self._prepare()
        data, sampler = self.loader_data(split), None
        on_gpu = self._on_gpu()
        workers = self.num_workers
        if workers is None:
            # On a GPU, loading in workers keeps the device fed. On CPU the model needs every core and collating
            # padded batches took under 2% of training time (data_wait in the throughput summary), so no workers.
            workers = min(4, (os.cpu_count() or 1) // max(self.trainer.num_devices, 1)) if on_gpu else 0
        trainer = getattr(self, "trainer", None)
        # Evaluation batches are packed on one process only: under DDP a rank drops the rows its sampler repeats
        # (TaskModule.own_rows), which needs one row per example.
        packs = self.pack_examples
        if packs is None:  # the module decided, from its backbone
            packs = bool(getattr(getattr(trainer, "lightning_module", None), "packs_examples", False))
        packed = packs and (split == "train" or trainer is None or trainer.world_size == 1)
        collate = self.collate_packed if packed else self.collate
        if split != "train":
            return DataLoader(data, batch_size=self.eval_batch_size, collate_fn=collate, num_workers=workers,
                              persistent_workers=workers > 0, pin_memory=on_gpu)
        lengths = None
        if self.group_by_length and not packed:
            lengths = pc.list_value_length(data.with_format("arrow")["input_ids"]).to_pylist()
        # A stateful loader over an order that depends only on (seed, epoch): a checkpoint records how many batches
        # of the epoch were read, and a resumed run skips exactly those (trainer.fit with a mid-epoch checkpoint).
        sampler = EpochShuffle(len(data), seed=self.seed, lengths=lengths, batch_size=self.batch_size)
        # A resumed run creates its first iterator before Lightning sets the epoch: start it in the epoch the loop
        # will run (the one in progress, or the next after an end-of-epoch checkpoint).
        if trainer is not None:
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
            sampler.epoch_of = lambda: _epoch_of_next_batch(trainer)
        batching: dict[str, Any] = {"batch_size": self.batch_size, "sampler": sampler}
        if self.max_tokens is not None:
            # The loader reads a list of rows at a time (batch_size None): the sampler's items are whole batches.
            # Under DDP, Lightning's sampler wrapper then deals the epoch's batches out to the ranks.
            budget = TokenBudgetBatches(sampler, example_tokens(data, self.budget_columns), self.max_tokens)
            batching = {"batch_size": None, "sampler": budget}
            collate = functools.partial(_collate_columns, collate)
        return ResumableLoader(
            data,
            **batching,
            # Its own generator: creating an iterator then draws no number from the global one, so the dropout of
            # a run resumed at an epoch start matches an uninterrupted run's.
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=on_gpu,
        )

    def loader_data(self, split: str) -> Any:
        """The rows a split's loader reads: the tokenized split (a task that packs its examples returns the packed
        rows)."""
        return self.datasets[split]

    def _on_gpu(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        self._prepare()
        if "test" not in self.datasets:
            raise UserError("the dataset has no test split: add dataset.data_files.test, or run with test=false.")
        return self._loader("test")

    def has_split(self, split: str) -> bool:
        self._prepare()
        return split in self.datasets
