"""The data: scored pairs, or (anchor, positive[, negative]) pairs, tokenized per text."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from lightning_ft.data.base import TaskDataModule
from lightning_ft.errors import UserError

log = logging.getLogger(__name__)


POOLINGS = ("mean", "cls", "max")


TEXT_GROUPS = ("", "pair_", "negative_")  # key prefixes of the anchor, its pair and the optional hard negative


# ---- data ----------------------------------------------------------------------------------------------------------
class SimilarityData(TaskDataModule):
    """Text pairs in ``text_column`` and ``text_pair_column``, with a score in ``score_column`` (scored splits) or not
    (pair splits), and optionally a hard negative in ``negative_column`` for training.

    Args:
        score_scale: scores are divided by it for the cosine loss (5 for STS-B's 0-5 scale); scaled scores must lie in
            [-1, 1]. Correlations do not depend on it.
        score_column: null reads every split as pairs (contrastive training, retrieval evaluation).
    """

    keep_row_index = True
    packed_token_keys = ("input_ids",)

    def __init__(
        self,
        *,
        text_column: str = "sentence1",
        text_pair_column: str = "sentence2",
        score_column: str | None = "score",
        negative_column: str | None = None,
        score_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if score_scale <= 0:
            raise UserError(f"dataset.score_scale must be positive (got {score_scale}).")
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.score_column = score_column
        self.negative_column = negative_column
        self.score_scale = float(score_scale)
        self.scored: dict[str, bool] = {}

    def _check_columns(self, raw: dict[str, Any]) -> None:
        self.scored = {split: bool(self.score_column) and self.score_column in data.column_names
                       for split, data in raw.items()}
        if self.score_column and not any(self.scored.values()):
            raise UserError(
                f"no split has the score column '{self.score_column}' (train has: "
                f"{', '.join(raw['train'].column_names)}): fix dataset.score_column, or set dataset.score_column=null "
                "to read every split as (anchor, positive) pairs."
            )
        if self.negative_column and self.negative_column not in raw["train"].column_names:
            raise UserError(
                f"column '{self.negative_column}' (dataset.negative_column) is missing from the train split (it has: "
                f"{', '.join(raw['train'].column_names)}): fix the name or set dataset.negative_column=null."
            )
        if self.negative_column and self.scored["train"]:
            raise UserError(
                "the train split has scores and hard negatives: the cosine loss uses no negatives. Set "
                "dataset.negative_column=null, or dataset.score_column=null to train with in-batch negatives."
            )
        super()._check_columns(raw)
        kinds = ", ".join(f"{split} {'scored' if scored else 'pairs'}" for split, scored in self.scored.items())
        log.info("similarity splits: %s", kinds)

    def _text_columns(self, split: str) -> list[str]:
        columns = [self.text_column, self.text_pair_column]
        return columns + ([self.negative_column] if split == "train" and self.negative_column else [])

    def predict_columns(self) -> dict[str, Any]:
        return {"column": self.text_column}

    def required_columns(self, split: str) -> list[str]:
        return self._text_columns(split) + ([self.score_column] if self.scored.get(split) else [])

    def check_split(self, split: str, data: Any) -> None:
        for column in self._text_columns(split):
            for row, text in enumerate(data[column]):
                if not isinstance(text, str) or not text.strip():
                    raise UserError(
                        f"row {row} of the {split} split has no text in column '{column}': fill or drop the row."
                    )
        if not self.scored.get(split):
            return
        for row, value in enumerate(data[self.score_column]):
            if not isinstance(value, (int, float)) or value != value:
                raise UserError(f"row {row} of the {split} split has a non-numeric score {value!r}.")
            if not -1.0 <= value / self.score_scale <= 1.0:
                raise UserError(
                    f"score {value} in row {row} of the {split} split is outside [-1, 1] after dividing by "
                    f"dataset.score_scale={self.score_scale:g}: set dataset.score_scale to the top of the score range "
                    "(5 for STS-B)."
                )

    def head_kwargs(self) -> dict[str, Any]:
        """Which evaluation each split gets (and the length limit the export records)."""
        return {
            "scored_eval": {stage: self.scored.get(split, False) for stage, split in (("val", "validation"),
                                                                                       ("test", "test"))},
            "max_seq_length": self.max_length,
        }

    def preprocessing_settings(self) -> dict[str, Any]:
        return {
            **super().preprocessing_settings(),
            "columns": [self.text_column, self.text_pair_column, self.negative_column, self.score_column],
            "score_scale": self.score_scale,
        }

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {}
        columns = [self.text_column, self.text_pair_column, self.negative_column]
        for prefix, column in zip(TEXT_GROUPS, columns):
            if column and column in batch:
                encoding = self.tokenizer(batch[column], truncation=True, max_length=self.max_length)
                self.count_truncated(encoding)
                out[f"{prefix}input_ids"] = encoding["input_ids"]
                out[f"{prefix}attention_mask"] = encoding["attention_mask"]
        if self.score_column and self.score_column in batch:
            out["labels"] = [float(v) / self.score_scale for v in batch[self.score_column]]
        return out

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # Each text of the pair is padded on its own (no padding of short anchors to long positives).
        batch: dict[str, torch.Tensor] = {}
        multiple = self.pad_to_multiple_of or 1
        pad_id = self.tokenizer.pad_token_id or 0
        for prefix in TEXT_GROUPS:
            key = f"{prefix}input_ids"
            if key not in features[0]:
                continue
            longest = max(len(f[key]) for f in features)
            longest = -(-longest // multiple) * multiple
            ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(features), longest), dtype=torch.long)
            for i, f in enumerate(features):
                ids[i, : len(f[key])] = torch.tensor(f[key])
                mask[i, : len(f[key])] = 1
            batch[key], batch[f"{prefix}attention_mask"] = ids, mask
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.float)
        batch["row_index"] = torch.tensor([f["row_index"] for f in features], dtype=torch.long)
        return batch

    def collate_packed(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Every text of the batch (its anchors, then their pairs, then any hard negatives) packed into rows."""
        from lightning_ft.packing import pack_batch

        batch = self.collate(features)
        groups = [p for p in TEXT_GROUPS if f"{p}input_ids" in batch]
        width = max(batch[f"{p}input_ids"].shape[1] for p in groups)
        pad_id = self.tokenizer.pad_token_id or 0

        def stacked(key: str, fill: int) -> torch.Tensor:
            return torch.cat([F.pad(batch[f"{p}{key}"], (0, width - batch[f"{p}{key}"].shape[1]), value=fill)
                              for p in groups])

        texts = {"input_ids": stacked("input_ids", pad_id), "attention_mask": stacked("attention_mask", 0)}
        rest = {k: v for k, v in batch.items() if not k.endswith(("input_ids", "attention_mask"))}
        return {**rest, **pack_batch(texts, self.max_length, ("input_ids",), pad_id, self.pad_to_multiple_of)}
