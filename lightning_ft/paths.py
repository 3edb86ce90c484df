"""Where the shipped configs and embedded samples live, in a clone and after a non-editable install alike."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _shipped(installed: str, in_clone: str) -> Path:
    # A wheel installs conf/ and data/ inside the package; a clone (or an editable install) keeps them beside it.
    inside = _PACKAGE / installed
    return inside if inside.is_dir() else _PACKAGE.parent / in_clone


def config_dir() -> Path:
    """The folder of the shipped Hydra configs (``conf/``)."""
    return _shipped("conf", "conf")


def sample_dir(name: str = "") -> Path:
    """The folder of an embedded sample dataset (``data/<name>``)."""
    return _shipped("samples", "data") / name
