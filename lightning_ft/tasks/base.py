"""The base LightningModule: a Hugging Face backbone with a task head, optimizers, schedules, metrics, export.

A task subclass names its ``auto_class``, its metrics (``make_metrics``), how a batch updates them
(``update_metrics``) and its default monitored metric. Loss comes from the Hugging Face head.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from torchmetrics import MeanMetric, MetricCollection
from transformers.modeling_outputs import CausalLMOutput

from lightning_ft import chunked_loss
from lightning_ft import packing as packed
from lightning_ft import peft as adapters
from lightning_ft.backbones import (
    check_frozen_dtype,
    computes_in,
    enable_gradient_checkpointing,
    evaluating,
    freeze,
    load_model,
    store_frozen,
    weights_in_float32,
)
from lightning_ft.errors import UserError
from lightning_ft.optim import parameter_groups

log = logging.getLogger("lightning_ft")

STAGES = ("val", "test")
# The state-dict entry of a module that trains part of its model: a checksum of the frozen weights, which its
# checkpoints leave out. A rebuilt module compares it with its own before taking the trainable weights.
FROZEN_CHECKSUM = "lightning_ft.frozen_checksum"


def loss_elements(batch: dict) -> int:
    """How many elements a Hugging Face head's mean loss averages over: the labels not set to -100 (tokens for
    token classification, rows for classification), every value of float labels (regression, multi-label), or
    the rows where the labels have another name (QA's start/end positions)."""
    labels = batch.get("labels")
    if labels is None:
        return len(batch["input_ids"])
    return int(labels.numel() if labels.is_floating_point() else (labels != -100).sum())


def label_maps(id2label: dict[Any, Any]) -> dict[str, Any]:
    """A classifier head's label settings from an ``id2label`` map, with the keys as ints and the names as strings
    however they came (JSON and YAML make keys strings): ``num_labels``, ``id2label``, ``label2id``."""
    clean = {int(k): str(v) for k, v in id2label.items()}
    return {"num_labels": len(clean), "id2label": clean, "label2id": {v: k for k, v in clean.items()}}


def rows_of_rank(total: int, world_size: int, rank: int) -> int:
    """Rows of a ``total``-row split that ``DistributedSampler(shuffle=False)`` gives ``rank`` before padding."""
    return len(range(rank, total, world_size))


def rng_states() -> dict[str, Any]:
    """This process's random generators, as tensors and plain numbers only, so a checkpoint holding them still
    loads with ``torch.load(weights_only=True)``."""
    import random

    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def holds_whole_weights(strategy: Any) -> bool:
    """Whether each process holds every weight whole, as the module made it: one device or DDP. FSDP flattens a
    layer's weights into one sharded tensor of one dtype, and DeepSpeed (a DDPStrategy subclass) casts and shards the
    model itself."""
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)


