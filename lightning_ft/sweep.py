"""Sweeps (``python -m lightning_ft.train -m ...``: a grid, ``hparams_search=optuna``, or jobs on SLURM).

Two Hydra callbacks, set in ``conf/train.yaml``:

- ``CheckSweep``, before any job starts or is submitted: every key a search space names must exist in the config,
  and the SLURM launcher's tasks per node must match ``trainer.devices``.
- ``SweepSummary``, when the sweep ends: ``summary.md`` and ``summary.csv`` in the sweep directory (one row per run:
  its swept values, the best monitored metric, the epoch it was reached, the run directory) and ``summary.png``
  (the metric against each swept value).

``python -m lightning_ft.sweep <sweep dir>`` writes the summary again, e.g. for a sweep still running on a cluster.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_ft.errors import UserError

log = logging.getLogger("lightning_ft")
_ABSENT = object()


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, DictConfig):
        return [prefix]
    keys = [prefix] if prefix else []
    for key in node:
        keys += _leaf_keys(node._get_node(key), f"{prefix}.{key}" if prefix else str(key))
    return keys


def check_search_space(config: DictConfig) -> None:
    """Refuse a search space (``hydra.sweeper.params``) naming a key the config does not have, with the closest
    keys; a ``+key`` adds one and is let through."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    app = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    for key in params:
        name = str(key).lstrip("~")
        if name.startswith("+") or name in choices:
            continue
        if OmegaConf.select(app, name, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            close = difflib.get_close_matches(name, _leaf_keys(app), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"the search space (hydra.sweeper.params) names '{name}', which the config does not "
                            f"have.{hint} Fix the key, or write +{name} to add a new one.")


def check_slurm_launcher(config: DictConfig) -> None:
    """Lightning takes its ranks from SLURM's tasks: one task per device, or it stops after the job has queued."""
    launcher = OmegaConf.select(config, "hydra.launcher") or {}
    if "slurm" not in str(launcher.get("_target_", "")).lower():
        return
    tasks, devices = launcher.get("tasks_per_node"), OmegaConf.select(config, "trainer.devices")
    if isinstance(tasks, int) and isinstance(devices, int) and tasks != devices:
        raise UserError(f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}: Lightning runs one "
                        f"SLURM task per device, so set both to the same number.")
    nodes, num_nodes = launcher.get("nodes"), OmegaConf.select(config, "trainer.num_nodes", default=1)
    if isinstance(nodes, int) and isinstance(num_nodes, int) and nodes != num_nodes:
        raise UserError(f"hydra.launcher.nodes={nodes} but trainer.num_nodes={num_nodes}: set both to the same "
                        f"number (add +trainer.num_nodes={nodes} if your trainer config has no num_nodes).")


class CheckSweep(Callback):
    """Checks a sweep's settings before any job runs or is submitted."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_search_space(config)
            check_slurm_launcher(config)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


FAILED = "failed.json"  # a job that failed writes its error here, and the sweep goes on with the next job


def record_failure(run_dir: str | Path, error: BaseException) -> None:
    """A sweep job's failure, for the summary (the job's own log has the details)."""
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED).write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}, indent=2))


class SweepSummary(Callback):
    """Writes the sweep's summary table and plot when the sweep ends; exits non-zero when a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        written = write_summary(sweep_dir)
        if written:
            log.info("Sweep summary: %s", written)
        failed = [run for run in (collect_runs(sweep_dir) if sweep_dir.is_dir() else []) if run["status"] == "failed"]
        if failed:
            print(f"error: {len(failed)} of the sweep's jobs failed ({', '.join(r['job'] for r in failed)}): see "
                  f"{written or sweep_dir} and each job's failed.json and log.", file=sys.stderr)
            sys.exit(1)


# ---- the summary --------------------------------------------------------------------------------------------------
def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One entry per job directory of the sweep: its overrides and what its metrics.json says (nothing yet, if the
    job is running or failed)."""
    runs = []
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra" / "overrides.yaml").is_file()]
    for job in sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        overrides = {}
        for item in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []:
            key, _, value = str(item).partition("=")
            overrides[key.lstrip("+~")] = _value(value)
        metrics_path = job / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        failure = json.loads((job / FAILED).read_text()) if (job / FAILED).is_file() else None
        status = "failed: " + failure["error"][:80] if failure else "done" if metrics else "no result"
        runs.append({"job": job.name, "overrides": overrides, "monitor": metrics.get("monitor"),
                     "best": metrics.get("best_score"), "epoch": metrics.get("best_epoch"), "run_dir": str(job),
                     "status": "failed" if failure else status, "error": failure["error"] if failure else None})
    return runs


def swept_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The override keys whose value is not the same in every run."""
    keys = sorted({k for run in runs for k in run["overrides"]})
    return [k for k in keys if len({json.dumps(run["overrides"].get(k), default=str) for run in runs}) > 1]


