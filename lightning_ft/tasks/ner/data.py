"""The data: sentences as words with a tag per word, aligned to sub-tokens; CoNLL column files or tabular rows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch

from lightning_ft.data.base import TaskDataModule, check_window_room, check_window_settings
from lightning_ft.data.conll import read_conll
from lightning_ft.errors import UserError
from lightning_ft.metrics.entity import PREFIXES

log = logging.getLogger(__name__)


IGNORE = -100


# Files read by `datasets` builders; any other extension (.txt, .conll, .iob, .tsv, none...) is a CoNLL column file.
_TABULAR = {".json", ".jsonl", ".parquet", ".csv"}


def order_labels(labels: set[str]) -> list[str]:
    """A stable label order: ``O``, then by entity type with prefixes B, I, E, S; other tags alphabetically."""

    def key(label: str) -> tuple:
        if label == "O":
            return (0, "", 0)
        if label.startswith(PREFIXES):
            return (1, label[2:], "BIES".index(label[0]))
        return (2, label, 0)

    return sorted(labels, key=key)


def first_subtoken_index(word_ids: Sequence[int | None]) -> list[int]:
    """Per token, the word whose first sub-token it is, else ``IGNORE`` (special tokens, later sub-tokens)."""
    index, previous = [], None
    for word in word_ids:
        index.append(word if word is not None and word != previous else IGNORE)
        previous = word
    return index


def word_windows(tokenizer: Any, sentences: list[list[str]], max_length: int, stride: int) -> list[list[dict]]:
    """Each sentence as overlapping windows of at most ``max_length`` sub-tokens, ``stride`` shared by neighbours
    (the tokenizer's own overflow). A window is its encoding (``input_ids``, ``attention_mask``...) with, per token:
    ``word_ids`` (the tokenizer's); ``first``, the word whose first sub-token it is (else ``IGNORE``; a word a
    window starts inside of has none there); and ``chosen``, the same for the words read from this window only,
    each word's most central window (the most context on its shorter side), so a sentence's windows name every word
    exactly once."""
    encoding = tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=max_length, stride=stride,
                         return_overflowing_tokens=True)
    owner = encoding["overflow_to_sample_mapping"]
    keys = [k for k in encoding if k != "overflow_to_sample_mapping"]
    # The whole sentence's sub-tokens, to place each window in it: the tokenizer's overflow starts a window
    # ``stride`` sub-tokens before the previous one ended, which may be inside a word.
    whole = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False)
    windows: list[list[dict]] = [[] for _ in sentences]
    start = [0] * len(sentences)  # where, in the whole sentence, the next window's sub-tokens begin
    for i, sentence in enumerate(owner):
        word_ids = encoding.word_ids(i)
        first = first_subtoken_index(word_ids)
        content = [p for p, w in enumerate(word_ids) if w is not None]
        at, everything = start[sentence], whole.word_ids(sentence)
        if content and 0 < at < len(everything) and everything[at - 1] == everything[at] == word_ids[content[0]]:
            first[content[0]] = IGNORE  # the window begins inside a word: its first sub-token is in an earlier one
        start[sentence] = at + len(content) - stride
        window = {k: encoding[k][i] for k in keys}
        window["first"], window["word_ids"] = first, word_ids
        window["room"] = [min(p - content[0], content[-1] - p) if first[p] >= 0 else -1 for p in range(len(first))]
        windows[sentence].append(window)
    for sentence_windows in windows:
        best: dict[int, tuple[int, int]] = {}  # word -> (room, window)
        for w, window in enumerate(sentence_windows):
            for p, word in enumerate(window["first"]):
                if word >= 0 and (word not in best or window["room"][p] > best[word][0]):
                    best[word] = (window["room"][p], w)
        for w, window in enumerate(sentence_windows):
            window["chosen"] = [word if word >= 0 and best[word][1] == w else IGNORE for word in window["first"]]
            del window["room"]
    return windows


def require_fast_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"token classification needs a fast tokenizer (it maps sub-tokens back to words with word_ids), but "
            f"{type(tokenizer).__name__} is a slow one: use a backbone whose directory has a tokenizer.json, or save "
            "a fast tokenizer with AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir)."
        )


class TokenClassificationData(TaskDataModule):
    """Sentences as word lists (``tokens_column``) with one tag per word (``label_column``).

    Local CoNLL column files (any extension but json/jsonl/parquet/csv; ``-DOCSTART-`` lines and blank-line
    sentence breaks handled) or tabular files/hub datasets with list columns. Tags may be strings or integer ids
    (with ``label_names`` or a hub ``ClassLabel`` naming them).

    Args:
        columns: names of a CoNLL file's columns; null = ``tokens ner_tags`` for two columns,
            ``tokens pos_tags chunk_tags ner_tags`` for four (CoNLL-2003).
        label_names: the label order; null = learned from the training split (``O`` first, then by type).
        label_all_tokens: tag every sub-token of a word (``B-`` becomes ``I-`` after the first), not only the first.
        group_by_length: batch sentences of similar length (off by default: faster, but it cost F1 on CoNLL-2003).
        unseen_tags: a validation/test tag the training split lacks: ``error`` (default), or ``add`` it to the label
            set with a warning (the model never learns it, so it counts as missed; CoNLL-2003's chunk tags need it).
        long_inputs: ``truncate`` (the words of a sentence past ``max_length`` sub-tokens are cut off and tagged
            ``O``) or ``window``: a long sentence is read in overlapping windows of ``max_length`` sub-tokens,
            ``stride`` of them shared by neighbours; training takes every window, evaluation and predict tag each
            word from the window where it has the most context on both sides, and score whole sentences.
    """

    packed_token_keys = ("input_ids", "token_type_ids", "labels")

    def __init__(
        self,
        *,
        tokens_column: str = "tokens",
        label_column: str = "ner_tags",
        columns: list[str] | None = None,
        label_names: list[str] | None = None,
        label_all_tokens: bool = False,
        unseen_tags: str = "error",
        group_by_length: bool = False,
        long_inputs: str = "truncate",
        stride: int = 32,
        **kwargs: Any,
    ) -> None:
        if unseen_tags not in ("error", "add"):
            raise UserError(f"dataset.unseen_tags is '{unseen_tags}': use error or add.")
        check_window_settings(long_inputs, stride)
        self.long_inputs, self.stride = long_inputs, stride
        self.unseen_tags = unseen_tags
        self.tokens_column = tokens_column
        self.label_column = label_column
        self.columns = list(columns) if columns else None
        self.label_names = list(label_names) if label_names else None
        self.label_all_tokens = label_all_tokens
        self.label2id: dict[str, int] = {}
        self.windowed: dict[str, int] = {}  # split -> sentences longer than max_length, read in windows
        self.lost_words: dict[str, tuple[int, int, int]] = {}  # split -> (sentences cut, words cut, empty words)
        # group_by_length is off by default here, unlike sentence-level tasks: on CoNLL-2003, one epoch of
        # length-grouped batches (2.3x faster) ended 1.5 F1 points lower, with the HF Trainer's own grouping as with
        # ours (benchmarks/RESULTS.md). Last: a tokenizer given here is checked with the settings above.
        super().__init__(group_by_length=group_by_length, **kwargs)

    def check_tokenizer(self, tokenizer: Any) -> Any:
        require_fast_tokenizer(tokenizer)
        if getattr(tokenizer, "add_prefix_space", None) is False:
            # Byte-level BPE (RoBERTa, GPT-2, DeBERTa) refuses pre-split words unless it adds the space itself.
            tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path, add_prefix_space=True)
        if self.long_inputs == "window":
            check_window_room(tokenizer, self.max_length, self.stride)
        return super().check_tokenizer(tokenizer)

    # ---- reading -----------------------------------------------------------------------------------------------
    def read_local(self, split: str, paths: list[Path]) -> Any:
        if any(s in _TABULAR for s in paths[0].suffixes):
            return super().read_local(split, paths)
        import datasets

        rows: dict[str, list] = {}
        for path in paths:
            for name, values in read_conll(path, self.columns).items():
                rows.setdefault(name, []).extend(values)
        return datasets.Dataset.from_dict(rows)

    def load_raw(self) -> dict[str, Any]:
        raw = super().load_raw()
        for split, data in raw.items():
            if self.label_column in data.column_names:
                raw[split] = self._tags_as_names(split, data)
        return raw

    def _tags_as_names(self, split: str, data: Any) -> Any:
        """Integer tag ids (a hub ``ClassLabel`` or ids in a file) become label names."""
        feature = getattr(data.features[self.label_column], "feature", None)
        if feature is None or getattr(feature, "dtype", "string") == "string":
            return data
        names = getattr(feature, "names", None) or self.label_names
        if not names:
            raise UserError(
                f"column '{self.label_column}' of the {split} split holds integer tag ids: name them in "
                "dataset.label_names (in id order)."
            )
        if self.label_names is None:
            self.label_names = list(names)
        column = self.label_column

        def to_names(batch: dict[str, list]) -> dict[str, list]:
            try:
                return {column: [[names[i] for i in row] for row in batch[column]]}
            except IndexError:
                raise UserError(
                    f"the {split} split has a tag id beyond dataset.label_names ({len(names)} names)."
                ) from None

        import datasets

        features = data.features.copy()
        features[column] = datasets.Sequence(datasets.Value("string"))
        return data.map(to_names, batched=True, features=features, desc=f"Naming {split} tags")

    # ---- labels ------------------------------------------------------------------------------------------------
    def fit_labels(self, train: Any) -> None:
        seen = {tag for row in train[self.label_column] for tag in row}
        if self.label_names is not None:
            unknown = sorted(seen - set(self.label_names))
            if unknown:
                raise UserError(f"tag '{unknown[0]}' in the train split is not in dataset.label_names: add it there.")
            names = self.label_names
        else:
            names = order_labels(seen)
        if len(names) < 2:
            raise UserError(
                f"the train split has a single tag ({names[0] if names else 'none'}) in column "
                f"'{self.label_column}': check dataset.label_column (or task.label_column)."
            )
        self.label2id = {name: i for i, name in enumerate(names)}

    def _where(self, data: Any, row: int, word: int | None = None) -> str:
        if "location" in data.column_names:  # a CoNLL file: name its file and line
            path, line = data[row]["location"].rsplit(":", 1)
            return f"{path}:{int(line) + (word or 0)}"
        return f"row {row}" + (f", word {word}" if word is not None else "")

    def check_split(self, split: str, data: Any) -> None:
        tokens, tags = data[self.tokens_column], data[self.label_column]
        for row, (words, row_tags) in enumerate(zip(tokens, tags)):
            if len(words) != len(row_tags):
                raise UserError(
                    f"{self._where(data, row)} of the {split} split has {len(words)} tokens but {len(row_tags)} tags "
                    f"in '{self.label_column}': give one tag per token."
                )
            for word, tag in enumerate(row_tags):
                if tag in self.label2id:
                    continue
                if self.unseen_tags == "add" and split != "train":
                    log.warning("tag '%s' first seen at %s (%s split) is not in the train split: added to the label "
                                "set; the model never learns it.", tag, self._where(data, row, word), split)
                    self.label2id[tag] = len(self.label2id)
                    continue
                raise UserError(
                    f"tag '{tag}' at {self._where(data, row, word)} ({split} split) never appears in the train "
                    f"split (known: {', '.join(self.label2id)}): add training sentences with it, list it in "
                    "dataset.label_names, set dataset.unseen_tags=add, or fix the tag."
                )

    @property
    def id2label(self) -> dict[int, str]:
        return {i: name for name, i in self.label2id.items()}

    def head_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.label2id), "id2label": self.id2label}

    # ---- preprocessing -----------------------------------------------------------------------------------------
    def predict_columns(self) -> dict[str, Any]:
        # A windowed model tags in the windows it was trained on: their length too.
        windows = ({"long_inputs": "window", "stride": self.stride, "max_length": self.max_length}
                   if self.long_inputs == "window" else {})
        return {"tokens_column": self.tokens_column, **windows}

    def required_columns(self, split: str) -> list[str]:
        return [self.tokens_column, self.label_column]

    def preprocessing_settings(self) -> dict[str, Any]:
        return {
            **super().preprocessing_settings(),
            "label2id": sorted(self.label2id.items()),
            "label_all_tokens": self.label_all_tokens,
            **({"long_inputs": "window", "stride": self.stride} if self.long_inputs == "window" else {}),
        }

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        if self.long_inputs == "window":
            return self._encode_windows(batch)
        encoding = self.tokenizer(
            batch[self.tokens_column], is_split_into_words=True, truncation=True, max_length=self.max_length
        )
        inside = {i: self.label2id.get("I-" + name[2:], i) for name, i in self.label2id.items() if name[:2] == "B-"}
        labels, word_index, word_labels = [], [], []
        for row, tags in enumerate(batch[self.label_column]):
            tag_ids = [self.label2id[tag] for tag in tags]
            word_ids = encoding.word_ids(row)
            row_index = first_subtoken_index(word_ids)
            row_labels = []
            for word, first in zip(word_ids, row_index):
                if word is None:  # special tokens
                    row_labels.append(IGNORE)
                elif first >= 0:
                    row_labels.append(tag_ids[word])
                else:  # a later sub-token of the word
                    row_labels.append(inside.get(tag_ids[word], tag_ids[word]) if self.label_all_tokens else IGNORE)
            labels.append(row_labels)
            word_index.append(row_index)
            word_labels.append(tag_ids)
        return {**encoding, "labels": labels, "word_index": word_index, "word_labels": word_labels}

    def _encode_windows(self, batch: dict[str, list]) -> dict[str, list]:
        """Training rows: one per window (its words' tags at their first sub-tokens). Evaluation rows: one per
        sentence, holding its windows (``window_input_ids``...), each word labelled and read in one of them only
        (``word_windows``'s ``chosen``), so the loss and the metrics count every word once."""
        inside = {i: self.label2id.get("I-" + name[2:], i) for name, i in self.label2id.items() if name[:2] == "B-"}
        train = self._current_split == "train"
        rows: dict[str, list] = {}
        sentences = batch[self.tokens_column]
        for tags, windows in zip(batch[self.label_column],
                                 word_windows(self.tokenizer, sentences, self.max_length, self.stride)):
            tag_ids = [self.label2id[tag] for tag in tags]
            encoded = []
            for window in windows:
                first, chosen, word_ids = window.pop("first"), window.pop("chosen"), window.pop("word_ids")
                labelled = first if train else chosen
                labels = []
                for token, word in enumerate(word_ids):
                    if labelled[token] >= 0:
                        labels.append(tag_ids[labelled[token]])
                    elif train and self.label_all_tokens and word is not None:
                        labels.append(inside.get(tag_ids[word], tag_ids[word]))
                    else:
                        labels.append(IGNORE)
                encoded.append({**window, "labels": labels, "word_index": chosen})
            if train:
                for window in encoded:
                    for key, value in window.items():
                        rows.setdefault(key, []).append(value)
                    rows.setdefault("word_labels", []).append(tag_ids)
            else:
                for key in encoded[0]:
                    rows.setdefault(f"window_{key}", []).append([window[key] for window in encoded])
                rows.setdefault("word_labels", []).append(tag_ids)
            self.windowed[self._current_split] = self.windowed.get(self._current_split, 0) + (len(windows) > 1)
        return rows

    def check_encoded(self, split: str, data: Any) -> None:
        if self.long_inputs == "window":
            if self.windowed.get(split):
                log.info("%s split: %d sentences are longer than max_length=%d tokens and are read in overlapping "
                         "windows (dataset.long_inputs=window, stride %d).", split, self.windowed[split],
                         self.max_length, self.stride)
            return
        table = data.with_format("arrow")
        totals = pc.list_value_length(table["word_labels"]).to_pylist()
        cut = empty = cut_sentences = 0
        for total, row in zip(totals, table["word_index"].to_pylist()):
            seen = [w for w in row if w >= 0]
            last = max(seen, default=-1) + 1  # words after the last one in view were cut off by max_length
            cut += total - last
            cut_sentences += total > last
            empty += last - len(seen)  # words before it with no sub-token at all (e.g. a lone control character)
        self.lost_words[split] = (cut_sentences, cut, empty)
        if cut:
            log.warning(
                "%s split: %d of %d sentences are longer than max_length=%d tokens; %d of their words were cut off. "
                "They are predicted 'O' and still count at evaluation: raise dataset.max_length to keep them.",
                split, cut_sentences, len(totals), self.max_length, cut,
            )
        if empty:
            log.warning(
                "%s split: %d words have no sub-token (the tokenizer drops them, e.g. control or zero-width "
                "characters); they are predicted 'O' and still count at evaluation.", split, empty,
            )

    def make_collator(self) -> Any:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(self.tokenizer, pad_to_multiple_of=self.pad_to_multiple_of)

    def collate(self, features: list[dict]) -> dict:
        if "window_input_ids" in features[0]:
            return self._collate_windows(features)
        word_index = [f.pop("word_index") for f in features]
        word_labels = [f.pop("word_labels") for f in features]
        batch = self.collator(features)
        batch["word_index"] = _pad(word_index, batch["input_ids"].shape[1], self.tokenizer.padding_side)
        batch["word_labels"] = _pad(word_labels, max(map(len, word_labels), default=0), "right")
        return batch

    def _collate_windows(self, features: list[dict]) -> dict:
        """Windowed sentences (evaluation): a batch of all their windows, each window's sentence
        (``window_document``), and the sentences' tags (``word_labels``, one row per sentence)."""
        windows, word_index, owner = [], [], []
        for sentence, feature in enumerate(features):
            for w in range(len(feature["window_input_ids"])):
                window = {k.removeprefix("window_"): feature[k][w] for k in feature if k.startswith("window_")}
                word_index.append(window.pop("word_index"))
                windows.append(window)
                owner.append(sentence)
        batch = dict(self.collator(windows))
        word_labels = [f["word_labels"] for f in features]
        batch["word_index"] = _pad(word_index, batch["input_ids"].shape[1], self.tokenizer.padding_side)
        batch["word_labels"] = _pad(word_labels, max(map(len, word_labels), default=0), "right")
        batch["window_document"] = torch.tensor(owner)
        return batch


def _pad(rows: list[list[int]], length: int, side: str) -> torch.Tensor:
    out = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if side == "left":
                out[i, length - len(row):] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out
