"""The keys a composed config has, and the closest ones to a mistyped key: Hydra refuses an unknown key in a
struct config ("Key 'val_fractio' is not in struct"); these turn that into one sentence naming the keys meant."""

from __future__ import annotations

import difflib
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# Hydra's words for an override of a key the config does not have, and for a `+key` the config has already.
_NOT_A_KEY = re.compile(r"Could not override '([^']+)'")
_ALREADY_A_KEY = re.compile(r"Could not append to config\. An item is already at '([^']+)'")
# And for a group option that does not exist (task=nosuch).
_NO_OPTION = re.compile(r"Could not find '([\w/]+)/([^'/]+)'")


def _plain(cfg: Any) -> Any:
    """A plain copy of a config: dicts and lists, interpolations unresolved (one that fails hides no key)."""
    return OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


def dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every key of ``cfg`` as a dotted path (``dataset.data_files.train``), parents before their children."""
    out: list[str] = []
    cfg = _plain(cfg)
    for key, value in (cfg.items() if isinstance(cfg, dict) else []):
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out.extend(dotted_keys(value, f"{path}."))
    return out


def _children(cfg: dict, path: list[str]) -> list[str] | None:
    """The keys of the dict at ``path`` of a plain config (None where there is no dict there)."""
    node: Any = cfg
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if node is None and path:  # a null node (data_files: null) has no keys yet
        return []
    return [str(k) for k in node] if isinstance(node, dict) else None


def closest_keys(cfg: Any, dotted_key: str, n: int = 3) -> list[str]:
    """The keys of ``cfg`` (dotted paths) a mistyped ``dotted_key`` most likely meant, best first (at most ``n``;
    none when nothing is close; ``[dotted_key]`` when it is a key).

    In order: the same last name under another node (``trainer.val_fraction`` -> ``dataset.val_fraction``); the
    closest names at the first level where ``dotted_key`` leaves the config (``dataset.val_fractio`` ->
    ``dataset.val_fraction``, ``datset.val_fraction`` -> ``dataset.val_fraction``); then the closest whole paths."""
    cfg = _plain(cfg)
    if not isinstance(cfg, dict):
        return []
    key = dotted_key.lstrip("+~").split("=", 1)[0]
    everything = dotted_keys(cfg)
    if key in everything:
        return [key]
    parts = key.split(".")
    found = [k for k in everything if k.rsplit(".", 1)[-1] == parts[-1]]
    found += _along_the_path(cfg, parts, everything)
    if not found:
        found = difflib.get_close_matches(key, everything, n=n, cutoff=0.75)
    return list(dict.fromkeys(found))[:n]


def _along_the_path(cfg: Any, parts: list[str], everything: list[str]) -> list[str]:
    """Keys that fix ``parts`` where it first leaves the config, then further down."""
    depth = 0
    while depth < len(parts) and _children(cfg, parts[: depth + 1]) is not None:
        depth += 1
    if depth == len(parts):
        return []  # every part is there, but under a value rather than a node
    found = []
    for name in difflib.get_close_matches(parts[depth], _children(cfg, parts[:depth]) or [], n=3, cutoff=0.6):
        fixed = [*parts[:depth], name, *parts[depth + 1:]]
        if ".".join(fixed) in everything or depth + 1 == len(parts):
            found.append(".".join(fixed))
        elif _children(cfg, fixed[: depth + 1]) is not None:  # a node: fix the rest of the path under it
            found += _along_the_path(cfg, fixed, everything)
    return found


def override_error(cfg: Any, message: str) -> str | None:
    """One sentence for Hydra's refusal of an override (``str`` of its ConfigCompositionException), naming the keys
    the user most likely meant; None for any other error (let Hydra's own message speak). ``cfg``: the config
    composed without the refused override."""
    already = _ALREADY_A_KEY.search(message)
    if already:
        key = already.group(1)
        return f"{key} is already a key of the config: set it without the + ({key}=...)."
    unknown = _NOT_A_KEY.search(message)
    if not unknown:
        return None
    key = unknown.group(1)
    cfg = _plain(cfg)
    close = closest_keys(cfg, key)
    if close:
        return f"{key} is not a key of the config: did you mean {' or '.join(close)}?"
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    children = _children(cfg, parent.split(".")) if parent else None
    if children:
        return f"{key} is not a key of the config: {parent} has {', '.join(sorted(children))}."
    return f"{key} is not a key of the config: check its spelling (python -m lightning_ft.train --cfg job lists them)."


def check_overrides(args: list[str], config_name: str = "train") -> str | None:
    """Compose the shipped config with a command line's overrides; one sentence for an override of a key the config
    lacks (or a ``+`` on a key it has), naming the keys meant; None when it composes, or fails for another reason
    (Hydra's own message then speaks: a sweep, a missing group option...). Flags (``-m``, ``--cfg job``) are left
    to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    from lightning_ft.paths import config_dir

    overrides, skip = [], False
    for arg in args:
        if skip or arg.startswith("-"):  # a flag, or the value of one (--cfg job, --config-name x)
            skip = arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                           "--info", "-i", "--experimental-rerun")
            continue
        overrides.append(arg)
    overrides = _first_of_each_sweep(overrides)

    def composed(these: list[str]) -> Any:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name, overrides=these, return_hydra_config=True)

    try:
        composed(overrides)
        return None
    except ConfigCompositionException as err:
        message = str(err)
    except Exception:  # noqa: BLE001 - not a key problem: Hydra's own run reports it
        return None
    finally:
        GlobalHydra.instance().clear()
    missing = _NO_OPTION.search(message)
    if missing:
        return _unknown_option(missing.group(1), missing.group(2))
    found = _NOT_A_KEY.search(message) or _ALREADY_A_KEY.search(message)
    if not found:
        return None
    bad = found.group(1)
    rest = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != bad]
    try:
        cfg = composed(rest)
    except Exception:  # noqa: BLE001 - another bad override: name this key without suggestions
        cfg = {}
    finally:
        GlobalHydra.instance().clear()
    return override_error(_plain(cfg), message)


def _unknown_option(group: str, option: str) -> str:
    """One sentence for ``group=option`` where conf/<group>/ has no such file, listing the ones it has."""
    from lightning_ft.paths import config_dir

    folder = config_dir() / group
    have = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_")) if folder.is_dir() else []
    close = difflib.get_close_matches(option, have, n=1)
    hint = f" (did you mean {group}={close[0]}?)" if close else ""
    listed = f": use one of {', '.join(have)}" if have else ""
    return f"{group}={option} is not a {group} config{hint}{listed} (conf/{group}/, or a file of your own there)."


def _first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A multirun's overrides with each sweep (``optim.lr=1e-5,3e-5``, ``range(...)``) at its first value, so that
    its key is checked too (compose takes no sweeps); a sweep with no first value (an Optuna interval) is left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # noqa: BLE001 - a malformed override: compose reports it
            out.append(text)
            continue
        if not override.is_sweep_override():
            out.append(text)
            continue
        try:
            first = next(iter(override.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - interval(...) and the like
            continue
        out.append(f"{override.get_key_element()}={first}")
    return out
