"""What a run leaves for a reader: ``report.md`` (config summary, metrics, throughput, wall time), a learning curve
(``learning_curve.png``: training loss and the monitored validation metric against the step) and
``environment.json`` (package versions, the project's git commit). The history behind the curve is part of every
checkpoint, so a resumed run's curve starts at step 0 too."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST",
              "SLURM_NTASKS")
PACKAGES = ("lightning_ft", "torch", "pytorch-lightning", "transformers", "datasets", "tokenizers", "hydra-core",
            "torchmetrics", "torchdata")


def environment(argv: list[str] | None = None) -> dict[str, Any]:
    """Versions of Python and the packages that decide a run's numbers, and the git commit of lightning_ft's source
    (when it runs from a git checkout), with whether that checkout had uncommitted changes."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {"versions": versions, "platform": platform.platform(), "argv": list(argv or sys.argv)}
    slurm = {key.removeprefix("SLURM_").lower(): os.environ[key] for key in SLURM_KEYS if key in os.environ}
    if slurm:
        info["slurm"] = slurm
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                    capture_output=True, text=True, timeout=10)
            info["git_commit"] = commit.stdout.strip()
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # no git: the versions still say what ran
    return info


class RunRecord(pl.Callback):
    """Keeps the training loss (every ``log_every_n_steps``) and the validation metrics (every validation) by step,
    and the wall time; saved in checkpoints so a resumed run keeps the whole history."""

    def __init__(self) -> None:
        self.train_loss: list[tuple[int, float]] = []
        self.validation: list[dict[str, float]] = []
        self.wall_seconds = 0.0
        self._started = time.perf_counter()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def _elapsed(self) -> float:
        now = time.perf_counter()
        self.wall_seconds, self._started = self.wall_seconds + now - self._started, now
        return self.wall_seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # every step: a few MB over 100k steps, and the curve shows short runs too
            self.train_loss.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        self.validation.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **values})

    def state_dict(self) -> dict[str, Any]:
        return {"train_loss": self.train_loss, "validation": self.validation, "wall_seconds": self._elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_loss = [tuple(x) for x in state.get("train_loss", [])]
        self.validation = list(state.get("validation", []))
        self.wall_seconds = state.get("wall_seconds", 0.0)
        self._started = time.perf_counter()


def plot_learning_curve(record: RunRecord, monitor: str, path: Path) -> Path | None:
    """Training loss (left axis) and the monitored metric (right axis) against the optimizer step."""
    if not record.train_loss and not record.validation:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
    if record.train_loss:
        steps, losses = zip(*record.train_loss, strict=True)
        loss_axis.plot(steps, losses, color="tab:blue", marker="." if len(steps) < 50 else None, label="train/loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("train/loss", color="tab:blue")
    points = [(v["step"], v[monitor]) for v in record.validation if monitor in v]
    if points:
        metric_axis = loss_axis.twinx()
        steps, values = zip(*points, strict=True)
        metric_axis.plot(steps, values, color="tab:orange", marker="o", label=monitor)
        metric_axis.set_ylabel(monitor, color="tab:orange")
    loss_axis.set_title("learning curve")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def batch_size(dataset: dict[str, Any]) -> str:
    """A run's training batch: its rows, or its token budget (``dataset.max_tokens``)."""
    if dataset.get("max_tokens") is not None:
        return f"up to {dataset['max_tokens']} tokens"
    return str(dataset.get("batch_size"))


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]


def write_report(run_dir: Path, cfg: dict[str, Any], results: dict[str, Any], record: RunRecord | None) -> Path:
    """``report.md`` (and the learning curve it shows) for a finished run."""
    argv = results["environment"]["argv"]
    program = "python -m lightning_ft.train" if argv and argv[0].endswith("train.py") else (argv or [""])[0]
    lines = [f"# lightning_ft run: {run_dir.name}", "", f"Command: `{' '.join([program, *argv[1:]])}`", ""]
    backbone = cfg.get("backbone", {})
    trainer = cfg.get("trainer", {})
    dataset = cfg.get("dataset", {})
    summary = [
        ("task", str(cfg.get("task", {}).get("_target_", "")).rsplit(".", 1)[-1]),
        ("backbone", f"{backbone.get('name')}" + ("" if backbone.get("pretrained", True) else " (built from config)")),
        ("data", str(dataset.get("data_dir") or dataset.get("hub_name") or dataset.get("_target_"))),
        ("batch size", batch_size(dataset)),
        ("learning rate", str(cfg.get("optim", {}).get("lr"))),
        ("epochs / max steps", f"{trainer.get('max_epochs')} / {trainer.get('max_steps')}"),
        ("precision", str(results.get("precision"))),
        ("seed", str(cfg.get("seed"))),
        ("resumed from", str(results.get("resumed_from"))),
    ]
    lines += ["## Configuration", "", *_table(summary, ("setting", "value")), "",
              "The whole resolved config is in `config.yaml`, package versions in `environment.json`.", ""]
    metrics = [(f"{section}: {name}", f"{value:.4f}") for section in ("validation", "test")
               for name, value in sorted(results.get(section, {}).items())]
    if results.get("best_score") is not None:
        metrics.append((f"best {results['monitor']}", f"{results['best_score']:.4f}"))
    lines += ["## Metrics", "", *_table(metrics, ("metric", "value")), ""]
    if record is not None and record.validation:
        lines += ["Validation by step:", "", "| step | epoch | " + f"{results['monitor']} |", "|---|---|---|"]
        lines += [f"| {v['step']} | {v['epoch']} | {v.get(results['monitor'], float('nan')):.4f} |"
                  for v in record.validation]
        lines.append("")
    speed = results.get("throughput")
    if speed:
        rows = [("samples/s", f"{speed['samples_per_sec']:.1f}"), ("real tokens/s", f"{speed['tokens_per_sec']:.0f}"),
                ("padding", f"{speed['padding']:.1%}"), ("waiting for data", f"{speed['data_wait']:.1%}")]
        if "packing_efficiency" in speed:
            rows.append(("packed rows", f"{speed['packing_efficiency']:.1%} full, "
                                        f"{speed['examples_per_row']:.1f} examples a row"))
        if "mfu" in speed:
            rows.append(("MFU", f"{speed['mfu']:.1%}"))
        if "compile_graphs" in speed:
            rows.append(("torch.compile", f"{speed['compile_graphs']} graphs in {speed['compile_seconds']:.1f} s"))
        lines += ["## Throughput", "", *_table(rows, ("measure", "value")), ""]
    wall = results.get("wall_seconds")
    lines += ["## Time", "", f"Wall time of this process: {wall:.1f} s." if wall is not None else ""]
    if record is not None:
        lines.append(f"Training time over all attempts (resumes included): {record.wall_seconds:.1f} s.")
    lines.append("")
    if record is not None and plot_learning_curve(record, results["monitor"], run_dir / "learning_curve.png"):
        lines += ["## Learning curve", "", "![learning curve](learning_curve.png)", ""]
    for key, label in (("best_model_path", "Best checkpoint"), ("export_dir", "Hugging Face model")):
        if results.get(key):
            lines.append(f"{label}: `{results[key]}`  ")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_model_card(export_dir: Path, cfg: dict[str, Any], results: dict[str, Any], pipeline: str | None) -> Path:
    """``<export>/README.md``: a Hugging Face model card (metadata header, then text) saying what the exported model
    is and how it was made: base model, task, dataset, hyper-parameters, the final validation and test metrics,
    lightning_ft's version and the command. ``huggingface_hub.ModelCard.load`` reads it."""
    from huggingface_hub import ModelCard, ModelCardData

    import lightning_ft

    backbone, dataset = cfg.get("backbone") or {}, cfg.get("dataset") or {}
    base = backbone.get("name") if backbone.get("pretrained", True) else None
    source = dataset.get("hub_name") or (Path(str(dataset["data_dir"])).name if dataset.get("data_dir") else None)
    metrics = {**results.get("validation", {}), **results.get("test", {})}
    data = ModelCardData(base_model=base, datasets=[source] if dataset.get("hub_name") else None,
                         library_name="transformers", pipeline_tag=pipeline,
                         tags=["lightning_ft", str(results.get("task"))],
                         model_name=f"{results.get('task')} ({Path(export_dir).parent.name})")
    optim = {k: v for k, v in (cfg.get("optim") or {}).items() if not str(k).startswith("_")}
    trainer = {k: (cfg.get("trainer") or {}).get(k) for k in ("max_epochs", "max_steps", "precision",
                                                              "accumulate_grad_batches", "gradient_clip_val")}
    command = " ".join((results.get("environment") or {}).get("argv") or [])
    built = f"built from a config ({backbone.get('model_type') or backbone.get('name')})"
    rows = ", ".join(f"{split} {count}" for split, count in (results.get("data") or {}).get("examples", {}).items())
    lines = [
        f"# {results.get('task')} model, fine-tuned with lightning_ft {lightning_ft.__version__}", "",
        f"- Base model: {base or built}",
        f"- Task: `task={results.get('task')}`" + (f" (pipeline `{pipeline}`)" if pipeline else ""),
        f"- Data: {source or 'the embedded sample'} ({rows})",
        f"- Hyper-parameters: optimizer {optim}; batch size {batch_size(dataset)}, max length "
        f"{dataset.get('max_length')}; trainer {trainer}; seed {cfg.get('seed')}",
        f"- Best {results.get('monitor')}: {results.get('best_score')} (epoch {results.get('best_epoch')})", "",
        "## Metrics of the exported weights", "", "| metric | value |", "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())), "",
        "## How it was made", "", f"```bash\n{command or 'python -m lightning_ft.train'}\n```", "",
        f"lightning_ft {lightning_ft.__version__}; packages: {(results.get('environment') or {}).get('versions')}.",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    path = Path(export_dir) / "README.md"
    card.save(path)
    return path


def save_environment(run_dir: Path, argv: list[str] | None = None, write: bool = True) -> dict[str, Any]:
    info = environment(argv)
    if write:
        (run_dir / "environment.json").write_text(json.dumps(info, indent=2))
    return info


def print_summary(results: dict[str, Any], run_dir: Path) -> None:
    """The run's results on the console: metrics (per-type tables for stage/type/name metrics), example
    generations, throughput, data preparation and problems, where the export and the report are."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"lightning_ft results ({run_dir})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    before = results.get("before_training", {})
    if before:
        table.add_column("before training", justify="right")
    # Metrics named stage/group/name (e.g. test/PER/f1, one per entity type) get a table of their own.
    grouped: dict[str, dict[str, dict[str, float]]] = {}
    for section in ("validation", "test"):
        for name, value in sorted(results.get(section, {}).items()):
            parts = name.split("/")
            if len(parts) == 3:
                grouped.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = value
            else:
                table.add_row(name, f"{value:.4f}", *([f"{before[name]:.4f}" if name in before else ""] * bool(before)))
    if results.get("best_score") is not None:
        table.add_row(f"best {results['monitor']}", f"{results['best_score']:.4f}")
    console.print(table)
    for stage, groups in grouped.items():
        order = ["precision", "recall", "f1", "support"]
        columns = sorted({c for values in groups.values() for c in values}, key=lambda c: (c not in order,
                         order.index(c) if c in order else 0, c))
        per_group = Table(title=f"{stage} per type")
        per_group.add_column("type")
        for column in columns:
            per_group.add_column(column, justify="right")
        for group, values in groups.items():
            cells = [f"{values[c]:.0f}" if c == "support" else f"{values[c]:.4f}" for c in columns if c in values]
            per_group.add_row(group, *cells)
        console.print(per_group)
    for stage, examples in results.get("examples", {}).items():
        shown = Table(title=f"{stage}: example generations", show_lines=True)
        for column in ("row", "source", "prediction", "reference"):
            shown.add_column(column)
        for example in examples:
            cells = (example["source"], example["prediction"], example["references"][0])
            shown.add_row(str(example["row"]), *(c if len(c) <= 200 else c[:197] + "..." for c in cells))
        console.print(shown)
    speed = results.get("throughput")
    if speed:
        console.print(
            f"Training: {speed['samples']:.0f} samples in {speed['train_seconds']:.1f} s, "
            f"{speed['samples_per_sec']:.1f} samples/s, {speed['tokens_per_sec']:.0f} real tokens/s "
            f"({results['precision']}); padding {speed['padding']:.1%}, waiting for data {speed['data_wait']:.1%}"
            + (f", packed rows {speed['packing_efficiency']:.1%} full ({speed['examples_per_row']:.1f} examples a "
               "row)" if "packing_efficiency" in speed else "")
            + (f", MFU {speed['mfu']:.1%}" if "mfu" in speed else "")
            + (f", torch.compile {speed['compile_graphs']} graphs in {speed['compile_seconds']:.1f} s"
               if "compile_graphs" in speed else "")
            + f"; first step {speed['seconds_to_first_step']:.1f} s after start-up."
        )
    data = results.get("data")
    if data and data.get("streaming"):
        console.print("Data: streamed, tokenized while training.")
    elif data:
        done = (f"tokenized {data['examples_tokenized']} rows" if data["examples_tokenized"]
                else "read the tokenized splits from the cache")
        console.print(f"Data: {done} in {data['tokenize_seconds']:.1f} s.")
        for split, counts in data.get("problems", {}).items():
            found = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in counts.items())
            console.print(f"Data problems in {split} (details in the log above): {found}.")
    if results.get("skipped_nonfinite_steps"):
        console.print(f"Skipped {results['skipped_nonfinite_steps']} steps whose loss was not finite.")
    if results.get("export_dir"):
        console.print(f"Hugging Face model: {results['export_dir']}")
    console.print(f"Report: {results['report']}")