class TaskModule(pl.LightningModule):
    """Shared machinery of every task: backbone loading, AdamW groups, warmup schedules, corpus-level metrics.

    Args:
        backbone: how to get the model (``name``, ``pretrained``, ``model_type``, ``config_overrides``), as in
            ``conf/backbone``. Kept as plain data so a checkpoint can rebuild the module.
        optimizer: a factory ``params -> Optimizer`` (a Hydra ``_partial_``); AdamW with lr 5e-5 when omitted.
        scheduler: a factory ``(optimizer, total_steps) -> LRScheduler``; none when omitted.
        model_config: settings a subclass puts on the model config (``num_labels``, ``id2label``...).
        peft: ``conf/peft`` (``method: lora``, ``r``, ``alpha``...): adapters on the backbone, the head trained in
            full; None or ``method: none``: every weight trains (unless ``backbone.freeze`` fixes some).
        layer_decay: ``optim.layer_decay``: each layer's learning rate that much smaller than the one above it.
        packing: from the data (``dataset.packing``): batches come packed (``lightning_ft.packing``); checked here
            on two examples, packed and alone, so a backbone or head that lets packed examples see one another is
            refused before any training. None: packed if that check passes, padded otherwise (``packs_examples``).

    A module whose model trains only in part (``peft``, ``backbone.freeze``) saves only the trainable weights in
    its checkpoints: the frozen ones are rebuilt from the backbone settings (a fresh model's from
    ``backbone.init_seed``), checked against a checksum saved with them.
    """

    auto_class: Any = None  # e.g. transformers.AutoModelForSequenceClassification
    skip_nonfinite: bool = False  # from skip_nonfinite: skip a step whose loss is NaN/inf instead of stopping
    skipped_steps: int = 0
    default_monitor: tuple[str, str] = ("val/loss", "min")
    non_model_keys: tuple[str, ...] = ()  # batch entries the metrics read but the model does not take
    packed_output = "logits"  # the per-token output that a packed forward hands back one row per example
    chunked_loss = False  # a causal-LM task sets it where the backbone allows: the training loss without logits

    def __init__(
        self,
        *,
        backbone: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        model_config: dict[str, Any] | None = None,
        peft: dict[str, Any] | None = None,
        layer_decay: float | None = None,
        packing: bool | None = False,
    ) -> None:
        super().__init__()
        # Saved: the subclass's own arguments, the backbone and peft, enough to rebuild the module from a checkpoint.
        # Not saved: the factories (code, rebuilt from the config), layer_decay (only the optimizer reads it) and
        # model_config, which a subclass derives from its own arguments.
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "model_config", "layer_decay"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if layer_decay is not None and (isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float))
                                        or not 0 < layer_decay <= 1):
            raise UserError(f"optim.layer_decay={layer_decay!r} is not in (0, 1]: give e.g. 0.9 (each layer's "
                            "learning rate 0.9 times the one above it), or null for one learning rate.")
        self.layer_decay = layer_decay
        settings = dict(backbone)
        frozen_part = settings.pop("freeze", None)
        checkpointing = bool(settings.pop("gradient_checkpointing", False))
        self.frozen_dtype = settings.pop("frozen_dtype", None)
        adapters.check(peft, settings | {"freeze": frozen_part})  # before any model work
        check_frozen_dtype(self.frozen_dtype)
        self.peft = adapters.settings(peft)
        # What rebuilds the base model without adapters (a peft export of a model built from a config saves it).
        self._load_settings = {**settings, **(model_config or {})}
        self.model = load_model(self.auto_class, **self._load_settings, load_kwargs=adapters.load_kwargs(self.peft))
        self.adjust_model(self.model)
        # from_pretrained returns the model in eval mode and Lightning 2.x keeps a submodule's own mode, so without
        # this the whole fine-tuning would run with dropout off.
        self.model.train()
        if checkpointing and not (self.peft and self.peft["method"] == "qlora"):  # qlora's preparation enables it
            enable_gradient_checkpointing(self.model)
        freeze(self.model, frozen_part)
        # The PeftModel is kept out of the module tree: self.model is the same model with the adapters inside it,
        # so every task reads and calls it as before, and the state dict keeps its names.
        wrapped = adapters.wrap(self.model, self.peft, checkpointing) if self.peft else None
        object.__setattr__(self, "_peft_model", wrapped)
        # Every name a frozen weight goes by: a tied one (GPT-2's lm_head.weight is its wte.weight) is in the state dict
        # under each of them.
        self._frozen = frozenset(n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad)
        if self.frozen_dtype and not self._frozen:
            raise UserError(f"backbone.frozen_dtype={self.frozen_dtype}: every weight trains, so none would be stored "
                            "in it; use it with peft=lora or backbone.freeze, or set it to null.")
        # Of the weights as loaded: a run that stores them in half precision (setup) rounds the same values.
        self._frozen_checksum = self._checksum() if self._frozen else None
        trainable, total = self.trainable_parameters
        log.info("trainable parameters: %s of %s (%.2f%%)%s", f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                 f" (peft={self.peft['method']})" if self.peft else "")
        # What an evaluation leaves besides metrics, saved by train.py: answers or generations per example id
        # (predictions_<stage>.json), and a few examples printed in the summary.
        # The column options of the data it trained on (``DataModule.predict_columns``; train.py sets them), saved in
        # checkpoints and exports for predict.
        self.data_columns: dict[str, Any] = {}
        self.predictions: dict[str, dict[str, Any]] = {}
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.metrics = torch.nn.ModuleDict({stage: self.make_metrics(f"{stage}/") for stage in STAGES})
        # The evaluation loss as a corpus mean: each batch's mean loss weighted by the elements it averages,
        # summed over ranks. (self.log's mean of batch means changes with the batching and the number of ranks.)
        self.eval_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in STAGES})
        self.packing_causal = False  # a packed example's tokens see only those before them (a decoder backbone)
        self.packing_position_offset = 0  # the first position id of an example (RoBERTa's: its padding id + 1)
        self.packs_examples = False  # whether the data packs this module's batches (the loaders read it)
        if packing is not False:
            try:
                self._check_packing()
                self.packs_examples = True
            except UserError as refusal:
                if packing:
                    raise
                log.info("batches: padded, not packed (%s)", str(refusal).split(" (")[0])
        if self.packs_examples:
            log.info("batches: packed, %s", "examples isolated by a block-diagonal attention mask")

    @property
    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameters of the model."""
        return adapters.parameter_counts(self.model, self._peft_model)

    @property
    def data(self) -> Any:
        """The DataModule this module is trained or evaluated with (Lightning's ``trainer.datamodule``): for tasks
        whose evaluation reads what the batches do not carry (raw references, the tokenizer)."""
        return self.trainer.datamodule

    # ---- what a task subclass provides -------------------------------------------------------------------------
    def adjust_model(self, model: Any) -> None:
        """Change the loaded model before anything is frozen or wrapped (e.g. grow its embeddings)."""

    def make_metrics(self, prefix: str) -> MetricCollection:
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        raise NotImplementedError

    @property
    def monitor(self) -> tuple[str, str]:
        """The metric that picks the best checkpoint and its mode (``max``/``min``)."""
        return self.default_monitor

    # ---- steps -------------------------------------------------------------------------------------------------
    def forward(self, **inputs: Any) -> Any:
        inputs = {k: v for k, v in inputs.items() if k not in self.non_model_keys}
        if not packed.is_packed(inputs):
            if self.chunked_loss and self.training and "labels" in inputs:
                labels = inputs.pop("labels")
                return CausalLMOutput(loss=chunked_loss.causal_lm_loss(self.model, inputs, labels))
            return self.model(**inputs)
        layout = {key: inputs.pop(key) for key in packed.LAYOUT_KEYS}
        dtype = next(self.model.parameters()).dtype
        inputs["attention_mask"] = packed.attention_mask(self.model, layout["segment_ids"], self.packing_causal, dtype)
        if self.packing_position_offset:
            inputs["position_ids"] = inputs["position_ids"] + self.packing_position_offset
        return self.packed_forward(inputs, layout)

    def packed_forward(self, inputs: dict[str, torch.Tensor], layout: dict[str, torch.Tensor]) -> Any:
        """The model on packed rows (``inputs`` carry the 4D mask), its logits back one row per example. This one
        suits a head that reads every token (its loss, over the same labelled tokens, is the padded batch's); a
        task whose head reads one token per example overrides it."""
        outputs = self.model(**inputs)
        setattr(outputs, self.packed_output, packed.unpack(getattr(outputs, self.packed_output), layout))
        return outputs

    def _check_packing(self) -> None:
        with evaluating(self.model):
            alone, rows, output_of = self._packing_probe()
            device = next(self.model.parameters()).device
            try:
                # TaskModule's forward, not a subclass's: the model and head on packed rows, as every task runs them
                together = TaskModule.forward(self, **{k: v.to(device) for k, v in rows.items()})
            except (RuntimeError, ValueError, TypeError, IndexError) as err:  # e.g. an attention that takes no 4D mask
                together, failure = None, f" ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        for i, output in enumerate(alone):
            if together is not None:
                mine = output_of(together, i)
                if mine.shape == output.shape and torch.allclose(mine.float(), output.float(), atol=1e-4, rtol=1e-4):
                    continue
                failure = ""
            raise UserError(
                f"backbone {self.model.config.model_type} with the {type(self).__name__} head does not keep packed "
                f"examples apart (an example packed with another gives other outputs than alone{failure}): set "
                "dataset.packing=false.")

    def _packing_probe(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], Callable[[Any, int], Any]]:
        """What the packing check compares: two short examples' outputs run alone, the packed batch of the two, and
        how to read example i's output from the module's forward on that batch. Sets what packed rows need from
        the backbone (causal attention, its first position id)."""
        self.packing_causal = packed.is_causal(self.model)
        self.packing_position_offset = packed.position_offset(self.model)
        ids = packed.probe_ids(self.model.config, 9)
        examples = [ids[:5], ids[5:]]
        device = next(self.model.parameters()).device
        alone = [self._output_alone(torch.tensor([x], device=device)) for x in examples]
        batch = {"input_ids": packed.padded(examples),
                 "attention_mask": packed.padded([[1] * len(x) for x in examples])}

        def output_of(outputs: Any, i: int) -> Any:
            mine = getattr(outputs, self.packed_output)[i]
            return mine[: len(examples[i])] if alone[i].dim() > 1 else mine

        return alone, packed.pack_batch(batch, 9, ("input_ids",), pad_id=0), output_of

    def _output_alone(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What the packing check compares: the model's ``packed_output`` for one example run alone (1 x length)."""
        return getattr(self.model(input_ids=input_ids), self.packed_output)[0]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = self(**batch).loss
        if not torch.isfinite(loss):  # the progress bar reads the loss every step anyway: this sync costs nothing
            return self._non_finite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=packed.batch_examples(batch))
        return loss

    def _non_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        where = f"step {self.global_step + 1} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.skip_nonfinite:
            self.skipped_steps += 1
            log.warning("training loss is %s at %s: step skipped (skip_nonfinite=true; %d skipped so far).",
                        loss.item(), where, self.skipped_steps)
            return None  # Lightning skips backward and the optimizer step
        saved = [Path(p) for cb in self.trainer.checkpoint_callbacks for p in (cb.best_model_path, cb.last_model_path)
                 if p and Path(p).is_file()]
        last_good = max(saved, key=lambda p: p.stat().st_mtime_ns) if saved else None
        raise UserError(
            f"the training loss is {loss.item()} at {where}: stopped rather than train on it. Last good checkpoint: "
            f"{last_good or 'none yet'}. Lower optim.lr, keep trainer.gradient_clip_val, try "
            "trainer.precision=32-true, or set skip_nonfinite=true to skip such steps."
        )

    def _eval_step(self, stage: str, batch: dict) -> None:
        rows = packed.batch_examples(batch)  # (evaluation batches are packed on a single process only)
        own = self.own_rows(stage, rows)
        if own == 0:
            return  # every row of this batch repeats another rank's (DistributedSampler's padding)
        if own < rows:
            batch = {k: v[:own] if isinstance(v, (torch.Tensor, list)) and len(v) == rows else v
                     for k, v in batch.items()}
        outputs = self(**batch)
        self.eval_loss[stage].update(outputs.loss.detach().float(), loss_elements(batch))
        self.update_metrics(self.metrics[stage], outputs, batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_start(self) -> None:
        self._eval_rows_seen = 0

    def on_test_epoch_start(self) -> None:
        self._eval_rows_seen = 0

    def own_rows(self, stage: str, count: int) -> int:
        """How many of this evaluation batch's ``count`` rows are this rank's share of the split, not the repeats
        that Lightning's ``DistributedSampler`` appends so every rank gets as many rows (they come last on a rank).
        A metric fed only these rows counts each example exactly once under DDP."""
        seen, self._eval_rows_seen = self._eval_rows_seen, self._eval_rows_seen + count
        world = self.trainer.world_size
        if world == 1:
            return count
        loader = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        if not hasattr(loader.dataset, "__len__"):
            return count  # a stream split by rank: nothing is repeated
        own = rows_of_rank(len(loader.dataset), world, self.trainer.global_rank)
        return max(0, min(count, own - seen))

    def _log_epoch_metrics(self, stage: str) -> None:
        # Metric states are summed over the whole split (and synced across ranks) before compute: corpus level.
        values = self.metrics[stage].compute()
        self.log_dict(values, prog_bar=stage == "val")
        self.metrics[stage].reset()

    def _end_evaluation(self, stage: str) -> None:
        self._log_epoch_metrics(stage)
        if self.eval_loss[stage].update_called:  # tasks with their own evaluation step log their own loss
            self.log(f"{stage}/loss", self.eval_loss[stage].compute(), prog_bar=stage == "val")
            # Fresh states made under trainer.validate's inference mode could not be updated by an evaluation that
            # runs without it (validate_before, then fit's validation).
            with torch.inference_mode(False):
                self.eval_loss[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    # ---- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=5e-5))
        keywords = getattr(factory, "keywords", {"lr": 5e-5})
        groups = parameter_groups(self.model, keywords.get("weight_decay", 0.0), self.layer_decay, keywords.get("lr"))
        optimizer = factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        # estimated_stepping_batches sets the training loader up before Lightning restores a checkpoint's loop state,
        # and fit then reuses that loader, ignoring the saved data position (a resumed run would re-read its epoch
        # from the start). Dropping it makes fit set the loader up again, after the restore.
        self.trainer.fit_loop._combined_loader = None
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if fused:
            if scaler is not None:
                raise UserError(
                    "precision=16-mixed with gradient clipping cannot use a fused optimizer (it unscales fp16 "
                    "gradients inside step, after clipping would have run): set optim.fused=false, or use "
                    "trainer.precision=bf16-mixed."
                )
            # Lightning 2.6 refuses to clip for fused optimizers under any "-mixed" precision, because they unscale
            # fp16 gradients inside step(). bf16 has no scaler and nothing to unscale, so clipping here is exact.
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def _checksum(self) -> torch.Tensor:
        """The sum of the squares of the frozen weights, in float64 (a chunk at a time: no copy of a whole matrix)."""
        total = torch.zeros((), dtype=torch.float64)
        for name, param in self.named_parameters():
            if name in self._frozen:
                for chunk in param.detach().reshape(-1).split(1 << 22):
                    total += chunk.double().square().sum().cpu()
        return total

    def state_dict(self, *, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
        """Without the frozen weights, which the module's settings rebuild: a LoRA run's checkpoint holds the adapters
        and the head (and the optimizer, their state), not another copy of the backbone."""
        state = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self._frozen:
            for name in self._frozen:
                state.pop(prefix + name, None)
            state[prefix + FROZEN_CHECKSUM] = self._frozen_checksum.clone()
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Also takes a state dict without the frozen weights (this module's checkpoints), once its checksum shows
        that they are the ones this module rebuilt."""
        if not self._frozen:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        state = dict(state_dict)
        saved = state.pop(FROZEN_CHECKSUM, None)
        if saved is not None and not torch.isclose(saved.double().cpu(), self._frozen_checksum, rtol=1e-9, atol=0):
            backbone = self.hparams.get("backbone") or {}
            raise UserError(
                f"these weights were trained on a frozen {backbone.get('name') or backbone.get('model_type')} "
                "backbone that differs from the one rebuilt now (its checkpoint keeps only the trained part): use "
                "the backbone files, and for one built from a config the seed, that it was trained with.")
        result = super().load_state_dict(state, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if saved is None or k not in self._frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                               f"{missing[:5]}, unexpected keys {result.unexpected_keys[:5]}.")
        if saved is None:  # a state dict with every weight: the frozen ones were replaced
            self._frozen_checksum = self._checksum()
        return type(result)(missing, result.unexpected_keys)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What wrote the checkpoint, so that a resume, a test or a prediction can say plainly when it is given a
        # checkpoint of another task or backbone instead of failing on missing weights.
        checkpoint["lightning_ft"] = {"task": f"{type(self).__module__}.{type(self).__qualname__}",
                                      "backbone": self.hparams.get("backbone"), "columns": self.data_columns}
        # The random generators (dropout, masking, sampling), every rank's, so a resumed run draws what an
        # uninterrupted one would. Lightning does not save them.
        states = rng_states()
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states"] = gathered
        else:
            checkpoint["rng_states"] = [states]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states") or []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._rng_to_restore = states[rank] if rank < len(states) else (states[0] if states else None)

    def setup(self, stage: str) -> None:
        # The frozen weights go to half precision here, not at construction: the construction's checks (packing,
        # chunked loss, document isolation) compare float32 outputs, and only a Trainer's precision says whether
        # the forward runs under the autocast that mixes them with the float32 trained ones.
        if not self.frozen_dtype:
            return
        check_frozen_dtype(self.frozen_dtype, str(self.trainer.precision), training=stage == "fit")
        strategy = self.trainer.strategy
        if not holds_whole_weights(strategy):
            raise UserError(f"backbone.frozen_dtype={self.frozen_dtype} keeps two dtypes in the model, which "
                            f"{type(strategy).__name__} does not take: set backbone.frozen_dtype=null, or train "
                            "on one device or with DDP.")
        if computes_in(self.frozen_dtype, self.trainer.precision):
            store_frozen(self.model, self.frozen_dtype)
            log.info("frozen weights stored in %s (backbone.frozen_dtype)", self.frozen_dtype)

    def on_fit_start(self) -> None:
        # The chunked loss reads the output weight outside the output layer's forward: under FSDP or DeepSpeed that
        # weight may be a shard there, so those strategies compute the logits as the model does.
        strategy = self.trainer.strategy
        if self.chunked_loss and not holds_whole_weights(strategy):
            log.info("task.chunked_loss: off under %s (the logits are computed in full)",
                     type(strategy).__name__)
            self.chunked_loss = False

    def on_train_start(self) -> None:
        # Restored here, after the sanity check and loader set-up, right before the first resumed training step.
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if states is not None:
            set_rng_states(states)

    # ---- export ------------------------------------------------------------------------------------------------
    def export(self, directory: str | Path, tokenizer: Any) -> Path:
        """Write a Hugging Face directory (model, config with label maps, tokenizer) that ``pipeline`` loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._peft_model is not None and not self.peft["merge"]:
            # peft.merge=false: peft's adapter directory; a base built from a config is saved beside it.
            backbone = self.hparams.get("backbone") or {}
            name = backbone.get("name") if backbone.get("pretrained", True) else None
            if name and Path(name).expanduser().is_dir():
                name = str(Path(name).expanduser().resolve())  # a directory, named so that it loads from anywhere
            adapters.save_adapters(self._peft_model, directory, name,
                                   lambda: load_model(self.auto_class, **self._load_settings))
        else:
            # Frozen weights kept in half precision (backbone.frozen_dtype) go back to float32 first: the export is
            # one dtype, as its config says, and the adapters' small updates are not rounded away by the merge.
            if self.frozen_dtype:
                weights_in_float32(self.model)
            if self._peft_model is not None:
                # The adapters merged into their weights, in place (no second copy of the model): the export is the
                # run's last use of the module, which from here holds the plain merged model.
                self.model = self._peft_model.merge_and_unload()
                object.__setattr__(self, "_peft_model", None)
                self._frozen, self._frozen_checksum = frozenset(), None
            self.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        # The training data's column options, so that predict reads a file laid out like it unprompted.
        from lightning_ft import tasks

        (directory / "lightning_ft.json").write_text(json.dumps({"task": tasks.of_module(self).name,
                                                                 "columns": self.data_columns}, indent=2))
        return directory
