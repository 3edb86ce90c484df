"""The data: text (or text pairs) with a label; the problem type and label set come from the training split."""

from __future__ import annotations

import logging
import math
from typing import Any

from lightning_ft.data.base import TaskDataModule, check_window_room, check_window_settings
from lightning_ft.errors import UserError

log = logging.getLogger(__name__)

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"


PROBLEM_TYPES = (SINGLE, MULTI, REGRESSION)
WINDOW_REDUCTIONS = ("mean", "max")
# An evaluation row of a windowed split holds its document's windows under these names (one list per window).
WINDOW_PREFIX = "window_"


class TextClassificationData(TaskDataModule):
    """Rows of ``text_column`` (and ``text_pair_column`` for pairs) with a label in ``label_column``.

    Args:
        text_column: the text's column, or a list of columns joined with ``text_separator`` into one text (AG News'
            ``[title, description]``).
        text_separator: what joins the columns of a list ``text_column`` (a space).
        problem_type: ``single_label_classification``, ``multi_label_classification`` or ``regression``;
            inferred from the training labels when null.
        label_names: the label order (and, for integer labels, their names); from the training data when null.
        label_separator: split string labels on it to get multi-label lists (e.g. ``"a,b"`` in a CSV).
        long_inputs: ``truncate`` (a text past ``max_length`` tokens loses the rest) or ``window``: each text is
            read in overlapping windows of ``max_length`` tokens, ``stride`` of them shared by neighbours; training
            takes every window as an example with its document's label, evaluation and predict score each document
            once, from its windows' logits combined by ``window_reduce`` (``mean`` or ``max``). For pairs, the
            second text is windowed and the first repeated in each window.
    """

    packed_token_keys = ("input_ids", "token_type_ids")

    def __init__(
        self,
        *,
        text_column: str | list[str] = "text",
        text_separator: str = " ",
        text_pair_column: str | None = None,
        label_column: str = "label",
        problem_type: str | None = None,
        label_names: list[str] | None = None,
        label_separator: str | None = None,
        long_inputs: str = "truncate",
        stride: int = 32,
        window_reduce: str = "mean",
        **kwargs: Any,
    ) -> None:
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise UserError(f"dataset.problem_type '{problem_type}' is not one of {', '.join(PROBLEM_TYPES)}.")
        check_window_settings(long_inputs, stride)
        if window_reduce not in WINDOW_REDUCTIONS:
            raise UserError(f"dataset.window_reduce={window_reduce!r} is not one of {', '.join(WINDOW_REDUCTIONS)}.")
        # Before the base class connects the tokenizer: check_tokenizer reads them.
        self.long_inputs, self.stride, self.window_reduce = long_inputs, stride, window_reduce
        self.text_pair_column = text_pair_column
        super().__init__(**kwargs)
        self.text_column = text_column
        self.text_columns = [text_column] if isinstance(text_column, str) else list(text_column or [])
        if not self.text_columns or not all(isinstance(c, str) and c for c in self.text_columns):
            raise UserError(f"dataset.text_column {text_column!r} names no column: give a column name or a list of "
                            "them (dataset.text_column=[title,description]).")
        self.text_separator = text_separator
        self.label_column = label_column
        self.problem_type = problem_type
        self.label_names = list(label_names) if label_names else None
        self.label_separator = label_separator
        self.label2id: dict[Any, int] = {}
        self.windowed: dict[str, int] = {}  # split -> documents longer than max_length, read in windows

    # ---- labels ------------------------------------------------------------------------------------------------
    def _labels_of(self, value: Any) -> list:
        if self.label_separator is not None and isinstance(value, str):
            return [v.strip() for v in value.split(self.label_separator) if v.strip()]
        return list(value)

    def fit_labels(self, train: Any) -> None:
        values = train[self.label_column]
        if self.problem_type is None:
            self.problem_type = self._infer_problem_type(values)
        if self.problem_type == REGRESSION:
            self.label2id = {}
            return
        feature = train.features[self.label_column]
        if self.problem_type == MULTI:
            seen = sorted({v for row in values for v in self._labels_of(row)}, key=str)
        else:
            seen = sorted(set(values), key=lambda v: (isinstance(v, str), v))
        if self.label_names is None and hasattr(feature, "names"):  # a hub ClassLabel carries its names
            self.label_names = list(feature.names)
        if self.label_names is not None:
            if all(isinstance(v, int) for v in seen):  # integer labels index into the given names
                bad = [v for v in seen if not 0 <= v < len(self.label_names)]
                if bad:
                    raise UserError(
                        f"label {bad[0]} in the train split has no entry in dataset.label_names "
                        f"({len(self.label_names)} names): give one name per label index."
                    )
                self.label2id = {i: i for i in range(len(self.label_names))}
            else:
                unknown = [v for v in seen if v not in self.label_names]
                if unknown:
                    raise UserError(
                        f"label '{unknown[0]}' in the train split is not in dataset.label_names: add it there."
                    )
                self.label2id = {name: i for i, name in enumerate(self.label_names)}
        else:
            self.label2id = {v: i for i, v in enumerate(seen)}
        if len(self.label2id) < 2 and self.problem_type == SINGLE:
            raise UserError(
                f"the train split has a single label ({seen[0]!r}) in column '{self.label_column}': a classifier "
                "needs at least two; check dataset.label_column."
            )

    def _infer_problem_type(self, values: list) -> str:
        first = next((v for v in values if v is not None), None)
        if isinstance(first, (list, tuple)) or (self.label_separator is not None and isinstance(first, str)):
            return MULTI
        if isinstance(first, float) and any(not float(v).is_integer() for v in values if v is not None):
            return REGRESSION
        return SINGLE

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == REGRESSION else len(self.label2id)

    @property
    def id2label(self) -> dict[int, str]:
        if self.problem_type == REGRESSION:
            return {0: self.label_column}
        if self.label_names is not None:
            return dict(enumerate(self.label_names))
        return {i: str(v) for v, i in self.label2id.items()}

    def head_kwargs(self) -> dict[str, Any]:
        """What the classifier head needs to know about the labels (and how it combines a document's windows)."""
        return {"num_labels": self.num_labels, "id2label": self.id2label, "problem_type": self.problem_type,
                "window_reduce": self.window_reduce}

    def check_tokenizer(self, tokenizer: Any) -> Any:
        tokenizer = super().check_tokenizer(tokenizer)
        if self.long_inputs == "window":
            check_window_room(tokenizer, self.max_length, self.stride, pair=bool(self.text_pair_column))
            if not getattr(tokenizer, "is_fast", False):
                raise UserError("dataset.long_inputs=window needs a fast (Rust) tokenizer, which this backbone does "
                                "not have: set dataset.long_inputs=truncate.")
        return tokenizer

    def check_split(self, split: str, data: Any) -> None:
        if self.label_column not in data.column_names:
            return
        for row, value in enumerate(data[self.label_column]):
            if value is None:
                raise UserError(f"row {row} of the {split} split has no label in column '{self.label_column}'.")
            if self.problem_type == REGRESSION:
                if not isinstance(value, (int, float)) or math.isnan(value):
                    raise UserError(f"row {row} of the {split} split has a non-numeric score {value!r}.")
                continue
            for label in self._labels_of(value) if self.problem_type == MULTI else [value]:
                if label not in self.label2id:
                    raise UserError(
                        f"label {label!r} in row {row} of the {split} split never appears in the train split "
                        f"(known: {', '.join(map(str, self.label2id))}): add training examples with it, list it in "
                        "dataset.label_names, or drop those rows."
                    )

    # ---- preprocessing -----------------------------------------------------------------------------------------
    def required_columns(self, split: str) -> list[str]:
        columns = [*self.text_columns, self.label_column]
        return columns + ([self.text_pair_column] if self.text_pair_column else [])

    def label_columns(self) -> list[str]:
        return [self.label_column]

    def predict_columns(self) -> dict[str, Any]:
        single = self.text_columns[0] if len(self.text_columns) == 1 else None  # predict reads one text column
        # A windowed model predicts in the windows it was trained on: their length too.
        windows = ({"long_inputs": self.long_inputs, "stride": self.stride, "window_reduce": self.window_reduce,
                    "max_length": self.max_length} if self.long_inputs == "window" else {})
        return {"column": single, "pair_column": self.text_pair_column, **windows}

    def column_options(self) -> dict[str, str]:
        options = {self.label_column: "dataset.label_column", self.text_pair_column: "dataset.text_pair_column"}
        return {**options, **{c: "dataset.text_column" for c in self.text_columns}}

    def preprocessing_settings(self) -> dict[str, Any]:
        joined = {"text_column": self.text_columns, "text_separator": self.text_separator}
        return {
            **super().preprocessing_settings(),
            **(joined if len(self.text_columns) > 1 else {}),  # one column: the key of the caches made before
            "problem_type": self.problem_type,
            "label2id": sorted((str(k), v) for k, v in self.label2id.items()),
            "label_separator": self.label_separator,
            **({"long_inputs": "window", "stride": self.stride} if self.long_inputs == "window" else {}),
        }

    def texts(self, batch: dict[str, list]) -> list:
        """The text of each row: its ``text_column``, or its text columns joined with ``text_separator``."""
        if len(self.text_columns) == 1:
            return batch[self.text_columns[0]]
        return [self.text_separator.join(str(v) for v in values if v is not None)
                for values in zip(*(batch[c] for c in self.text_columns))]

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        pairs = batch[self.text_pair_column] if self.text_pair_column else None
        labels = [self._label_value(v) for v in batch[self.label_column]]
        if self.long_inputs == "window":
            return self._encode_windows(self.texts(batch), pairs, labels)
        encoding = self.tokenizer(self.texts(batch), pairs, truncation=True, max_length=self.max_length)
        self.count_truncated(encoding)
        encoding["labels"] = labels
        return dict(encoding)

    def _encode_windows(self, texts: list, pairs: list | None, labels: list) -> dict[str, list]:
        """Training rows: one per window, with its document's label. Evaluation rows: one per document, holding its
        windows (``window_input_ids``...), so a batch scores whole documents and each is counted once."""
        encoding = self.tokenizer(texts, pairs, truncation="only_second" if pairs else True,
                                  max_length=self.max_length, stride=self.stride, return_overflowing_tokens=True)
        owner = encoding.pop("overflow_to_sample_mapping")
        counts = [0] * len(texts)
        for document in owner:
            counts[document] += 1
        split = self._current_split
        self.windowed[split] = self.windowed.get(split, 0) + sum(1 for c in counts if c > 1)
        if split == "train":
            return {**dict(encoding), "labels": [labels[d] for d in owner]}
        rows: dict[str, list] = {f"{WINDOW_PREFIX}{key}": [[] for _ in texts] for key in encoding}
        for window, document in enumerate(owner):
            for key, values in encoding.items():
                rows[f"{WINDOW_PREFIX}{key}"][document].append(values[window])
        return {**rows, "labels": labels}

    def _label_value(self, value: Any) -> Any:
        if self.problem_type == REGRESSION:
            return float(value)
        if self.problem_type == MULTI:
            return self._multi_hot(value)
        return self.label2id[value]

    def check_encoded(self, split: str, data: Any) -> None:
        if self.windowed.get(split):
            log.info("%d %s examples were longer than max_length=%d tokens and are read in overlapping windows "
                     "(dataset.long_inputs=window, stride %d).", self.windowed[split], split, self.max_length,
                     self.stride)

    def collate(self, features: list[dict]) -> dict:
        """A padded batch; for windowed documents (evaluation), the batch of all their windows, with the document
        of each window (``window_document``) and each document's label (``document_labels``)."""
        if f"{WINDOW_PREFIX}input_ids" not in features[0]:
            return super().collate(features)
        import torch

        windows, owner = [], []
        for document, feature in enumerate(features):
            keys = [k for k in feature if k.startswith(WINDOW_PREFIX)]
            for w in range(len(feature[f"{WINDOW_PREFIX}input_ids"])):
                windows.append({k.removeprefix(WINDOW_PREFIX): feature[k][w] for k in keys})
                owner.append(document)
        batch = dict(self.collator(windows))
        labels = [f["labels"] for f in features]
        batch["window_document"] = torch.tensor(owner)
        batch["document_labels"] = torch.tensor(labels, dtype=torch.long if self.problem_type == SINGLE
                                                else torch.float)
        return batch

    def _multi_hot(self, value: Any) -> list[float]:
        hot = [0.0] * len(self.label2id)
        for label in self._labels_of(value):
            hot[self.label2id[label]] = 1.0
        return hot
