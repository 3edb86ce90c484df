"""The model: an encoder-decoder with its LM head; teacher-forced loss, generation-based corpus metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.text import SacreBLEUScore
from transformers import AutoModelForSeq2SeqLM

from lightning_ft.errors import UserError
from lightning_ft.metrics.generation import ChrF, RougeScores
from lightning_ft.tasks.base import TaskModule

log = logging.getLogger(__name__)


class Seq2SeqTask(TaskModule):
    """An encoder-decoder with its LM head: teacher-forced loss, generation-based corpus metrics.

    Args:
        num_beams, max_new_tokens, length_penalty, no_repeat_ngram_size: generation settings, stored in the
            model's generation config (and so in the export).
        val_generate_limit: validation rows that generate while training (null: all); the full split at test.
        predict_with_generate: false scores by loss alone (no generation).
        show_examples: generations printed at the end of the run.
        source_prefix, max_source_length: from the data; kept in the export so a pipeline prepares text the same.
    """

    auto_class = AutoModelForSeq2SeqLM
    non_model_keys = ("row_index",)
    metric_scale: dict[str, float] = {}  # factors that put a metric on a 0-100 scale

    def __init__(
        self,
        *,
        num_beams: int = 4,
        max_new_tokens: int = 64,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        val_generate_limit: int | None = 200,
        predict_with_generate: bool = True,
        show_examples: int = 3,
        source_prefix: str = "",
        max_source_length: int = 512,
        **kwargs: Any,
    ) -> None:
        model_config = {**(kwargs.pop("model_config", None) or {}), "prefix": source_prefix or None}
        super().__init__(model_config=model_config, **kwargs)
        config = self.model.config
        if getattr(config, "num_decoder_layers", config.num_hidden_layers) != config.num_hidden_layers:
            # transformers sizes T5's generation cache by num_layers: beam search then fails with an IndexError.
            raise UserError(
                f"backbone has {config.num_hidden_layers} encoder and {config.num_decoder_layers} decoder layers; "
                "T5 generation in this transformers version needs them equal: set backbone.config_overrides."
                "num_decoder_layers to num_layers."
            )
        self.model.generation_config.update(num_beams=num_beams, max_new_tokens=max_new_tokens,
                                            length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
        self.val_generate_limit = val_generate_limit
        self.predict_with_generate = predict_with_generate
        self.show_examples = show_examples
        self.max_source_length = max_source_length
        # self.predictions: stage -> row index -> source, prediction, references; self.examples: the first few
        self._generated: dict[int, str] = {}
        self.generated_length = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    @property
    def monitor(self) -> tuple[str, str]:
        if not self.predict_with_generate or self.val_generate_limit == 0:
            return ("val/loss", "min")
        return self.default_monitor

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids generated with the model's generation settings."""
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask)

    def _eval_step(self, stage: str, batch: dict) -> None:
        outputs = self(**batch)
        rows = batch["row_index"]
        self.log(f"{stage}/loss", outputs.loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(rows))
        keep = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        keep[: self.own_rows(stage, len(rows))] = True  # the rest repeat other ranks' rows (DDP padding)
        if self._limited(stage):
            keep &= rows < self.val_generate_limit
        if not self._generating(stage) or not keep.any():
            return
        datamodule = self.data
        split = "validation" if stage == "val" else "test"
        generated = self.generate(batch["input_ids"][keep], batch["attention_mask"][keep])
        texts = [t.strip() for t in datamodule.tokenizer.batch_decode(generated, skip_special_tokens=True)]
        indices = rows[keep].tolist()
        references = datamodule.references(split)
        self.metrics[stage].update(texts, [references[i] for i in indices])
        pad_id = datamodule.tokenizer.pad_token_id
        lengths = (generated[:, 1:] != pad_id).sum(1).float()  # without the decoder start token
        self.generated_length[stage].update(lengths)
        self._generated.update(zip(indices, texts))

    def _limited(self, stage: str) -> bool:
        return stage == "val" and self.trainer.state.fn == "fit" and self.val_generate_limit is not None

    def _generating(self, stage: str) -> bool:
        return self.predict_with_generate and not (self._limited(stage) and self.val_generate_limit == 0)

    def _log_epoch_metrics(self, stage: str) -> None:
        if not self._generating(stage):
            return
        values = {k: v * self.metric_scale.get(k.split("/")[-1], 1.0) for k, v in self.metrics[stage].compute().items()}
        values[f"{stage}/gen_len"] = self.generated_length[stage].compute()
        self.log_dict(values, prog_bar=stage == "val")
        self.metrics[stage].reset()
        self.generated_length[stage].reset()
        self._keep_predictions(stage)

    def _keep_predictions(self, stage: str) -> None:
        generated = self._generated
        self._generated = {}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict] = [{} for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, generated)
            generated = {k: v for part in gathered for k, v in part.items()}
        datamodule = self.data
        split = "validation" if stage == "val" else "test"
        sources, references = datamodule.sources(split), datamodule.references(split)
        self.predictions[stage] = {
            str(i): {"source": sources[i], "prediction": generated[i], "references": references[i]}
            for i in sorted(generated)
        }
        self.examples[stage] = [{"row": int(i), **row} for i, row in
                                list(self.predictions[stage].items())[: self.show_examples]]

    def export(self, directory: str | Path, tokenizer: Any) -> Path:
        # The pipeline cuts inputs at the tokenizer's model_max_length: make it the length the model trained on.
        limit, tokenizer.model_max_length = tokenizer.model_max_length, self.max_source_length
        try:
            return super().export(directory, tokenizer)
        finally:
            tokenizer.model_max_length = limit


class TranslationTask(Seq2SeqTask):
    """Translation scored by corpus sacreBLEU (13a tokenization) and chrF, 0-100."""

    default_monitor = ("val/bleu", "max")
    metric_scale = {"bleu": 100.0}  # torchmetrics gives 0-1; sacreBLEU's convention (and chrF's here) is 0-100

    def make_metrics(self, prefix: str) -> MetricCollection:
        return MetricCollection({"bleu": SacreBLEUScore(tokenize="13a"), "chrf": ChrF()},
                                prefix=prefix)


class SummarizationTask(Seq2SeqTask):
    """Summarization scored by ROUGE-1/2/L/Lsum (mean F-measure over the split, best reference), 0-100."""

    default_monitor = ("val/rougeL", "max")

    def make_metrics(self, prefix: str) -> MetricCollection:
        return MetricCollection({"rouge": RougeScores()}, prefix=prefix, compute_groups=False)
