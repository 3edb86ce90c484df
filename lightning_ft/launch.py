"""How a run is launched: its rank, its job's run directory and command line in a multirun, the rank-0 data
handshake, the SLURM environment, and leaving the process clean for the next job of a sweep.

One run directory serves every rank. Lightning starts ranks 1..N-1 of a one-machine run by re-running
``sys.argv``; srun and torchrun start all ranks together. Either way rank 0 tokenizes (and trains a tokenizer for a
model built from a config) and the others wait for its mark, then read the cache.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lightning_ft.errors import UserError

DATA_READY = ".data_ready"  # rank 0 writes it in the run directory once the tokenizer and the tokenized cache exist
# What Lightning's launcher puts in the environment of rank 0 when it starts ranks 1..N-1 itself.
RANK_KEYS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # the first one set is the rank
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_rank() -> int:
    """This process's global rank as its launcher set it (Lightning's rule: RANK, LOCAL_RANK, SLURM_PROCID), known
    before any Trainer exists: ranks > 0 write nothing to the run directory."""
    rank_zero = sys.modules.get("lightning_fabric.utilities.rank_zero")
    if rank_zero is not None:  # Lightning is loaded: the rank it holds (it may have been set since)
        return int(getattr(rank_zero.rank_zero_only, "rank", 0) or 0)
    # Lightning's rule (lightning_fabric.utilities.rank_zero._get_rank; tests/test_distributed.py pins that the two
    # agree), read without importing Lightning, which takes 6 s: a config error answers before it.
    return next((int(os.environ[key]) for key in RANK_KEYS if os.environ.get(key) is not None), 0)


def _launch_id() -> str:
    """What every rank of one launch shares, and the next launch (a requeue) does not."""
    keys = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID")
    return ";".join(os.environ.get(key, "") for key in keys)


def mark_data_ready(run_dir: Path) -> None:
    """Rank 0: the tokenizer and the tokenized cache exist for this launch."""
    (run_dir / DATA_READY).write_text(_launch_id())


def wait_for_rank_zero_data(run_dir: Path, timeout_s: float = 3600.0) -> None:
    """Ranks > 0 wait until rank 0 has trained the tokenizer (a model built from a config) and tokenized the data,
    so that no rank tokenizes again or trains a tokenizer of its own. Ranks that Lightning starts itself come after
    rank 0 prepared the data and find the mark at once; ranks that srun or torchrun start beside rank 0 wait."""
    marker, launch, started = run_dir / DATA_READY, _launch_id(), time.monotonic()
    while not (marker.is_file() and marker.read_text() == launch):
        if time.monotonic() - started > timeout_s:
            raise UserError(f"rank {launch_rank()} waited {timeout_s:.0f} s for rank 0 to prepare the data in "
                            f"{run_dir}: look at rank 0's log for its error.")
        time.sleep(0.5)


def cluster_environment() -> list[Any]:
    """Inside a SLURM job: Lightning's SLURM environment (ranks from SLURM) without its auto-requeue, which saves
    from inside the signal handler in the middle of a step; PreemptionCheckpoint saves at the step's end and
    requeues instead."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def job_run_dir(cfg: DictConfig) -> tuple[str, bool]:
    """This job's run directory, absolute, and whether the job is part of a multirun. In a multirun each job writes
    into its own sweep subdirectory, unless its overrides give run_dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return str(Path(cfg.run_dir).resolve()), False
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    given = any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in hydra_cfg.overrides.task)
    run_dir = hydra_cfg.runtime.output_dir if multirun and not given else cfg.run_dir
    return str(Path(run_dir).resolve()), multirun


def pin_job_command(run_dir: str) -> list[str]:
    """Set ``sys.argv`` (and Hydra's ``run.dir``) to the command line that runs this job alone, in ``run_dir``, and
    return the command line as it was. With several devices on one machine, Lightning starts ranks 1..N-1 by
    re-running ``sys.argv`` plus Hydra's ``hydra.run.dir``. In a multirun sys.argv still holds the whole sweep
    (``-m optim.lr=1e-5,3e-5``), so every rank would start the sweep again; and ``run_dir`` comes from the clock, so
    a rank started a second later would write to another directory."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    original = list(sys.argv)
    if not HydraConfig.initialized():
        return original
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = run_dir  # Lightning passes it on as hydra.run.dir (where a rank's log file goes)
    overrides = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") != "run_dir"]
    sys.argv = [sys.argv[0], *overrides, f'run_dir="{run_dir}"']
    return original


def launcher_environment() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in LAUNCHER_ENV}


def end_distributed_job(launcher_env: dict[str, str | None]) -> None:
    """Leave the process as the job found it, so the next job of a multirun can start its own ranks: Lightning keeps
    the process group, and reads LOCAL_RANK in the environment as "ranks were started by someone else" (the next
    job would then wait for ranks that have exited)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in launcher_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
