"""A run directory belongs to one run: a lock names the run writing it, and a finished run's record is never
overwritten.

- Training into a directory that holds another run's record (checkpoints, metrics, config, export) is refused,
  unless it continues that run (``resume=auto``, a SLURM requeue, or a ``ckpt_path`` inside it).
- An evaluation-only run (``train=false``) of a finished run writes its own files into a fresh
  ``evaluation-<time>/`` beside the record and leaves the record whole.
- While a run works in a directory, ``.lock`` (pid, host, start, SLURM job) keeps a second run out; a lock left by a
  process that is gone (same host), or by an earlier attempt of the same SLURM job, is taken over with a warning.

The checks run twice: from a Hydra callback before Hydra writes ``.hydra/`` into the directory, and in ``train``
itself (a run started from Python).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lightning_ft.errors import UserError

log = logging.getLogger("lightning_ft")
LOCK = ".lock"
# What a run leaves that another run must not overwrite (.hydra/, logs and marks are not a record).
RECORD = ("checkpoints", "metrics.json", "metrics.csv", "config.yaml", "report.md", "hf_model")


def env_rank() -> int:
    """The global rank from the launcher's environment (Lightning's order), without importing Lightning."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def record_in(run_dir: Path) -> list[str]:
    """The parts of a run's record that ``run_dir`` holds."""
    found = []
    for name in RECORD:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def settle_run_dir(run_dir: str | Path, *, train: bool, resume: Any, ckpt_path: str | None) -> Path:
    """Where this run writes: ``run_dir``, or for an evaluation of a finished run a fresh directory beside its
    record; a UserError for a run that would overwrite another run's record, or a run_dir that cannot be one."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir '{run_dir}' is a file: give a directory (a new one, or a run's own to continue "
                        "with resume=auto).")
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"run_dir '{run_dir}' cannot be written ({existing} is not writable): give a run_dir in a "
                        "folder you can write to.")
    found = record_in(run_dir) if run_dir.is_dir() else []
    if not found:
        return run_dir
    continuing = resume == "auto" or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 or (
        ckpt_path is not None and run_dir.resolve() in Path(ckpt_path).resolve().parents)
    if train and continuing:
        return run_dir
    if not train:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        target = run_dir / f"evaluation-{stamp}"
        number = 1
        while target.exists():
            number += 1
            target = run_dir / f"evaluation-{stamp}-{number}"
        return target
    raise UserError(f"run_dir '{run_dir}' already holds a run ({', '.join(found)}): continue it with resume=auto, "
                    "or give a fresh run_dir= (or leave run_dir out for a new dated one). lightning_ft never "
                    "overwrites a run.")


class RunDirLock:
    """``<run_dir>/.lock``: taken by the run that writes the directory, released when it ends (at exit too)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.held = False
        self.made_dir = False

    def acquire(self) -> RunDirLock:
        self.made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "slurm_job": os.environ.get("SLURM_JOB_ID")}
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder.get("pid") == mine["pid"] and holder.get("host") == mine["host"]:
                    return self  # this process holds it already (the Hydra callback took it)
                if holder is not None and _alive(holder):
                    raise UserError(
                        f"run_dir '{self.path.parent}' is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')}): wait for it to end, or give another "
                        f"run_dir. If that run is gone, delete {self.path}.") from None
                if holder is not None:
                    log.warning("run_dir %s: taking over the lock of a run that has ended (pid %s on %s, started %s).",
                                self.path.parent, holder.get("pid"), holder.get("host"), holder.get("started"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as out:
                json.dump(mine, out)
            self.held = True
            atexit.register(self.release)
            return self
        raise UserError(f"run_dir '{self.path.parent}': another run keeps taking its lock ({self.path}): give "
                        "another run_dir.")

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            if self.made_dir and self.path.parent.is_dir() and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a run refused before it wrote anything leaves no directory behind

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # gone, or cut short by a kill between creating and writing it
            return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the run that took a lock may still be running."""
    job = holder.get("slurm_job")
    if job and job == os.environ.get("SLURM_JOB_ID"):
        return False  # an earlier attempt of this very job: SLURM requeued it, so it has ended
    if holder.get("host") != socket.gethostname():
        return True  # another node's processes cannot be seen from here
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


class CheckRunDir(Callback):
    """Hydra callback, before Hydra writes anything into the run directory: refuses a run that would overwrite
    another's record or that ``hydra.run.dir`` would split, sends an evaluation of a finished run to its own
    directory, and takes the lock."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if env_rank() > 0:
            return  # ranks started beside rank 0 work in rank 0's directory
        try:
            run_dir = str(config.run_dir)
            hydra_dir = OmegaConf.select(config, "hydra.run.dir")
            if hydra_dir is not None and Path(str(hydra_dir)).resolve() != Path(run_dir).resolve():
                raise UserError(f"hydra.run.dir={hydra_dir} would put Hydra's files apart from the run's "
                                f"(run_dir={run_dir}): set run_dir= instead; hydra.run.dir follows it.")
            settled = settle_run_dir(run_dir, train=bool(config.train), resume=config.get("resume"),
                                     ckpt_path=config.get("ckpt_path"))
            if str(settled) != run_dir:
                log.info("run_dir %s holds a finished run: this evaluation writes into %s.", run_dir, settled)
                with read_write(config), open_dict(config):
                    config.run_dir = str(settled)  # hydra.run.dir is ${run_dir}: Hydra's files follow
            RunDirLock(settled).acquire()
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
