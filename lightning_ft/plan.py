"""What one run will do, resolved and checked once from the composed config, before any data or model work.

``train.py`` builds a ``RunPlan`` right after composition and hands its values on; the composed config is never
edited. What only the task module can say (its default monitored metric) is added with ``RunPlan.monitoring``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from lightning_ft.errors import UserError

log = logging.getLogger("lightning_ft")


@dataclass(frozen=True)
class RunPlan:
    """The values a run needs, validated.

    Attributes:
        run_dir: every file of the run goes here (one directory for every rank).
        rank: this process's global rank as its launcher set it; ranks > 0 write nothing.
        ckpt_path: the checkpoint to resume (training) or to evaluate (``train=false``), or None.
        resume_step: the global step a training run continues from (None: a fresh start).
        precision: the Trainer's precision, ``auto`` resolved for this device.
        skip_nonfinite: skip a training step whose loss is NaN/inf instead of stopping.
        monitor, monitor_mode: the metric that picks the best checkpoint (after ``monitoring``).
        command: the command line recorded in ``environment.json``.
    """

    run_dir: Path
    rank: int
    seed: int
    train: bool
    test: bool
    export: bool
    validate_before: bool
    ckpt_path: str | None
    resume_step: int | None
    precision: str
    skip_nonfinite: bool
    command: list[str] | None = None
    monitor: str | None = None
    monitor_mode: str | None = None

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def monitoring(self, default: tuple[str, str]) -> RunPlan:
        """The plan with its monitored metric: the config's, else the task's ``default`` (metric, mode)."""
        return dataclasses.replace(self, monitor=self.monitor or default[0],
                                   monitor_mode=self.monitor_mode or default[1])

    def config(self, cfg: DictConfig, **values: Any) -> DictConfig:
        """A copy of the composed config with this plan's values in it (and ``values``, dotted keys): what is
        instantiated (the callbacks read ``${monitor}``, the trainer ``${run_dir}``) and saved as ``config.yaml``."""
        return with_values(cfg, **{"run_dir": str(self.run_dir), "ckpt_path": self.ckpt_path, "monitor": self.monitor,
                                   "monitor_mode": self.monitor_mode, "trainer.precision": self.precision, **values})


def with_values(cfg: DictConfig, **values: Any) -> DictConfig:
    """A copy of ``cfg`` with ``values`` (dotted keys) set; ``cfg`` itself is left as composed."""
    copied = copy.deepcopy(cfg)
    with open_dict(copied):
        for key, value in values.items():
            OmegaConf.update(copied, key, value, force_add=True)
    return copied


def plan_run(cfg: DictConfig, command: list[str] | None = None, rank: int = 0) -> tuple[RunPlan, dict | None]:
    """The run's plan, and the contents of the checkpoint it resumes or evaluates (read once, memory-mapped), or a
    UserError naming the setting at fault. Nothing is written."""
    from lightning_ft.rundir import settle_run_dir
    from lightning_ft.throughput import resolve_precision

    ckpt_path, checkpoint = checkpoint_to_use(cfg, Path(cfg.run_dir))
    run_dir = Path(cfg.run_dir)
    if rank == 0:  # the other ranks work in rank 0's directory
        run_dir = settle_run_dir(run_dir, train=bool(cfg.train), resume=cfg.get("resume"), ckpt_path=ckpt_path)
    check_devices(cfg.trainer)
    plan = RunPlan(
        run_dir=run_dir, rank=rank, seed=int(cfg.seed), train=bool(cfg.train), test=bool(cfg.test),
        export=bool(cfg.export), validate_before=bool(cfg.get("validate_before")), ckpt_path=ckpt_path,
        resume_step=int(checkpoint.get("global_step", 0)) if checkpoint is not None and cfg.train else None,
        precision=str(resolve_precision(cfg.trainer.get("precision", "auto"), cfg.trainer.get("accelerator", "auto"))),
        skip_nonfinite=bool(cfg.get("skip_nonfinite", False)), command=command,
        monitor=cfg.get("monitor"), monitor_mode=cfg.get("monitor_mode"),
    )
    return plan, checkpoint


def checkpoint_to_use(cfg: DictConfig, run_dir: Path) -> tuple[str | None, dict[str, Any] | None]:
    """``ckpt_path`` if given (checked readable), else with ``resume=auto`` the newest good checkpoint of the run
    directory, else None; with its contents (memory-mapped), read once for every check that needs them."""
    from lightning_ft.lifecycle import RESUME_CHOICES, find_resume_checkpoint, read_checkpoint

    resume = cfg.get("resume")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if resume is None and restarts and not cfg.ckpt_path:
        log.info("SLURM requeued this job (restart %d): resume=auto.", restarts)
        resume = "auto"
    if resume not in RESUME_CHOICES:
        raise UserError(f"resume={resume} is not a choice: use resume=auto (continue from the newest checkpoint of "
                        "run_dir) or leave it unset, and ckpt_path=<file> for a given checkpoint.")
    if cfg.ckpt_path:
        return str(cfg.ckpt_path), read_checkpoint(cfg.ckpt_path)
    if resume == "auto" and cfg.train:
        found = find_resume_checkpoint(run_dir)
        if found is None:
            log.info("resume=auto: no checkpoint in %s yet, starting from the beginning.", run_dir / "checkpoints")
            return None, None
        log.info("resume=auto: continuing from %s", found[0])
        return str(found[0]), found[1]
    return None, None


def check_devices(trainer: DictConfig) -> None:
    """Refuse, before any data or model work, a trainer this machine cannot run: a strategy whose package is
    missing, GPUs where there are none, more GPUs than there are."""
    import importlib.util

    import torch

    strategy = trainer.get("strategy")
    name = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy or "")
    if "deepspeed" in name.lower() and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"trainer.strategy={name} needs the deepspeed package, which is not installed: "
                        "pip install 'lightning_ft[deepspeed]' (on a machine with CUDA), or use trainer=fsdp.")
    if str(trainer.get("accelerator", "auto")) not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count()
    if available == 0:
        raise UserError("the trainer runs on GPUs (trainer.accelerator=gpu) but this machine has none: use "
                        "trainer=cpu, or trainer=ddp_sim for 2 CPU processes.")
    devices = trainer.get("devices", "auto")
    wanted = len(devices) if isinstance(devices, (list, ListConfig)) else devices
    if isinstance(wanted, int) and wanted > available:
        raise UserError(f"trainer.devices={devices} asks for {wanted} GPUs but this machine has {available}: set "
                        f"trainer.devices={available} (or auto), or add nodes with trainer.num_nodes.")


def check_sweep_direction(monitor: str, mode: str) -> None:
    """An Optuna sweep must optimize the way the monitored metric improves (train returns that metric)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    sweeper = HydraConfig.get().get("sweeper") or {}
    direction = sweeper.get("direction")
    if "optuna" not in str(sweeper.get("_target_", "")).lower() or not isinstance(direction, str):
        return
    wanted = "maximize" if mode == "max" else "minimize"
    if direction != wanted:
        raise UserError(f"the Optuna sweep would {direction} {monitor}, which is better when it is {mode}imal: set "
                        f"hydra.sweeper.direction={wanted} (or monitor= another metric).")
