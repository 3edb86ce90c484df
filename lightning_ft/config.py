"""OmegaConf resolvers the shipped configs use; registered by the entry points and the tests."""

from omegaconf import OmegaConf

from lightning_ft.paths import sample_dir


def register_resolvers() -> None:
    """``${sample_dir:sst2}``: the folder of an embedded sample, in a clone or an installed package."""
    if not OmegaConf.has_resolver("sample_dir"):
        OmegaConf.register_new_resolver("sample_dir", lambda name="": str(sample_dir(name)))
