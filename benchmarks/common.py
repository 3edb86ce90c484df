"""What the benchmarks share: the lightning_ft side built from the shipped configs, and the machine description."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def lightning_ft_module(overrides: list[str], seed: int):
    """The task module and DataModule that ``python -m lightning_ft.train <overrides> seed=<seed>`` would train."""
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_ft.backbones import load_tokenizer
    from lightning_ft.config import register_resolvers
    from lightning_ft.paths import config_dir
    from lightning_ft.train import build_task

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"seed={seed}", "run_dir=unused"])
    pl.seed_everything(seed, workers=True)
    tokenizer = load_tokenizer(**cfg.backbone)
    datamodule = instantiate(cfg.dataset, tokenizer=tokenizer, seed=seed, _convert_="all")
    datamodule.prepare_data()
    return build_task(cfg, datamodule), datamodule


def environment() -> str:
    import datasets
    import pytorch_lightning
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    versions = ", ".join(f"{name} {version}" for name, version in [
        ("Python", platform.python_version()), ("torch", torch.__version__),
        ("pytorch-lightning", pytorch_lightning.__version__), ("transformers", transformers.__version__),
        ("datasets", datasets.__version__)])
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; {versions}; lightning_ft {commit}"