def _best(runs: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    scored = [run for run in runs if isinstance(run["best"], (int, float)) and math.isfinite(run["best"])]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda run: run["best"])


def write_summary(sweep_dir: Path, mode: str | None = None) -> Path | None:
    """summary.csv, summary.md and summary.png in ``sweep_dir``; returns the markdown file (None: no runs)."""
    runs = collect_runs(sweep_dir) if sweep_dir.is_dir() else []
    if not runs:
        return None
    keys = swept_keys(runs) or sorted({k for run in runs for k in run["overrides"]})
    monitor = next((run["monitor"] for run in runs if run["monitor"]), "metric")
    mode = mode or _mode_of(sweep_dir)
    header = ["job", *keys, f"best {monitor}", "epoch", "status", "run_dir"]
    table = [[run["job"], *(run["overrides"].get(k, "") for k in keys), run["best"], run["epoch"],
              f"failed ({run['error'][:100]})" if run.get("error") else run["status"], run["run_dir"]] for run in runs]
    with (sweep_dir / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(table)
    lines = [f"# Sweep summary: {sweep_dir}", "", f"{len(runs)} runs; metric: {monitor} ({mode})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    swept = range(1, 1 + len(keys))  # columns of swept values (a learning rate needs significant digits)
    lines += ["| " + " | ".join(_cell(cell, "g" if i in swept else "f") for i, cell in enumerate(row)) + " |"
              for row in table]
    best = _best(runs, mode)
    if best:
        settings = ", ".join(f"{k}={_cell(best['overrides'].get(k), 'g')}" for k in keys)
        lines += ["", f"Best: job {best['job']} ({settings}): {monitor} {best['best']:.4f} at epoch {best['epoch']}, "
                      f"{best['run_dir']}"]
    plot = _plot(runs, keys, monitor, sweep_dir / "summary.png")
    if plot:
        lines += ["", f"![{monitor} against the swept values]({plot.name})"]
    path = sweep_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(value: Any, style: str) -> str:
    """A value in the summary: floats to 4 significant digits ("g", swept values) or 4 decimals ("f", metrics)."""
    if value is None:
        return ""
    return f"{value:.4{style}}" if isinstance(value, float) else str(value)


def _mode_of(sweep_dir: Path) -> str:
    """max or min: what the sweep's runs recorded as their monitor mode (config.yaml), max if none says."""
    for config in sorted(sweep_dir.glob("*/config.yaml")):
        mode = (yaml.safe_load(config.read_text()) or {}).get("monitor_mode")
        if mode in ("max", "min"):
            return mode
    return "max"


def _plot(runs: list[dict[str, Any]], keys: list[str], monitor: str, path: Path) -> Path | None:
    points = [run for run in runs if isinstance(run["best"], (int, float))]
    if not points or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), dpi=100, squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        values = [run["overrides"].get(key) for run in points]
        scores = [run["best"] for run in points]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            axis.scatter(values, scores)
            positive = [v for v in values if v > 0]
            if len(positive) == len(values) and max(values) / min(values) >= 10:
                axis.set_xscale("log")  # learning rates and the like span decades
        else:
            labels = sorted({str(v) for v in values})
            axis.scatter([labels.index(str(v)) for v in values], scores)
            axis.set_xticks(range(len(labels)), labels)
        axis.set_xlabel(key)
        axis.set_ylabel(monitor)
    figure.suptitle(f"best {monitor} per run")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write a sweep's summary (summary.md/.csv/.png) from its job dirs.")
    parser.add_argument("sweep_dir", help="the sweep directory (hydra.sweep.dir), holding one folder per job")
    parser.add_argument("--mode", choices=("max", "min"), default=None, help="which is best (default: the runs')")
    args = parser.parse_args(argv)
    path = write_summary(Path(args.sweep_dir), args.mode)
    if path is None:
        print(f"error: no sweep jobs (folders with .hydra/overrides.yaml) in {args.sweep_dir}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
