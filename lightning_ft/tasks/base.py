"""The base LightningModule: a Hugging Face backbone with a task head, optimizers, schedules, metrics, export.

A task subclass names its ``auto_class``, its metrics (``make_metrics``), how a batch updates them
(``update_metrics``) and its default monitored metric. Loss comes from the Hugging Face head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric, MetricCollection

from lightning_ft.backbones import load_model
from lightning_ft.errors import UserError
from lightning_ft.optim import parameter_groups

log = logging.getLogger("lightning_ft")

STAGES = ("val", "test")


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


class TaskModule(pl.LightningModule):
    """Shared machinery of every task: backbone loading, AdamW groups, warmup schedules, corpus-level metrics.

    Args:
        backbone: how to get the model (``name``, ``pretrained``, ``model_type``, ``config_overrides``), as in
            ``conf/backbone``. Kept as plain data so a checkpoint can rebuild the module.
        optimizer: a factory ``params -> Optimizer`` (a Hydra ``_partial_``); AdamW with lr 5e-5 when omitted.
        scheduler: a factory ``(optimizer, total_steps) -> LRScheduler``; none when omitted.
        model_config: settings a subclass puts on the model config (``num_labels``, ``id2label``...).
    """

    auto_class: Any = None  # e.g. transformers.AutoModelForSequenceClassification
    skip_nonfinite: bool = False  # from skip_nonfinite: skip a step whose loss is NaN/inf instead of stopping
    skipped_steps: int = 0
    default_monitor: tuple[str, str] = ("val/loss", "min")
    non_model_keys: tuple[str, ...] = ()  # batch entries the metrics read but the model does not take

    def __init__(
        self,
        *,
        backbone: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        model_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Saved: the subclass's own arguments and the backbone, enough to rebuild the module from a checkpoint. Not
        # saved: the factories (code, rebuilt from the config) and model_config, which a subclass derives from its
        # own arguments.
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "model_config"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model = load_model(self.auto_class, **dict(backbone), **(model_config or {}))
        # from_pretrained returns the model in eval mode and Lightning 2.x keeps a submodule's own mode, so without
        # this the whole fine-tuning would run with dropout off.
        self.model.train()
        # What an evaluation leaves besides metrics, saved by train.py: answers or generations per example id
        # (predictions_<stage>.json), and a few examples printed in the summary.
        self.predictions: dict[str, dict[str, Any]] = {}
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.metrics = torch.nn.ModuleDict({stage: self.make_metrics(f"{stage}/") for stage in STAGES})
        # The evaluation loss as a corpus mean: each batch's mean loss weighted by the elements it averages,
        # summed over ranks. (self.log's mean of batch means changes with the batching and the number of ranks.)
        self.eval_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in STAGES})

    @property
    def data(self) -> Any:
        """The DataModule this module is trained or evaluated with (Lightning's ``trainer.datamodule``): for tasks
        whose evaluation reads what the batches do not carry (raw references, the tokenizer)."""
        return self.trainer.datamodule

    # ---- what a task subclass provides -------------------------------------------------------------------------
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
        return self.model(**{k: v for k, v in inputs.items() if k not in self.non_model_keys})

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = self(**batch).loss
        if not torch.isfinite(loss):  # the progress bar reads the loss every step anyway: this sync costs nothing
            return self._non_finite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
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
        rows = len(batch["input_ids"])
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
        weight_decay = getattr(factory, "keywords", {}).get("weight_decay", 0.0)
        optimizer = factory(parameter_groups(self.model, weight_decay))
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
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What wrote the checkpoint, so that a resume, a test or a prediction can say plainly when it is given a
        # checkpoint of another task or backbone instead of failing on missing weights.
        checkpoint["lightning_ft"] = {"task": f"{type(self).__module__}.{type(self).__qualname__}",
                                      "backbone": self.hparams.get("backbone")}
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
        self.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return directory
