"""Parameter-efficient fine-tuning through the ``peft`` library (``peft=lora``, ``peft=qlora``).

LoRA adapters go on the weight matrices inside the backbone's layers (found from its module names, see
``backbones.layer_stacks``) while the task head trains fully (peft's ``modules_to_save``). The settings are checked
first (``check``), before any model work; the export either merges the adapters into a plain Hugging Face directory
or writes peft's adapter directory.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from lightning_ft.backbones import head_modules, layer_stacks, linear_types, stack_linear_names
from lightning_ft.errors import UserError

METHODS = ("none", "lora", "qlora")
BIASES = ("none", "all", "lora_only")
DEFAULTS: dict[str, Any] = {"method": "none", "target_modules": None, "r": 8, "alpha": 16, "dropout": 0.05,
                            "bias": "none", "use_rslora": False, "use_dora": False, "merge": True,
                            "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


def settings(peft: dict[str, Any] | None) -> dict[str, Any] | None:
    """``peft`` with its defaults, or None for full fine-tuning (``peft=none``)."""
    if not peft or peft.get("method", "none") == "none":
        return None
    unknown = sorted(set(peft) - set(DEFAULTS))
    if unknown:
        raise UserError(f"peft.{unknown[0]} is not a peft setting: use {', '.join(sorted(DEFAULTS))}.")
    return {**DEFAULTS, **peft}


def check(peft: dict[str, Any] | None, backbone: dict[str, Any]) -> None:
    """Refuse, in one sentence naming the key, settings that cannot run, before any data or model work."""
    if peft and peft.get("method", "none") not in METHODS:
        raise UserError(f"peft={peft['method']} is not a method: use one of {', '.join(METHODS)}.")
    peft = settings(peft)
    if peft is None:
        return
    method = peft["method"]
    r, alpha, dropout = peft["r"], peft["alpha"], peft["dropout"]
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"peft.r={r!r} is not a positive whole number (the adapters' rank): give e.g. peft.r=8.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise UserError(f"peft.alpha={alpha!r} is not a positive number (the adapters' scale is alpha/r): give e.g. "
                        "peft.alpha=16.")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise UserError(f"peft.dropout={dropout!r} is not in [0, 1): give e.g. peft.dropout=0.05.")
    if peft["bias"] not in BIASES:
        raise UserError(f"peft.bias={peft['bias']!r} is not a choice: use one of {', '.join(BIASES)}.")
    targets = peft["target_modules"]
    if targets is not None and (not isinstance(targets, (list, tuple, str)) or not targets):
        raise UserError(f"peft.target_modules={targets!r} is not a list of layer names: give e.g. "
                        "peft.target_modules=[query,value], or null for every linear layer of the backbone's layers.")
    if backbone.get("freeze") is not None:
        raise UserError(f"backbone.freeze and peft={method} both choose what trains (peft trains the adapters and "
                        "the head, nothing else): set backbone.freeze=null, or peft=none.")
    if method == "qlora":
        if not torch_cuda() or importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("peft=qlora needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes), "
                            f"and this machine has {'no CUDA GPU' if not torch_cuda() else 'no bitsandbytes'}: use "
                            "peft=lora, or run on a CUDA machine.")
        if not (backbone.get("pretrained", True) and backbone.get("name")):
            raise UserError("peft=qlora quantizes pretrained weights, and this backbone is built from a config: use "
                            "peft=lora, or a pretrained backbone (backbone.name, backbone.pretrained=true).")
        if peft["merge"]:
            raise UserError("peft.merge=true with peft=qlora would round the adapters into 4-bit weights: keep "
                            "peft.merge=false (an adapter directory) and merge onto a full-precision base.")


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_kwargs(peft: dict[str, Any] | None) -> dict[str, Any]:
    """``from_pretrained``'s extra arguments: QLoRA's 4-bit quantization, on this process's GPU."""
    if peft is None or peft["method"] != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=peft["quant_type"],
                                      bnb_4bit_use_double_quant=peft["double_quant"],
                                      bnb_4bit_compute_dtype=getattr(torch, peft["compute_dtype"]))
    return {"quantization_config": quantization, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def target_pattern(model: Any, targets: list[str] | str | None) -> str:
    """peft's ``target_modules`` as a regular expression (peft matches it against whole module names): the named
    weight-matrix layers (default: all of them) inside the backbone's layer lists only, so a pooler's or the
    head's own ``dense`` gets no adapter."""
    stacks = [stack for stack, _ in layer_stacks(model)]
    names = stack_linear_names(model)
    if not names:
        kinds = linear_types()
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)})
        raise UserError(f"peft cannot wrap {type(model).__name__}: it found no linear layers inside a layer list "
                        f"({', '.join(stacks) or 'none found'}; its linear layers: {', '.join(linear) or 'none'}); "
                        "use peft=none, or backbone.freeze, with this backbone.")
    wanted = [targets] if isinstance(targets, str) else list(targets or names)
    unknown = [t for t in wanted if t not in names]
    if unknown:
        raise UserError(f"peft.target_modules names {', '.join(map(str, unknown))}, which is not a linear layer of "
                        f"{type(model).__name__}'s layers: choose from {', '.join(names)}.")
    layers = "|".join(re.escape(s) for s in stacks)
    return rf"(?:{layers})\.\d+\.(?:.*\.)?(?:{'|'.join(re.escape(t) for t in wanted)})"


