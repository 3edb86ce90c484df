"""What the benchmarks share: the lightning_ft side built from the shipped configs, and the machine description."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# A benchmark measures the lightning_ft of the clone it sits in, not whichever one `pip install -e` last named.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# The benchmarks' --precision choices as Lightning precisions (bf16: autocast over fp32 weights, as the HF Trainer's
# bf16=True does).
PRECISIONS = {"bf16": "bf16-mixed", "fp32": "32-true"}


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
    from lightning_ft.throughput import bf16_is_native

    # bf16 figures depend on it most: emulated bf16 ran 5.3x slower than fp32 on an AVX2 machine of this project
    isa = f"{torch.backends.cpu.get_cpu_capability()}, bf16 {'native' if bf16_is_native('cpu') else 'emulated'}"
    return (f"{cpu} ({isa}), {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; {versions}; "
            f"lightning_ft {commit}")


def lightning_timer():
    """A Lightning callback timing train start to train end, counting the samples and (real) tokens it saw."""
    import time

    import pytorch_lightning as pl

    class Timer(pl.Callback):
        seconds, samples, tokens, real_tokens = 0.0, 0, 0, 0

        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.tokens += batch["input_ids"].numel()
            if "example_lengths" in batch:  # packed examples (dataset.packing=true): several to a row
                self.samples += len(batch["example_lengths"])
                self.real_tokens += int(batch["example_lengths"].sum())
                return
            self.samples += len(batch["input_ids"])
            mask = batch.get("attention_mask")  # packed LM blocks have none: every token is real
            self.real_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    return Timer()


def timed_trainer(timer, **settings):
    """The Lightning Trainer every benchmark trains with: CPU, clipping at 1.0, no evaluation, logging or
    checkpoints inside the timed fit (``settings`` adds or changes Trainer arguments, e.g. max_epochs)."""
    import pytorch_lightning as pl

    return pl.Trainer(**{
        "accelerator": "cpu", "devices": 1, "gradient_clip_val": 1.0, "limit_val_batches": 0,
        "num_sanity_val_steps": 0, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "callbacks": [timer], **settings,
    })


def hf_timer(counts: dict | None = None):
    """A transformers TrainerCallback timing train begin to train end. ``counts`` (filled by the caller's collator)
    is zeroed when training begins and copied to ``timer.counts`` when it ends, so warm-up work is not counted."""
    import time

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        seconds = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            if counts is not None:
                counts.update(dict.fromkeys(counts, 0))
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start
            self.counts = dict(counts or {})

    return Timer()


def report_heading(title: str, script: str, machine_extra: str = "") -> list[str]:
    """A RESULTS.md section's first lines: ``title`` with today's date, the command that ran (``script``, this
    benchmark's file, with its arguments) and the machine (``machine_extra`` appended, e.g. a peer's version)."""
    command = f"python benchmarks/{Path(script).name} {' '.join(sys.argv[1:])}".strip()
    return [f"\n## {title} ({datetime.date.today()})\n", f"Command: `{command}`  ",
            f"Machine: {environment()}{machine_extra}  "]


def append_report(path: str, report: str) -> None:
    """Print a benchmark's markdown section, append it to RESULTS.md (or ``path``) and rebuild the file's summary
    table from its sections' summary lines (``summary_line``), where the file has one."""
    from summary import rebuild

    print(report)
    results = Path(path)
    tmp = Path(f"{path}.tmp")  # written whole, then renamed: an interrupted run leaves the old file as it was
    tmp.write_text(rebuild((results.read_text() if results.exists() else "") + report))
    tmp.replace(results)


def summary_line(task: str, side: str, peer: str, rate: float | None, unit: str, ratio: float | None, metric: str,
                 seeds: int) -> str:
    """One row of RESULTS.md's summary table as the line a section carries (an HTML comment, unseen when rendered):
    ``side``'s ``rate`` in ``unit`` on ``task``, its ``ratio`` to ``peer``'s rate in the same run, the ``metric``
    in words and the number of ``seeds``. ``benchmarks/summary.py`` keeps the latest line of each task and side."""
    record = {"task": task, "side": side, "peer": peer, "rate": None if rate is None else round(rate, 1),
              "unit": unit, "ratio": None if ratio is None else round(ratio, 2), "metric": metric, "seeds": seeds}
    return f"<!-- summary {json.dumps(record)} -->"


def paired_difference(values: list[float], base: list[float]) -> tuple[float, float | None]:
    """The mean of ``values - base`` paired by seed, and the half-width of its 95% t interval (None for one seed)."""
    from scipy import stats

    diffs = [v - b for v, b in zip(values, base, strict=True)]
    if len(diffs) < 2:
        return statistics.fmean(diffs), None
    return statistics.fmean(diffs), stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5


def metric_words(name: str, values: list[float], base: list[float] | None = None, digits: int = 4) -> str:
    """A summary row's metric: ``name``'s mean over the seeds and, against a reference's ``base`` on the same
    seeds, the paired difference with its 95% interval."""
    words = f"{name} {'mean ' if len(values) > 1 else ''}{statistics.fmean(values):.{digits}f}"
    if base is None:
        return words
    mean, half = paired_difference(values, base)
    return words + f", difference {mean:+.{digits}f}" + (
        f" [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]" if half is not None else " (one seed)")


def paired_table(reference: str, runs: dict[str, list[float]], digits: int = 4) -> list[str]:
    """Markdown rows comparing each side's per-seed metric with ``reference``'s on the same seeds: each side's mean
    and standard deviation, and the mean paired difference (side minus reference) with its 95% t interval. An
    interval that excludes zero is a difference the seeds resolve; one that holds zero is not."""
    base = runs[reference]
    rows = [f"| side | seeds | mean | std | difference to {reference} | 95% interval | resolved |",
            "|---|---|---|---|---|---|---|"]
    for side, values in runs.items():
        mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")
        if side == reference:
            rows.append(f"| {side} | {len(values)} | {mean:.{digits}f} | {std:.{digits}f} | | | |")
            continue
        mean_diff, half = paired_difference(values, base)
        if half is not None:
            interval = f"[{mean_diff - half:+.{digits}f}, {mean_diff + half:+.{digits}f}]"
            resolved = "yes" if mean_diff - half > 0 or mean_diff + half < 0 else "no (holds 0)"
        else:
            interval, resolved = "one seed: none", ""
        rows.append(f"| {side} | {len(values)} | {mean:.{digits}f} | {std:.{digits}f} | {mean_diff:+.{digits}f} | "
                    f"{interval} | {resolved} |")
    return rows
