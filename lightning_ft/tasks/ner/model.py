"""The model: a token-classification head, read back per word; entity-level P/R/F1 as seqeval computes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import MetricCollection
from transformers import AutoModelForTokenClassification

from lightning_ft.metrics.entity import EntityScores, is_entity_scheme
from lightning_ft.tasks.base import TaskModule, label_maps
from lightning_ft.tasks.ner.data import IGNORE, first_subtoken_index, require_fast_tokenizer


def read_word_tags(predicted: Sequence[int], index: Sequence[int], words: int, id2label: dict[int, str]) -> list[str]:
    """Every word's tag, read at its first sub-token (``index`` as ``first_subtoken_index`` gives it); a word with
    no sub-token in view (cut off by ``max_length``, or tokenized into nothing) gets ``O``."""
    tags = ["O"] * words
    for label, word in zip(predicted, index):
        if word >= 0:
            tags[word] = id2label[label]
    return tags


class TokenClassificationTask(TaskModule):
    """A token-classification head on the backbone; entity-level P/R/F1 (overall and per type) and word accuracy.

    Args:
        num_labels, id2label: from ``TokenClassificationData.model_kwargs()``.
        label_column: the data column this model tags (``ner_tags``, ``pos_tags``, ``chunk_tags``...); the dataset
            configs read it from here, so ``task.label_column=pos_tags`` trains a POS tagger.
    """

    auto_class = AutoModelForTokenClassification
    non_model_keys = ("word_index", "word_labels")

    def __init__(
        self, *, num_labels: int, id2label: dict[int, str], label_column: str = "ner_tags", **kwargs: Any
    ) -> None:
        head = label_maps(id2label)
        self.id2label = head["id2label"]
        self.label_column = label_column
        self.entity_mode = is_entity_scheme(list(self.id2label.values()))
        super().__init__(model_config={**head, "num_labels": num_labels}, **kwargs)

    @property
    def monitor(self) -> tuple[str, str]:
        return ("val/f1", "max") if self.entity_mode else ("val/accuracy", "max")

    def make_metrics(self, prefix: str) -> MetricCollection:
        return MetricCollection({"scores": EntityScores(list(self.id2label.values()))}, prefix=prefix)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        gold_ids = batch["word_labels"].cpu()
        gold = [[self.id2label[i] for i in row[row != IGNORE].tolist()] for row in gold_ids]
        predicted = outputs.logits.argmax(-1).cpu().tolist()
        index = batch["word_index"].cpu().tolist()
        metrics.update([read_word_tags(p, i, len(g), self.id2label) for p, i, g in zip(predicted, index, gold)], gold)

    def tag(self, sentences: list[list[str]], tokenizer: Any, batch_size: int = 32, max_length: int = 512):
        """Tag pre-split sentences with the module's model, as ``predict`` does with the exported one."""
        return tag_sentences(self.model, tokenizer, sentences, batch_size=batch_size, max_length=max_length)


# ---- prediction, shared by the module, the predict command and the tests ------------------------------------------
@torch.no_grad()
def tag_sentences(
    model: Any, tokenizer: Any, sentences: list[list[str]], batch_size: int = 32, max_length: int = 512
) -> tuple[list[list[str]], int]:
    """Tags for every word of every sentence, and how many words were beyond ``max_length`` (tagged ``O``)."""
    require_fast_tokenizer(tokenizer)
    was_training = model.training
    model.eval()
    id2label = label_maps(model.config.id2label)["id2label"]
    tags, lost = [], 0
    device = next(model.parameters()).device
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start:start + batch_size]
        encoding = tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=max_length,
                             padding=True, return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in encoding.items()}).logits
        predicted = logits.argmax(-1).cpu().tolist()
        for row, words in enumerate(chunk):
            index = first_subtoken_index(encoding.word_ids(row))
            tags.append(read_word_tags(predicted[row], index, len(words), id2label))
            lost += len(words) - sum(word >= 0 for word in index)
    model.train(was_training)
    return tags, lost
