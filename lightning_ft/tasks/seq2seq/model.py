"""The model: an encoder-decoder with its LM head; teacher-forced loss, generation-based corpus metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.text import SacreBLEUScore
from transformers import AutoModelForSeq2SeqLM
from transformers.modeling_outputs import BaseModelOutput

from lightning_ft import packing as packed
from lightning_ft.errors import UserError
from lightning_ft.metrics.generation import ChrF, RougeScores
from lightning_ft.tasks.base import TaskModule
from lightning_ft.tasks.seq2seq.data import pack_targets

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
    non_model_keys = ("row_index", "decoder_starts", "decoder_lengths")
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

    def adjust_model(self, model: Any) -> None:
        # A fresh T5 config leaves the decoder's start token unset (it is the pad token, which
        # backbones.match_tokenizer also sets): the packed rows' shift and the packing check need it.
        if getattr(model.config, "decoder_start_token_id", None) is None:
            model.config.decoder_start_token_id = model.config.pad_token_id

    @property
    def monitor(self) -> tuple[str, str]:
        if not self.predict_with_generate or self.val_generate_limit == 0:
            return ("val/loss", "min")
        return self.default_monitor

    # ---- packed rows (dataset.packing): sources packed as every task packs them, targets in their sources' rows --
    def packed_forward(self, inputs: dict[str, torch.Tensor], layout: dict[str, torch.Tensor]) -> Any:
        """The encoder on the packed sources (their 4D mask from the base), the decoder on the packed targets:
        causal within each target, its cross-attention confined to the target's own source. No position ids: T5's
        relative positions need none; a backbone with absolute positions fails the packing check."""
        inputs.pop("position_ids")
        segments = inputs.pop("decoder_segment_ids")
        dtype = next(self.model.parameters()).dtype
        encoder = self.model.get_encoder()(input_ids=inputs.pop("input_ids"),
                                           attention_mask=inputs.pop("attention_mask"))
        labels = inputs["labels"]
        return self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder.last_hidden_state),
            attention_mask=packed.cross_attention_mask(self.model, segments, layout["segment_ids"], dtype),
            decoder_input_ids=self._decoder_inputs(labels, segments),
            decoder_attention_mask=packed.attention_mask(self.model, segments, True, dtype), **inputs)

    def _decoder_inputs(self, labels: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """The packed targets shifted right within each target, its first position the decoder start token (what
        the model's own shift does to one target a row)."""
        config = self.model.config
        shifted = labels.roll(1, dims=1)
        starts = (segments != segments.roll(1, dims=1)) & (segments > 0)
        starts[:, 0] = segments[:, 0] > 0
        shifted = torch.where(starts, config.decoder_start_token_id, shifted)
        return shifted.masked_fill((shifted == -100) | (segments == 0), config.pad_token_id)

    def _packing_probe(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], Any]:
        # Two source/target pairs packed in one row must give each the logits it has alone: the encoder, the decoder
        # and the cross-attention all keep the pairs apart.
        ids = packed.probe_ids(self.model.config, 16)
        sources, targets = [ids[:5], ids[8:12]], [ids[5:8], ids[12:16]]
        device = next(self.model.parameters()).device
        alone = [self.model(input_ids=torch.tensor([s], device=device), labels=torch.tensor([t], device=device))
                 .logits[0] for s, t in zip(sources, targets)]
        batch = {"input_ids": packed.padded(sources), "attention_mask": packed.padded([[1] * len(s) for s in sources]),
                 "labels": packed.padded(targets, fill=-100)}
        rows = pack_targets(packed.pack_batch(batch, 9, ("input_ids",), pad_id=0))

        def output_of(outputs: Any, i: int) -> torch.Tensor:
            start, n = int(rows["decoder_starts"][i]), int(rows["decoder_lengths"][i])
            return outputs.logits[int(rows["example_rows"][i]), start:start + n]

        return alone, rows, output_of

    def _sources(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's sources one padded row per example (generation reads them so, packed or not)."""
        if not packed.is_packed(batch):
            return batch["input_ids"], batch["attention_mask"]
        lengths = batch["example_lengths"].to(batch["input_ids"].device)
        ids = packed.unpack(batch["input_ids"], batch)
        mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        return ids.masked_fill(~mask, self.model.config.pad_token_id), mask.long()

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
        sources, mask = self._sources(batch)
        generated = self.generate(sources[keep], mask[keep])
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
