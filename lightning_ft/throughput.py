"""Speed: the fastest precision the hardware supports, and a callback measuring training throughput.

``ThroughputMonitor`` counts what a run really does: samples/s, real (non-pad) tokens/s, the share of padding, the
share of time spent waiting for batches, and model FLOPs utilisation (MFU) where the device's peak is known.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

import lightning_ft
from lightning_ft import packing

_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "fp16": torch.float16}


def bf16_is_native(accelerator: str = "auto") -> bool:
    """Whether bf16 matmuls run natively on the device ``accelerator`` picks: a CUDA GPU with bf16 (Ampere or
    later) or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 autocast is emulated and slower than fp32."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: Any, accelerator: str = "auto") -> Any:
    """``auto`` becomes ``bf16-mixed`` where bf16 is native (about 2x faster on this project's CPUs and on GPUs, same
    metrics: benchmarks/RESULTS.md) and ``32-true`` elsewhere; any other value is returned as given."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if bf16_is_native(str(accelerator)) else "32-true"


def model_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(non-embedding parameters, layers, hidden size) of a transformers model, for the FLOPs estimate."""
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    params = sum(p.numel() for p in model.parameters() if p.requires_grad) - embedding
    config = getattr(model, "config", None)
    layers = hidden = 0
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        layers = layers or getattr(config, name, 0) or 0
    for name in ("hidden_size", "n_embd", "d_model"):
        hidden = hidden or getattr(config, name, 0) or 0
    return params, layers, hidden


def training_flops(params: int, layers: int, hidden: int, lengths: torch.Tensor) -> float:
    """Forward + backward FLOPs of one batch of sequences of ``lengths`` real tokens (Kaplan et al. / PaLM):
    6 per parameter and token, plus 12 * layers * hidden * length per token for attention scores and values."""
    lengths = lengths.double()
    return float(6 * params * lengths.sum() + 12 * layers * hidden * (lengths**2).sum())


class ThroughputMonitor(pl.Callback):
    """Training throughput, logged every ``log_every_n_steps`` under ``throughput/`` and summarised at the end.

    Counts only real (non-pad) tokens as useful: padding shows up as ``padding`` (the share of padded positions)
    and lowers ``tokens_per_sec`` and ``mfu``. ``data_wait`` is the share of training time spent waiting for the
    next batch (time outside the training step, validation excluded). MFU needs the device's peak FLOPs: known for
    common GPUs (Lightning's table), or given as ``peak_flops`` (per device, in FLOP/s).

    Written ourselves rather than using Lightning's ``ThroughputMonitor``, which assumes a fixed batch size and a
    fixed ``flops_per_batch`` and knows nothing about padding; the peak FLOPs table is Lightning's.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        super().__init__()
        self.peak_flops = peak_flops
        self.summary: dict[str, float] = {}

    def _reset(self) -> dict[str, float]:
        return dict.fromkeys(("samples", "tokens", "padded_tokens", "packed_rows", "flops", "step_seconds",
                              "wait_seconds"), 0.0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_fabric.utilities.throughput import get_available_flops

        self.total, self.window = self._reset(), self._reset()
        self._last_end: float | None = None
        self._first_step_after: float | None = None
        model = getattr(pl_module, "model", pl_module)
        self._shape = model_shape(model)
        dtype = next((d for key, d in _DTYPES.items() if str(trainer.precision).startswith(key)), torch.float32)
        device = trainer.strategy.root_device
        peak = self.peak_flops
        if peak is None and device.type == "cuda":
            peak = get_available_flops(device, dtype)
        self._peak = peak

    def _sync(self, trainer: pl.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = self._sync(trainer)
        if self._first_step_after is None:
            self._first_step_after = time.perf_counter() - lightning_ft.IMPORTED_AT
        if self._last_end is not None:  # time since the last step ended: fetching and collating this batch
            for counts in (self.total, self.window):
                counts["wait_seconds"] += now - self._last_end
        self._step_start = now
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None  # BatchEncoding is no dict
        ids = batch["input_ids"]
        if "example_lengths" in batch:  # packed rows (lightning_ft.packing): the examples' own lengths
            lengths = batch["example_lengths"]
        else:
            lengths = mask.sum(-1) if mask is not None else torch.full((len(ids),), ids.shape[-1])
        flops = training_flops(*self._shape, lengths.cpu()) if self._peak else 0.0  # only MFU reads it
        # a packed multiple-choice question is several packed examples, one per choice: count questions
        samples = packing.batch_examples(batch) if "example_lengths" in batch else len(lengths)
        for counts in (self.total, self.window):
            counts["samples"] += samples
            counts["packed_rows"] += len(ids) if "example_lengths" in batch else 0
            counts["tokens"] += float(lengths.sum())
            counts["padded_tokens"] += ids.numel()
            counts["flops"] += flops

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = self._sync(trainer)
        for counts in (self.total, self.window):
            counts["step_seconds"] += now - self._step_start
        self._last_end = now
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 and not trainer.fit_loop._should_accumulate():
            pl_module.log_dict({f"throughput/{k}": v for k, v in self._rates(self.window).items()},
                               on_step=True, on_epoch=False, batch_size=len(batch["input_ids"]))
            self.window = self._reset()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = None  # validation and checkpointing are not waiting for data

    def _rates(self, counts: dict[str, float], world_size: int = 1) -> dict[str, float]:
        seconds = counts["step_seconds"] + counts["wait_seconds"]
        if seconds <= 0 or counts["padded_tokens"] <= 0:
            return {}
        rates = {
            "samples_per_sec": counts["samples"] / seconds,
            "tokens_per_sec": counts["tokens"] / seconds,
            "padded_tokens_per_sec": counts["padded_tokens"] / seconds,
            "padding": 1 - counts["tokens"] / counts["padded_tokens"],
            "data_wait": counts["wait_seconds"] / seconds,
        }
        if counts["packed_rows"]:  # rows of several examples: how full they are (the padding is what is left)
            rates["packing_efficiency"] = counts["tokens"] / counts["padded_tokens"]
            rates["examples_per_row"] = counts["samples"] / counts["packed_rows"]
        if self._peak:
            rates["mfu"] = counts["flops"] / seconds / (self._peak * world_size)
        return rates

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank counts its own batches: sum the work over ranks and take the slowest rank's time.
        work = [k for k in self.total if "seconds" not in k]
        times = [k for k in self.total if "seconds" in k]
        device = pl_module.device  # NCCL reduces tensors on the GPU only
        summed = trainer.strategy.reduce(torch.tensor([self.total[k] for k in work], dtype=torch.float64,
                                                      device=device), reduce_op="sum")
        slowest = torch.tensor([self.total[k] for k in times], dtype=torch.float64, device=device)
        if trainer.world_size > 1:
            slowest = trainer.strategy.reduce(slowest, reduce_op="max")
        total = {**dict(zip(work, summed.tolist())), **dict(zip(times, slowest.tolist()))}
        self.summary = {**self._rates(total, trainer.world_size),
                        "train_seconds": total["step_seconds"] + total["wait_seconds"], "samples": total["samples"]}
        if self._first_step_after is not None:
            self.summary["seconds_to_first_step"] = self._first_step_after
