"""The model: a token-classification head, read back per word; entity-level P/R/F1 as seqeval computes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchmetrics import MetricCollection
from transformers import AutoModelForTokenClassification

from lightning_ft.backbones import evaluating
from lightning_ft.metrics.entity import EntityScores, is_entity_scheme
from lightning_ft.tasks.base import TaskModule, label_maps
from lightning_ft.tasks.ner.data import IGNORE, first_subtoken_index, require_fast_tokenizer, word_windows


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
    non_model_keys = ("word_index", "word_labels", "window_document")

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
        if "window_document" not in batch:
            metrics.update([read_word_tags(p, i, len(g), self.id2label) for p, i, g in zip(predicted, index, gold)],
                           gold)
            return
        # Windowed sentences: each word is read from the one window that names it (word_windows' "chosen").
        tags = [["O"] * len(g) for g in gold]
        for p, i, sentence in zip(predicted, index, batch["window_document"].tolist()):
            for label, word in zip(p, i):
                if word >= 0:
                    tags[sentence][word] = self.id2label[label]
        metrics.update(tags, gold)

    def _eval_step(self, stage: str, batch: dict) -> None:
        if "window_document" not in batch:
            return super()._eval_step(stage, batch)
        sentences = len(batch["word_labels"])
        own = self.own_rows(stage, sentences)
        if own < sentences:  # under DDP (never packed): keep this rank's own sentences and their windows
            if own == 0:
                return
            keep = batch["window_document"] < own
            batch = {k: v[:own] if k == "word_labels" else v[keep] if len(v) == len(keep) else v
                     for k, v in batch.items()}
        outputs = self(**batch)
        self.eval_loss[stage].update(outputs.loss.detach().float(), int((batch["labels"] != IGNORE).sum()))
        self.update_metrics(self.metrics[stage], outputs, batch)

    def tag(self, sentences: list[list[str]], tokenizer: Any, batch_size: int = 32, max_length: int = 512,
            stride: int | None = None):
        """Tag pre-split sentences with the module's model, as ``predict`` does with the exported one."""
        return tag_sentences(self.model, tokenizer, sentences, batch_size=batch_size, max_length=max_length,
                             stride=stride)


# ---- prediction, shared by the module, the predict command and the tests ------------------------------------------
def tag_sentences(
    model: Any, tokenizer: Any, sentences: list[list[str]], batch_size: int = 32, max_length: int = 512,
    stride: int | None = None,
) -> tuple[list[list[str]], int]:
    """Tags for every word of every sentence, and how many words were beyond ``max_length`` (tagged ``O``). With a
    ``stride``, a longer sentence is read in overlapping windows (``word_windows``) and no word is lost."""
    require_fast_tokenizer(tokenizer)
    with evaluating(model):
        return _tag_sentences(model, tokenizer, sentences, batch_size, max_length, stride)


def _tag_sentences(model: Any, tokenizer: Any, sentences: list[list[str]], batch_size: int, max_length: int,
                   stride: int | None) -> tuple[list[list[str]], int]:
    id2label = label_maps(model.config.id2label)["id2label"]
    tags, lost = [], 0
    device = next(model.parameters()).device
    if stride is not None:
        tags = [_tag_windows(model, tokenizer, chunk, max_length, stride, id2label, device)
                for start in range(0, len(sentences), batch_size)
                for chunk in [sentences[start:start + batch_size]]]
        return [t for chunk in tags for t in chunk], 0
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
    return tags, lost


def _tag_windows(model: Any, tokenizer: Any, sentences: list[list[str]], max_length: int, stride: int,
                 id2label: dict[int, str], device: Any) -> list[list[str]]:
    windows = word_windows(tokenizer, sentences, max_length, stride)
    flat = [(sentence, window) for sentence, these in enumerate(windows) for window in these]
    keys = [k for k in flat[0][1] if k not in ("first", "chosen", "word_ids")]
    encoding = tokenizer.pad([{k: window[k] for k in keys} for _, window in flat], return_tensors="pt")
    predicted = model(**{k: v.to(device) for k, v in encoding.items()}).logits.argmax(-1).cpu().tolist()
    left = tokenizer.padding_side == "left"
    tags = [["O"] * len(words) for words in sentences]
    for (sentence, window), row in zip(flat, predicted):
        chosen = window["chosen"]
        offset = len(row) - len(chosen) if left else 0
        for position, word in enumerate(chosen):
            if word >= 0:
                tags[sentence][word] = id2label[row[position + offset]]
    return tags
