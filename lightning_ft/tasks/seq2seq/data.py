"""The data: source/target text pairs for an encoder-decoder: parallel files, columns, or the hub's layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lightning_ft.data.base import SPLIT_NAMES, TaskDataModule, open_text
from lightning_ft.errors import UserError

log = logging.getLogger(__name__)




SOURCE_CUT, TARGET_CUT = 1, 2  # bits of the "truncated" column


def _read_lines(path: Path) -> list[str]:
    with open_text(path) as handle:
        return [line.rstrip("\r\n") for line in handle]


class Seq2SeqData(TaskDataModule):
    """Source/target text pairs, tokenized for an encoder-decoder model.

    Args:
        source_lang, target_lang: language keys: the suffixes of parallel files (``train.de``/``train.en``) or the
            keys of a ``translation`` column. Both null: ``source_column``/``target_column`` hold the texts.
        parallel_files: the file stem of a split, when not train/validation/test (e.g. ``{test: test_2016_flickr}``).
        source_prefix: text put before every source (T5: "translate German to English: ", "summarize: ").
    """

    keep_row_index = True
    budget_columns = ("input_ids", "labels")  # the decoder's tokens cost as much as the encoder's
    packed_token_keys = ("input_ids",)  # the sources; ``collate_packed`` lays the targets out in the same rows

    def __init__(
        self,
        *,
        source_column: str = "source",
        target_column: str = "target",
        source_lang: str | None = None,
        target_lang: str | None = None,
        parallel_files: dict[str, str] | None = None,
        source_prefix: str = "",
        max_source_length: int = 128,
        max_target_length: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_length=max_source_length, **kwargs)
        if (source_lang is None) != (target_lang is None):
            raise UserError("dataset.source_lang and dataset.target_lang go together: give both, or neither.")
        self.source_column = source_column
        self.target_column = target_column
        self.source_lang = source_lang
        self.target_lang = target_lang
        self.parallel_files = dict(parallel_files or {})
        self.source_prefix = source_prefix
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self._references: dict[str, list[list[str]]] = {}
        self._sources: dict[str, list[str]] = {}
        self._parallel = False
        self._raw: dict[str, Any] | None = None

    # ---- reading -----------------------------------------------------------------------------------------------
    def _parallel_paths(self) -> dict[str, tuple[Path, Path]] | None:
        """``split -> (source file, target file)`` when ``data_dir`` holds parallel text files, else None."""
        if not (self.data_dir and self.source_lang):
            return None
        root = Path(self.data_dir).expanduser()
        if not root.is_dir():
            return None  # the base reader names the bad path

        def find(stem: str, lang: str) -> Path | None:
            return next((p for p in (root / f"{stem}.{lang}", root / f"{stem}.{lang}.gz") if p.is_file()), None)

        if not any(root.glob(f"*.{self.source_lang}")) and not any(root.glob(f"*.{self.source_lang}.gz")):
            return None
        pairs = {}
        for split, names in SPLIT_NAMES.items():
            stems = [self.parallel_files[split]] if split in self.parallel_files else list(names)
            if split == "test" and split not in self.parallel_files:  # e.g. Multi30k's test_2016_flickr
                stems = stems + sorted({p.name.split(".")[0] for p in root.glob(f"test*.{self.source_lang}*")})
            for stem in stems:
                source, target = find(stem, self.source_lang), find(stem, self.target_lang)
                if source and not target:
                    raise UserError(f"'{source}' has no parallel '{stem}.{self.target_lang}[.gz]' in {root}: add it, "
                                    "or fix dataset.target_lang.")
                if source:
                    pairs[split] = (source, target)
                    break
            if split in self.parallel_files and split not in pairs:
                raise UserError(f"dataset.parallel_files.{split} '{self.parallel_files[split]}': no "
                                f"{self.parallel_files[split]}.{self.source_lang}[.gz] in {root}.")
        return pairs

    def read_splits(self) -> dict[str, Any]:
        pairs = self._parallel_paths()
        self._parallel = pairs is not None
        if pairs is None:
            return super().read_splits()
        import datasets

        raw = {}
        for split, (source_path, target_path) in pairs.items():
            sources, targets = _read_lines(source_path), _read_lines(target_path)
            if len(sources) != len(targets):
                raise UserError(
                    f"parallel files differ in length: {source_path} has {len(sources)} lines, {target_path} has "
                    f"{len(targets)}. They need one sentence a line, line i of one translating line i of the other."
                )
            raw[split] = datasets.Dataset.from_dict({"source": sources, "target": targets})
        return raw

    def load_raw(self) -> dict[str, Any]:
        if self._raw is None:  # read once: training a tokenizer reads the training text before tokenizing
            self._raw = {split: self._normalize(split, data) for split, data in super().load_raw().items()}
            for split, data in self._raw.items():
                self._sources[split] = data["source"]
                self._references[split] = data["references"]
        return self._raw

    def _normalize(self, split: str, data: Any) -> Any:
        """Columns ``source`` (text), ``target`` (the training target) and ``references`` (every target)."""
        names = data.column_names
        layout = "translation" if "translation" in names and self.source_lang else "columns"
        if layout == "columns":
            # Parallel files are read into source/target columns whatever the column options say.
            source_column, target_column = ("source", "target") if self._parallel else (self.source_column,
                                                                                          self.target_column)
            for option, column in (("source_column", source_column), ("target_column", target_column)):
                if column not in names:
                    raise UserError(f"column '{column}' is missing from the {split} split (it has: {', '.join(names)})"
                                    f": set dataset.{option} to one of those, or dataset.source_lang/target_lang for a "
                                    "'translation' column.")
        else:
            keys = set(data[0]["translation"])
            for option, lang in (("source_lang", self.source_lang), ("target_lang", self.target_lang)):
                if lang not in keys:
                    raise UserError(f"the {split} split's 'translation' column has languages {sorted(keys)}, not "
                                    f"dataset.{option} '{lang}': set it to one of those.")

        def texts(value: Any) -> list[str]:
            if value is None:
                return []
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]

        def normalize(batch: dict[str, list]) -> dict[str, list]:
            if layout == "translation":
                sources = [row[self.source_lang] for row in batch["translation"]]
                targets = [texts(row[self.target_lang]) for row in batch["translation"]]
            else:
                sources = [" ".join(texts(s)) for s in batch[source_column]]
                targets = [texts(t) for t in batch[target_column]]
            references = [[t for t in ts if t.strip()] for ts in targets]
            return {"source": sources, "target": [r[0] if r else "" for r in references], "references": references}

        data = data.map(normalize, batched=True, remove_columns=names, desc=f"Reading {split}")
        empty = data.filter(lambda batch: [not t for t in batch["target"]], batched=True)
        if len(empty):
            self.problems.setdefault(split, {})["empty_target"] = len(empty)
            log.warning("%d %s rows have an empty target and are left out (first: row with source %r).",
                        len(empty), split, empty[0]["source"][:80])
            data = data.filter(lambda batch: [bool(t) for t in batch["target"]], batched=True)
            if len(data) == 0:
                raise UserError(f"every target of the {split} split is empty: check dataset.target_column.")
        return data

    # ---- tokenizing --------------------------------------------------------------------------------------------
    def predict_columns(self) -> dict[str, Any]:
        return {"column": self.source_column}

    def required_columns(self, split: str) -> list[str]:
        return ["source", "target"]

    def training_texts(self):
        """Source and target texts of the training split, to train a tokenizer on (a shared vocabulary)."""
        train = self.load_raw()["train"]
        for row in train.select_columns(["source", "references"]):
            yield row["source"]
            yield from row["references"]

    def preprocessing_settings(self) -> dict[str, Any]:
        return {"max_source_length": self.max_source_length, "max_target_length": self.max_target_length,
                "source_prefix": self.source_prefix}

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        inputs = self.tokenizer([self.source_prefix + s for s in batch["source"]],
                                max_length=self.max_source_length, truncation=True)
        labels = self.tokenizer(text_target=batch["target"], max_length=self.max_target_length, truncation=True)
        cut = [SOURCE_CUT * bool(s.overflowing) + TARGET_CUT * bool(t.overflowing)
               for s, t in zip(inputs.encodings, labels.encodings)]
        return {**inputs, "labels": labels["input_ids"], "truncated": cut}

    def check_encoded(self, split: str, data: Any) -> None:
        # From the stored column, so a run that reads the tokenized cache reports the same counts.
        cut = data["truncated"]
        for kind, bit, limit in (("source_truncated", SOURCE_CUT, "max_source_length"),
                                 ("target_truncated", TARGET_CUT, "max_target_length")):
            count = sum(1 for c in cut if c & bit)
            if count:
                self.problems.setdefault(split, {})[kind] = count
                log.warning("%d of %d %s %ss were longer than dataset.%s=%d tokens and were cut: raise it to keep "
                            "them whole.", count, len(cut), split, kind.split("_")[0], limit,
                            getattr(self, limit))

    def check_tokenizer(self, tokenizer: Any) -> Any:
        # No length check: T5's relative positions take sources of any length, whatever model_max_length says.
        return tokenizer

    def make_collator(self) -> Any:
        from transformers import DataCollatorForSeq2Seq

        # Labels padded with -100: the loss ignores them (the model turns them into pad for its decoder input).
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100,
                                      pad_to_multiple_of=self.pad_to_multiple_of)

    def collate(self, features: list[dict]) -> dict:
        return self.collator([{k: v for k, v in f.items() if k != "truncated"} for f in features])

    def collate_packed(self, features: list[dict]) -> dict:
        """The padded batch packed into rows: sources as every task packs them, each example's target in the row
        of its source (``pack_targets``)."""
        return pack_targets(super().collate_packed(features), self.pad_to_multiple_of)

    def references(self, split: str) -> list[list[str]]:
        """Every reference text of each row of ``split``, by row index."""
        self._prepare()
        return self._references[split]

    def sources(self, split: str) -> list[str]:
        self._prepare()
        return self._sources[split]

    def head_kwargs(self) -> dict[str, Any]:
        return {"source_prefix": self.source_prefix, "max_source_length": self.max_source_length}


def pack_targets(batch: dict[str, torch.Tensor], multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """A packed batch of sources (``lightning_ft.packing.pack_batch``) whose ``labels`` are still one padded row per
    example, with each example's target laid out in its source's row, in the same order: ``labels`` (rows x width,
    -100 outside the targets), ``decoder_segment_ids`` (the source's segment number, 0 for padding: the
    cross-attention pairs them), and each example's ``decoder_starts`` and ``decoder_lengths``."""
    targets = batch["labels"]
    kept = targets != -100
    lengths = kept.sum(-1)
    rows, starts = batch["example_rows"], batch["example_starts"]
    segments = batch["segment_ids"][rows, starts]
    # Targets follow their sources' order within a row: sort the examples by (row, start) and take a running sum of
    # lengths that restarts at each row. Tensor operations rather than a loop over rows: this runs in every collate.
    order = torch.argsort(rows * (int(starts.max()) + 1) + starts)
    sorted_rows, sorted_lengths = rows[order], lengths[order]
    before = sorted_lengths.cumsum(0) - sorted_lengths
    row_first = torch.zeros(len(batch["input_ids"]), dtype=before.dtype).scatter_reduce(
        0, sorted_rows, before, reduce="amin", include_self=False)
    decoder_starts = torch.empty_like(lengths)
    decoder_starts[order] = before - row_first[sorted_rows]
    width = int(max((decoder_starts + lengths).max(), 1))
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    labels = torch.full((len(batch["input_ids"]), width), -100, dtype=targets.dtype)
    decoder_segments = torch.zeros(labels.shape, dtype=torch.long)
    # Each kept target token goes to its example's row, at its start plus its place among the example's kept tokens
    # (targets[kept] lists them example by example, so per-example values repeat once per kept token).
    row_of = rows.repeat_interleave(lengths)
    column_of = (decoder_starts[:, None] + kept.cumsum(-1) - 1)[kept]
    labels[row_of, column_of] = targets[kept]
    decoder_segments[row_of, column_of] = segments.repeat_interleave(lengths)
    return {**batch, "labels": labels, "decoder_segment_ids": decoder_segments, "decoder_starts": decoder_starts,
            "decoder_lengths": lengths}
