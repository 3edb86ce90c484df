"""Parameter groups without weight decay on biases and norm weights (with layer-wise learning-rate decay on request),
and warmup schedules given as a fraction."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_ft.errors import UserError


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                     lr: float | None = None) -> list[dict]:
    """Two AdamW groups: decayed matrices, and biases plus normalisation weights (never decayed, as in BERT).

    With ``layer_decay`` (``optim.layer_decay``, the ELECTRA/DeBERTa recipe) each depth gets its own pair of groups
    and learning rate: the head (and what follows the last layer) ``lr``, the last layer ``lr * decay``, ..., the
    first layer ``lr * decay**L``, the embeddings ``lr * decay**(L + 1)``. Only trainable parameters are grouped.
    """
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        for param_name, _ in module.named_parameters(recurse=False):
            if is_norm or param_name == "bias":
                no_decay.add(f"{module_name}.{param_name}" if module_name else param_name)
    if layer_decay is None:
        decay, keep = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (keep if name in no_decay else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": keep, "weight_decay": 0.0},
        ]
    from lightning_ft.backbones import parameter_depths

    if lr is None:
        raise UserError("optim.layer_decay scales the optimizer's learning rate, and it has none: set optim.lr.")
    depths, layers = parameter_depths(model)
    if not layers:
        raise UserError(f"optim.layer_decay needs the model's layers, and no layer list was found in "
                        f"{type(model).__name__}: set optim.layer_decay=null.")
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            depth, decayed = depths[name], name not in no_decay
            group = groups.setdefault((depth, decayed), {
                "params": [], "weight_decay": weight_decay if decayed else 0.0,
                "lr": lr * layer_decay ** (layers + 1 - depth)})
            group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1]))]  # the head first


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
