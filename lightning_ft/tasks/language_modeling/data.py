"""The data: raw text packed into blocks (causal LM) or masked (masked LM), from files, the hub or a stream."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch

from lightning_ft.data.base import SPLITS, TaskDataModule, _builder_for
from lightning_ft.errors import UserError

log = logging.getLogger(__name__)


OBJECTIVES = ("clm", "mlm")


PACKINGS = ("group_texts", "line_by_line")


DOCUMENT_ATTENTION = ("shared", "isolated")


DOCUMENTS = {"line": "line", "paragraph": "paragraph", "file": "document"}  # -> the text builder's sample_by


BATCH_DOCUMENTS = 1000  # documents packed together (the HF examples' map batch): the rest of a batch is dropped


def _restart_at_block(positions: list[int]) -> list[int]:
    """Positions counted from each document's start within the block (never past ``block_size``)."""
    restarted = [0]
    for position in positions[1:]:
        restarted.append(0 if position == 0 else restarted[-1] + 1)
    return restarted


class LanguageModelingData(TaskDataModule):
    """Text for language-model training, tokenized and packed into blocks.

    Args:
        objective: ``clm`` (next-token labels) or ``mlm`` (masked tokens); the task config sets it.
        text_column: the column of jsonl/csv/hub rows holding the text (``.txt`` files: one ``text`` column).
        documents: what a document of a ``.txt`` file is: a ``line``, a blank-line separated ``paragraph``, or
            the whole ``file``.
        packing: ``group_texts`` (concatenate and cut into ``block_size`` blocks) or ``line_by_line``.
        document_attention: ``shared`` (a block is one sequence) or ``isolated`` (packed documents do not attend
            to one another; needs a backbone that supports it).
        mlm_probability, whole_word_mask: masked-LM masking.
        streaming: read the files lazily (``datasets`` iterable dataset); ``shuffle_buffer`` blocks are shuffled.
    """

    def __init__(
        self,
        *,
        objective: str = "clm",
        text_column: str = "text",
        documents: str = "line",
        block_size: int = 128,
        packing: str = "group_texts",
        document_attention: str = "shared",
        mlm_probability: float = 0.15,
        whole_word_mask: bool = False,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        **kwargs: Any,
    ) -> None:
        for name, value, allowed in (("objective", objective, OBJECTIVES), ("packing", packing, PACKINGS),
                                     ("document_attention", document_attention, DOCUMENT_ATTENTION),
                                     ("documents", documents, tuple(DOCUMENTS))):
            if value not in allowed:
                raise UserError(f"dataset.{name} '{value}' is not one of {', '.join(allowed)}.")
        if document_attention == "isolated" and packing != "group_texts":
            raise UserError("dataset.document_attention=isolated only means something with packing=group_texts.")
        if not 0 < mlm_probability < 1:
            raise UserError(f"dataset.mlm_probability={mlm_probability} must be between 0 and 1 (BERT: 0.15).")
        if kwargs.get("group_by_length") is None:  # null (the config's default): packed blocks are all one length
            kwargs["group_by_length"] = packing == "line_by_line"
        self.objective = objective
        self.text_column = text_column
        self.documents = documents
        self.block_size = block_size
        self.packing = packing
        self.document_attention = document_attention
        self.mlm_probability = mlm_probability
        self.whole_word_mask = whole_word_mask
        self.streaming = streaming
        self.shuffle_buffer = shuffle_buffer
        super().__init__(max_length=block_size, **kwargs)  # last: a tokenizer given here is checked with the above
        if streaming and self.max_tokens is not None:
            raise UserError("dataset.max_tokens needs the epoch's rows up front, which a streamed dataset does not "
                            "have: set dataset.max_tokens=null (batches of dataset.batch_size blocks), or "
                            "dataset.streaming=false.")

    def check_tokenizer(self, tokenizer: Any) -> Any:
        if self.objective == "mlm" and tokenizer.mask_token_id is None:
            raise UserError(f"the tokenizer ({type(tokenizer).__name__}) has no mask token, which masked-LM needs: "
                            "use a BERT/RoBERTa-style tokenizer, or train one (backbone.train_tokenizer.algorithm="
                            "wordpiece).")
        if self.objective == "clm" and tokenizer.eos_token_id is None:
            log.warning("The tokenizer has no eos token: packed documents run into one another unmarked.")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 and Llama tokenizers have none; padded labels are -100
            log.info("The tokenizer has no pad token: padding with its eos token %r.", tokenizer.eos_token)
        if self.block_size > tokenizer.model_max_length:
            log.warning("dataset.block_size=%d is longer than the tokenizer's model_max_length=%d.",
                        self.block_size, tokenizer.model_max_length)
        return tokenizer

    # ---- reading -----------------------------------------------------------------------------------------------
    def read_local(self, split: str, paths: list) -> Any:
        if _builder_for(paths[0]) == "text":
            self.reader_kwargs.setdefault("sample_by", DOCUMENTS[self.documents])
        return super().read_local(split, paths)

    def predict_columns(self) -> dict[str, Any]:
        return {"column": self.text_column}

    def required_columns(self, split: str) -> list[str]:
        return [self.text_column]

    def training_texts(self):
        """The training split's documents, to train a tokenizer on."""
        if self.streaming:
            return (row[self.text_column] for row in self._stream("train"))
        return iter(self.load_raw()["train"][self.text_column])

    def preprocessing_settings(self) -> dict[str, Any]:
        return {"objective": self.objective, "block_size": self.block_size, "packing": self.packing,
                "document_attention": self.document_attention, "whole_word_mask": self.whole_word_mask,
                "mlm_probability": self.mlm_probability, "seed": self.seed}

    # ---- tokenizing and packing --------------------------------------------------------------------------------
    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch[self.text_column] if t and t.strip()]  # blank lines are not documents
        mlm = self.objective == "mlm"
        encoded = self.tokenizer(
            texts, add_special_tokens=mlm, return_special_tokens_mask=mlm,
            return_offsets_mapping=mlm and self.whole_word_mask,
            truncation=self.packing == "line_by_line", max_length=self.block_size if self.packing == "line_by_line"
            else None, return_attention_mask=False, verbose=False,
        )
        columns = {key: list(values) for key, values in encoded.items()}
        if self.packing == "line_by_line":
            self.count_truncated(encoded)
        elif not mlm and self.tokenizer.eos_token_id is not None:
            for ids in columns["input_ids"]:
                ids.append(self.tokenizer.eos_token_id)
        if self.packing == "group_texts":
            columns = self._group(columns)
        if mlm and self._current_split != "train":
            columns = self._mask_once(columns)
        return columns

    def _group(self, columns: dict[str, list]) -> dict[str, list]:
        """HF's ``group_texts``: concatenate the documents and cut ``block_size`` blocks, dropping the rest."""
        if self.document_attention == "isolated":
            columns["position_ids"] = [list(range(len(ids))) for ids in columns["input_ids"]]
        joined = {key: list(itertools.chain.from_iterable(values)) for key, values in columns.items()}
        usable = len(joined["input_ids"]) // self.block_size * self.block_size
        blocks = {key: [values[i:i + self.block_size] for i in range(0, usable, self.block_size)]
                  for key, values in joined.items()}
        if "position_ids" in blocks:  # a document cut by a block boundary restarts at 0 in the next block
            blocks["position_ids"] = [_restart_at_block(positions) for positions in blocks["position_ids"]]
        return blocks

    def _mask_once(self, columns: dict[str, list]) -> dict[str, list]:
        """Evaluation rows masked a single time, reproducibly (seeded by ``seed`` and the rows' first tokens)."""
        collator = self._masker()
        masked, labels = [], []
        for row, ids in enumerate(columns["input_ids"]):
            collator.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + hash(tuple(ids[:16])) % 99991)
            offsets = torch.tensor([columns["offset_mapping"][row]]) if "offset_mapping" in columns else None
            inputs, target = collator.torch_mask_tokens(
                torch.tensor([ids]), special_tokens_mask=torch.tensor([columns["special_tokens_mask"][row]]),
                offset_mapping=offsets)
            masked.append(inputs[0].tolist())
            labels.append(target[0].tolist())
        columns = {key: values for key, values in columns.items() if key not in ("offset_mapping",
                                                                                 "special_tokens_mask")}
        return {**columns, "input_ids": masked, "labels": labels}

    def _masker(self) -> Any:
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(
            self.tokenizer, mlm=self.objective == "mlm", mlm_probability=self.mlm_probability,
            whole_word_mask=self.whole_word_mask, pad_to_multiple_of=self.pad_to_multiple_of)

    def check_encoded(self, split: str, data: Any) -> None:
        if self.streaming:
            return
        if len(data) == 0:
            raise UserError(
                f"the {split} split holds no full block of dataset.block_size={self.block_size} tokens: give it more "
                "text, lower block_size, or use dataset.packing=line_by_line."
            )
        log.info("%s: %d blocks of %d tokens", split, len(data), self.block_size)

    def make_collator(self) -> Any:
        return self._masker()

    def collate(self, features: list[dict]) -> dict:
        if self.objective == "clm" and self.packing == "group_texts":
            # Full blocks, nothing to pad: labels are the inputs (the model shifts them), eos included even where
            # a tokenizer pads with eos (the collator would turn those labels into -100).
            batch = {key: torch.tensor([f[key] for f in features]) for key in features[0]}
            batch["labels"] = batch["input_ids"].clone()
        elif "labels" in features[0]:  # evaluation rows of masked-LM, masked once already: pad them only
            labels = [f["labels"] for f in features]
            batch = self.tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features],
                                       pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
            width = batch["input_ids"].shape[1]
            batch["labels"] = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
        else:
            batch = self.collator(features)
        if self.document_attention == "isolated":
            batch.pop("attention_mask", None)  # position ids carry the documents: transformers masks across them
            if self.objective == "clm":
                # A document's first token is no target: the token before it, the last of another document, must
                # not learn to predict it (as transformers' DataCollatorWithFlattening labels packed sequences).
                batch["labels"][batch["position_ids"] == 0] = -100
        return batch

    def head_kwargs(self) -> dict[str, Any]:
        return {"document_attention": self.document_attention}

    # ---- streaming ---------------------------------------------------------------------------------------------
    def _stream(self, split: str) -> Any:
        """The raw rows of a split as a ``datasets`` iterable dataset (local files only)."""
        import datasets

        if self.hub_name and not self.data_dir:
            return datasets.load_dataset(self.hub_name, self.hub_config, split=self.hub_splits.get(split, split),
                                         streaming=True)
        paths = self._local_files().get(split)
        if paths is None:
            raise UserError(f"the dataset has no {split} split: add dataset.data_files.{split}.")
        builder = _builder_for(paths[0])
        kwargs = dict(self.reader_kwargs)
        if builder == "text":
            kwargs.setdefault("sample_by", DOCUMENTS[self.documents])
        return datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", streaming=True,
                                     **kwargs)

    def stream_blocks(self, split: str, rank: int = 0, world_size: int = 1) -> Any:
        """``split``'s blocks for one DDP rank, tokenized and packed as they are read."""
        from datasets.distributed import split_dataset_by_node

        rows = self._stream(split)
        if self.text_column not in (rows.column_names or [self.text_column]):
            raise UserError(f"column '{self.text_column}' is missing from the {split} split (it has: "
                            f"{', '.join(rows.column_names)}): set dataset.text_column to one of those.")
        rows = split_dataset_by_node(rows.select_columns([self.text_column]), rank=rank, world_size=world_size)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            self._current_split = split
            return self.encode(batch)

        blocks = rows.map(encode, batched=True, batch_size=BATCH_DOCUMENTS, remove_columns=[self.text_column])
        return blocks.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer) if split == "train" else blocks

    def _prepare(self) -> None:
        if not self.streaming:
            return super()._prepare()
        if self.datasets is None:
            self.datasets = {split: None for split in SPLITS if self.has_split(split)}

    def _loader(self, split: str) -> Any:
        if not self.streaming:
            return super()._loader(split)
        from torch.utils.data import DataLoader
        from torchdata.stateful_dataloader import StatefulDataLoader

        trainer = self.trainer
        if split == "train" and trainer.max_steps < 0:
            raise UserError("a streamed dataset has no length: set trainer.max_steps (and trainer.val_check_interval "
                            "to a number of steps) to say how long to train.")
        blocks = self.stream_blocks(split, trainer.global_rank, trainer.world_size)
        data = _Repeated(blocks) if split == "train" else blocks
        workers = self.num_workers or 0
        # Training: a stateful loader, so a resumed run skips the blocks already trained on (the stream's order is
        # fixed by its seed and pass number).
        loader = StatefulDataLoader if split == "train" else DataLoader
        return loader(data, batch_size=self.batch_size if split == "train" else self.eval_batch_size,
                      collate_fn=self.collate, num_workers=workers, persistent_workers=workers > 0)

    def has_split(self, split: str) -> bool:
        if not self.streaming:
            return super().has_split(split)
        if self.hub_name and not self.data_dir:
            return split != "test" or "test" in self.hub_splits
        return split in self._local_files()

    @property
    def preparation(self) -> dict[str, Any]:
        if self.streaming:
            return {"streaming": True}
        return super().preparation


class _Repeated(torch.utils.data.IterableDataset):
    """A streamed training split read over and over (reshuffled each pass), so every DDP rank takes as many steps
    as ``max_steps`` asks and none runs dry before the others (which would hang the gradient all-reduce)."""

    def __init__(self, blocks: Any) -> None:
        self.blocks = blocks

    def __iter__(self):
        for epoch in itertools.count():
            self.blocks.set_epoch(epoch)
            yield from self.blocks
