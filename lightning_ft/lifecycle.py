"""The run lifecycle: atomic checkpoints, finding the checkpoint to resume from, checking that a checkpoint fits the
run, and stopping cleanly on preemption signals.

Exact resume has three parts: Lightning restores model, optimizer, scheduler, precision scaler and loop counters;
the training loader is a ``StatefulDataLoader`` over a sampler whose order depends only on (seed, epoch), so the
loader skips the batches already seen; and ``TaskModule`` saves and restores the random number generators.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from lightning_ft.errors import UserError

log = logging.getLogger("lightning_ft")
RESUME_CHOICES = (None, False, "auto")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside the target and renames it into place, so a process killed while
    saving leaves the previous complete checkpoint, never a truncated one. (Lightning, since 2.4, also saves inside
    an fsspec transaction, but fsspec stages a local file in the system temp directory, ``tempfile.mkstemp()`` with
    no ``dir``, and moves it into place on commit: where ``$TMPDIR`` is another filesystem than the run directory, as
    on most clusters, that move is a copy onto the target, which a kill can cut short, and a small ``$TMPDIR`` fails
    the save. A temporary file beside the target makes ``os.replace`` a rename within one filesystem: atomic.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = str(path)
        if "://" in target:  # remote filesystems: no rename there; keep Lightning's behaviour
            return super().save_checkpoint(checkpoint, path, storage_options)
        target_path = Path(target)
        target_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = target_path.with_name(f".{target_path.name}.partial")
        super().save_checkpoint(checkpoint, temporary, storage_options)
        os.replace(temporary, target_path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's contents (tensors memory-mapped, so this is cheap), or a UserError saying what is
    wrong with the file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"ckpt_path '{path}' is a directory: give a .ckpt file in it (e.g. "
                        f"{path / 'checkpoints' / 'last.ckpt'}), or model_dir= (predict) / resume=auto (train) for a "
                        "run directory.")
    if not path.is_file():
        raise UserError(f"ckpt_path '{path}' does not exist (resolved to {path.resolve()}): give the path of a .ckpt "
                        "file, e.g. <run dir>/checkpoints/last.ckpt, or resume=auto with run_dir=<run dir>.")
    try:
        # weights_only: a checkpoint is data. Unpickling anything else could run code the file carries.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err).lower().replace(" ", "_"):
            raise UserError(f"checkpoint '{path}' cannot be read, it is truncated or not a checkpoint "
                            f"({type(err).__name__}): give another checkpoint (with training, resume=auto takes the "
                            "newest good one of run_dir).") from err
        found = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "global" in line), "")
        raise UserError(f"checkpoint '{path}' holds more than tensors and plain data ({found or 'pickled objects'}), "
                        "so it is refused: lightning_ft loads checkpoints with weights_only=True and never runs code "
                        "from one. Give a checkpoint written by lightning_ft, or re-save only its state_dict.") from err
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise UserError(f"checkpoint '{path}' cannot be read, it is truncated or not a checkpoint "
                        f"({type(err).__name__}): give another checkpoint (with training, resume=auto takes the newest "
                        "good one of run_dir).") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"'{path}' is not a Lightning checkpoint (no state_dict in it): give a .ckpt written by a "
                        "lightning_ft run (<run dir>/checkpoints/).")
    return checkpoint


def find_resume_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint with training state in ``run_dir`` (``checkpoints/*.ckpt``, and the
    ``hpc_ckpt_*.ckpt`` of Lightning's own SLURM auto-requeue, which train.py turns off but another setup may have
    used), and its contents. Unreadable ones are skipped, with a warning."""
    candidates = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            checkpoint = read_checkpoint(path)
        except UserError as err:
            log.warning("resume=auto: skipping %s, %s Trying the previous checkpoint.", path, err)
            continue
        if "loops" not in checkpoint:
            log.warning("resume=auto: skipping %s: it holds weights only, no training state.", path)
            continue
        return path, checkpoint
    return None


