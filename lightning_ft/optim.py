"""Parameter groups without weight decay on biases and norm weights, and warmup schedules given as a fraction."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and biases plus normalisation weights (never decayed, as in BERT)."""
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        for param_name, _ in module.named_parameters(recurse=False):
            if is_norm or param_name == "bias":
                no_decay.add(f"{module_name}.{param_name}" if module_name else param_name)
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (keep if name in no_decay else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    name: str = "linear",
    warmup_ratio: float = 0.0,
    warmup_steps: int | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A ``transformers`` schedule (``linear``, ``cosine``, ``constant_with_warmup``...) with warmup as a fraction.

    Warmup lasts ``warmup_steps`` when given, else ``warmup_ratio`` of ``total_steps``; the curves are the HF
    Trainer's own, so runs compare step for step.
    """
    from transformers import get_scheduler

    warmup = warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