def wrap(model: Any, peft: dict[str, Any], gradient_checkpointing: bool = False) -> Any:
    """A ``PeftModel`` around ``model`` (changed in place: its target layers gain the adapters, the rest is
    frozen, and the head is trained in full through ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    target = target_pattern(model, peft["target_modules"])
    head = head_modules(model)
    if peft["method"] == "qlora":
        # fp32 norms and head, and the inputs' gradients for checkpointed 4-bit layers: peft's own recipe.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    # GPT-2's Conv1D stores its weight transposed: peft must be told (it would otherwise say so and fix it itself).
    conv1d = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if re.fullmatch(target, n))
    config = LoraConfig(r=peft["r"], lora_alpha=peft["alpha"], lora_dropout=peft["dropout"], bias=peft["bias"],
                        use_rslora=peft["use_rslora"], use_dora=peft["use_dora"], target_modules=target,
                        modules_to_save=head or None, fan_in_fan_out=conv1d)
    try:
        wrapped = get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise UserError(f"peft cannot wrap {type(model).__name__} with these settings ({err}): use peft=none, "
                        "or other peft.target_modules.") from err
    if gradient_checkpointing and peft["method"] != "qlora" and not hasattr(model, "_require_grads_hook"):
        # Frozen embeddings give the first checkpointed layer an input without grad: transformers' hook makes the
        # embeddings' output require it, so that a reentrant checkpoint still gives its adapters gradients
        # (transformers sets it when it enables checkpointing for a model that reads input_ids).
        model.enable_input_require_grads()
    return wrapped


def parameter_counts(module: Any, wrapped: Any | None) -> tuple[int, int]:
    """(trainable, total) parameters: peft's count where there are adapters (it counts a 4-bit weight's
    elements, not its packed bytes), else the module's own."""
    if wrapped is not None:
        return wrapped.get_nb_trainable_parameters()
    params = list({id(p): p for p in module.parameters()}.values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_adapters(wrapped: Any, directory: Path, base_name: str | None, save_base: Any = None) -> None:
    """peft's adapter directory (``adapter_config.json``, the adapter weights and the trained head), naming its
    base model: ``base_name`` (a hub name or directory), or, for a base built from a config, ``save_base()``'s
    model saved beside it in ``base_model/``."""
    config = wrapped.peft_config["default"]
    if base_name is None:
        base_dir = directory / "base_model"
        save_base().save_pretrained(base_dir)
        base_name = str(base_dir.resolve())
    config.base_model_name_or_path = base_name
    wrapped.save_pretrained(directory)
