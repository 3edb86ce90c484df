"""The data: text (or text pairs) with a label; the problem type and label set come from the training split."""

from __future__ import annotations

import math
from typing import Any

from lightning_ft.data.base import TaskDataModule
from lightning_ft.errors import UserError

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"


PROBLEM_TYPES = (SINGLE, MULTI, REGRESSION)


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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise UserError(f"dataset.problem_type '{problem_type}' is not one of {', '.join(PROBLEM_TYPES)}.")
        self.text_column = text_column
        self.text_columns = [text_column] if isinstance(text_column, str) else list(text_column or [])
        if not self.text_columns or not all(isinstance(c, str) and c for c in self.text_columns):
            raise UserError(f"dataset.text_column {text_column!r} names no column: give a column name or a list of "
                            "them (dataset.text_column=[title,description]).")
        self.text_separator = text_separator
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.problem_type = problem_type
        self.label_names = list(label_names) if label_names else None
        self.label_separator = label_separator
        self.label2id: dict[Any, int] = {}

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
        """What the classifier head needs to know about the labels."""
        return {"num_labels": self.num_labels, "id2label": self.id2label, "problem_type": self.problem_type}

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

    def predict_columns(self) -> dict[str, Any]:
        single = self.text_columns[0] if len(self.text_columns) == 1 else None  # predict reads one text column
        return {"column": single, "pair_column": self.text_pair_column}

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
        }

    def texts(self, batch: dict[str, list]) -> list:
        """The text of each row: its ``text_column``, or its text columns joined with ``text_separator``."""
        if len(self.text_columns) == 1:
            return batch[self.text_columns[0]]
        return [self.text_separator.join(str(v) for v in values if v is not None)
                for values in zip(*(batch[c] for c in self.text_columns))]

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        pairs = batch[self.text_pair_column] if self.text_pair_column else None
        encoding = self.tokenizer(self.texts(batch), pairs, truncation=True, max_length=self.max_length)
        self.count_truncated(encoding)
        labels = batch[self.label_column]
        if self.problem_type == REGRESSION:
            encoding["labels"] = [float(v) for v in labels]
        elif self.problem_type == MULTI:
            encoding["labels"] = [self._multi_hot(v) for v in labels]
        else:
            encoding["labels"] = [self.label2id[v] for v in labels]
        return dict(encoding)

    def _multi_hot(self, value: Any) -> list[float]:
        hot = [0.0] * len(self.label2id)
        for label in self._labels_of(value):
            hot[self.label2id[label]] = 1.0
        return hot