def check_checkpoint_fits(checkpoint: dict[str, Any], path: str | Path, module: pl.LightningModule) -> None:
    """Refuse, in one sentence, a checkpoint written for another task, backbone or head size."""
    written = checkpoint.get("lightning_ft") or {}
    # By class name: a checkpoint written before the task packages records lightning_ft.tasks.ner.<Class>.
    task = type(module).__qualname__
    if written.get("task") and written["task"].rsplit(".", 1)[-1] != task:
        raise UserError(f"checkpoint '{path}' was written by {written['task'].rsplit('.', 1)[-1]} but this run is "
                        f"{task}: give a checkpoint of this task, or set task= to the checkpoint's task.")
    ours = (module.hparams.get("backbone") or {}).get("name")
    theirs = (written.get("backbone") or {}).get("name")
    if ours and theirs and ours != theirs:
        raise UserError(f"checkpoint '{path}' was trained from backbone '{theirs}' but this run builds "
                        f"'{ours}': set backbone.name={theirs} (or the backbone config it used), or give a "
                        "checkpoint of this backbone.")
    detail = weights_that_do_not_fit(module.state_dict(), checkpoint["state_dict"])
    if detail:
        raise UserError(f"checkpoint '{path}' does not fit this model: {detail}. It was written for another task, "
                        "backbone or label set: give a checkpoint of this run's task and backbone.")


def weights_that_do_not_fit(expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """What keeps ``found`` weights from loading into a module whose state dict is ``expected``, or None."""
    wrong = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in found and tuple(found[k].shape) != tuple(v.shape)]
    if wrong:
        return f"weights of another shape ({'; '.join(wrong[:3])})"
    missing = [k for k in expected if k not in found]
    return f"no weights for {', '.join(missing[:3])}" if missing else None


# Signals that ask for a checkpoint and, inside a SLURM job, a requeue (SIGTERM only asks for the checkpoint).
REQUEUE_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2") if hasattr(signal, name))
# Ctrl-C: the checkpoint too, as SIGTERM; a second Ctrl-C stops at once.
HANDLED_SIGNALS = (*REQUEUE_SIGNALS, signal.SIGINT)


class Preempted(Exception):
    """Raised after a preemption signal once the checkpoint is written; the entry point exits with 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM, SIGUSR1 or SIGUSR2 (what schedulers send before they stop a job: SLURM's ``--signal``, submitit's
    USR2), or SIGINT (Ctrl-C), finish the current training step, write ``last.ckpt`` and stop, so that
    ``resume=auto`` continues from that very step; a second Ctrl-C stops at once, without the checkpoint. Inside
    a SLURM job, SIGUSR1/SIGUSR2 also requeue the job: through submitit's own handler when submitit runs the job
    (it resubmits the same call), else with ``scontrol requeue``. (Lightning's SLURM auto-requeue is turned off
    by train.py: it saves from inside the signal handler, in the middle of a step.)"""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.received: int | None = None
        self.pending: Preempted | None = None
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signum
        if signum == signal.SIGINT:
            print("\nCtrl-C: finishing this step and saving last.ckpt (Ctrl-C again stops at once, without it).",
                  file=sys.stderr, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning's own handlers (which put back what they found on teardown).
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._put_back_handler()

    def _put_back_handler(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.pending is not None:
            return
        signum = self.received or (signal.SIGTERM if trainer.received_sigterm else None)
        if trainer.world_size > 1:  # every rank must take part in the save: stop if any rank was signalled
            if not trainer.strategy.reduce_boolean_decision(signum is not None, all=False):
                return
            signum = signum or signal.SIGTERM
        elif signum is None:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        name = signal.Signals(signum).name
        self.pending = Preempted(signum, f"received {name}: saved step {trainer.global_step} to {path} and stopped; "
                                         "run the same command with resume=auto (and the same run_dir) to continue.")
        if signum in REQUEUE_SIGNALS and os.environ.get("SLURM_JOB_ID"):
            self._requeue(trainer, signum)
        # The exit comes once the step's metrics are logged: Lightning raises at the end of the step on SIGTERM, and
        # the hooks below stop before anything else runs.

    def _requeue(self, trainer: pl.Trainer, signum: int) -> None:
        for logger in trainer.loggers:
            logger.save()  # the requeue ends this process soon: keep the rows logged so far
        previous = self._previous.get(signum)
        self._put_back_handler()
        if callable(previous):  # submitit's handler: it pickles the call again, requeues the job and exits
            previous(signum, None)
            return
        if not trainer.is_global_zero:
            return
        job = os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode == 0:
            log.warning("requeued SLURM job %s: it continues from %s", job, self.dirpath / "last.ckpt")
        else:
            log.warning("could not requeue SLURM job %s (scontrol: %s): resubmit it with resume=auto", job,
                        done.stderr.strip())

    def _stop(self, *args: Any) -> None:
        if self.pending is not None:
            raise self.pending

    on_train_batch_start = on_validation_start = on_train_epoch_end = _stop

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._put_back_handler()  # Lightning does not call teardown hooks after an exception
        if self.pending is not None and exception is not self.pending:
            log.warning("%s", self.pending)


class MonitorCheck(pl.Callback):
    """After the sanity-check validation, before the first training step: the monitored metric must be one that the
    task logs, or the run would train a whole epoch and then fail without a checkpoint."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import difflib

        logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
        if logged and self.monitor not in trainer.callback_metrics:
            close = [n for n in logged if n.startswith(self.monitor)] or \
                difflib.get_close_matches(self.monitor, logged, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"monitor={self.monitor} is not a metric this task logs{hint}: it logs "
                            f"{', '.join(logged)}; set monitor= to one of them.")


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger (``metrics.csv``), except that a resumed run keeps the rows its earlier attempts logged
    up to the checkpoint's step (``keep_until_step``; train.py sets it). Lightning's deletes the file whenever the
    folder is not empty, which would leave a resumed run's log starting at the resume point."""

    def __init__(self, *args: Any, keep_until_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_until_step = keep_until_step

    @property
    def experiment(self) -> Any:
        if self._experiment is not None or self.keep_until_step is None:
            return super().experiment
        import csv

        path = Path(self.log_dir) / "metrics.csv"
        fields: list[str] = []
        kept: list[dict[str, str]] = []
        if path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                fields = list(reader.fieldnames or [])
                kept = [r for r in reader if not r.get("step") or int(float(r["step"])) < self.keep_until_step]
        writer = super().experiment  # deletes metrics.csv
        if fields and writer is not None:
            with path.open("w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=fields)
                out.writeheader()
                out.writerows(kept)
            writer.metrics_keys = sorted(fields)
        return writer


# ---- loggers across a resume -------------------------------------------------------------------------------------
LOGGER_RUN_KEYS = {"WandbLogger": "id", "MLFlowLogger": "run_id"}  # the argument that reopens a logger's run


def build_loggers(nodes: Any, run_dir: Path, resume_step: int | None) -> list[tuple[str, Any]]:
    """The loggers configured in ``nodes`` (the ``logger`` group: name -> config); on a resume, wandb and MLflow
    reopen the run they logged to before, and the CSV log keeps the rows logged before the checkpoint's step."""
    from hydra.utils import instantiate

    saved_path = run_dir / "logger_runs.json"
    resuming = resume_step is not None
    saved = json.loads(saved_path.read_text()) if resuming and saved_path.is_file() else {}
    loggers = []
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        kind = str(node.get("_target_", "")).rsplit(".", 1)[-1]
        extra = {LOGGER_RUN_KEYS[kind]: saved[name]} if kind in LOGGER_RUN_KEYS and saved.get(name) else {}
        if extra and kind == "WandbLogger":
            extra["resume"] = "allow"
        if resuming and str(node.get("_target_")) == "lightning_ft.lifecycle.CSVLogger":
            extra["keep_until_step"] = resume_step
        loggers.append((name, instantiate(node, **extra)))
    return loggers


def save_logger_runs(loggers: list[tuple[str, Any]], run_dir: Path) -> None:
    """Record the wandb/MLflow run ids, so that a resume logs into the same runs."""
    runs = {}
    for name, logger in loggers:
        kind = type(logger).__name__
        if kind == "WandbLogger":
            runs[name] = logger.experiment.id
        elif kind == "MLFlowLogger":
            runs[name] = logger.run_id
    if runs:
        (run_dir / "logger_runs.json").write_text(json.dumps(runs, indent=2))
