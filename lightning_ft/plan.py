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
        compile: train the model through ``torch.compile`` (``lightning_ft.compiling``).
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
    compile: bool = False
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
    check_values(cfg)  # first: it needs no library, so a config error answers at once
    from lightning_ft import peft
    from lightning_ft.backbones import check_frozen_dtype
    from lightning_ft.rundir import settle_run_dir
    from lightning_ft.throughput import resolve_precision

    peft.check(OmegaConf.to_container(cfg.peft, resolve=True) if cfg.get("peft") else None,
               OmegaConf.to_container(cfg.backbone, resolve=True))  # before any data or model work
    ckpt_path, checkpoint = checkpoint_to_use(cfg, Path(cfg.run_dir))
    run_dir = Path(cfg.run_dir)
    if rank == 0:  # the other ranks work in rank 0's directory
        run_dir = settle_run_dir(run_dir, train=bool(cfg.train), resume=cfg.get("resume"), ckpt_path=ckpt_path)
    check_devices(cfg.trainer)
    if not isinstance(cfg.get("compile", False), bool):
        raise UserError(f"compile={cfg.get('compile')!r} is not true or false: compile=true trains the model through "
                        "torch.compile.")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    precision = str(resolve_precision(cfg.trainer.get("precision", "auto"), accelerator))
    if rank == 0:  # once, not once a rank
        warn_emulated_bf16(precision, accelerator)
    check_frozen_dtype(cfg.backbone.get("frozen_dtype"), precision, training=bool(cfg.train))
    plan = RunPlan(
        run_dir=run_dir, rank=rank, seed=int(cfg.seed), train=bool(cfg.train), test=bool(cfg.test),
        export=bool(cfg.export), validate_before=bool(cfg.get("validate_before")), ckpt_path=ckpt_path,
        resume_step=int(checkpoint.get("global_step", 0)) if checkpoint is not None and cfg.train else None,
        precision=precision,
        skip_nonfinite=bool(cfg.get("skip_nonfinite", False)), compile=bool(cfg.get("compile", False)),
        command=command,
        monitor=cfg.get("monitor"), monitor_mode=cfg.get("monitor_mode"),
    )
    return plan, checkpoint


def warn_emulated_bf16(precision: str, accelerator: str) -> None:
    """A bf16 precision asked for where the device has no bf16 matrix units trains, but several times slower than
    fp32 (5.3x for a MiniLM-sized matrix product on an AVX2 CPU here): say so before any work."""
    from lightning_ft.throughput import bf16_is_native

    if precision.startswith("bf16") and not bf16_is_native(accelerator):
        log.warning("trainer.precision=%s: this device has no native bf16 (a CPU needs AVX512-BF16 or AMX, a GPU "
                    "Ampere or later), so bf16 is emulated, several times slower than fp32; trainer.precision=auto "
                    "picks the fastest precision this device has (32-true here).", precision)


# Values the config must hold, checked before any data is read: (dotted key, type, smallest value, what it means).
# A missing key (another optimizer, a dataset without it) is not checked.
VALUE_RULES: tuple[tuple[str, type, float | None, str], ...] = (
    ("seed", int, 0, "the random seed"),
    ("trainer.max_epochs", int, -1, "epochs to train (-1: until trainer.max_steps)"),
    ("trainer.max_steps", int, -1, "optimizer steps to train (-1: no limit)"),
    ("trainer.accumulate_grad_batches", int, 1, "batches per optimizer step"),
    ("trainer.gradient_clip_val", float, 0, "the gradient-norm limit (0 or null: none)"),
    ("optim.lr", float, None, "the learning rate"),
    ("optim.weight_decay", float, 0, "the weight decay"),
    ("dataset.batch_size", int, 1, "training rows per batch"),
    ("dataset.eval_batch_size", int, 1, "evaluation rows per batch"),
    ("dataset.max_length", int, 1, "tokens kept of each example"),
    ("dataset.max_tokens", int, 1, "tokens per training batch"),
    ("dataset.max_train_examples", int, 1, "training rows used"),
    ("dataset.max_eval_examples", int, 1, "evaluation rows used"),
)


def check_values(cfg: DictConfig) -> None:
    """Refuse, in one sentence naming the key, a value of the wrong type or range, or a key nothing reads."""
    for key, kind, smallest, meaning in VALUE_RULES:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception as err:  # MissingMandatoryValue, an interpolation that does not resolve
            raise UserError(f"{key} has no value ({type(err).__name__}): give it one, e.g. {key}=<{meaning}>.") \
                from err
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind is int and not isinstance(value, int)):
            wanted, example = ("a whole number", 1) if kind is int else ("a number", 0.0001)
            raise UserError(f"{key}={value!r} is not {wanted} ({meaning}): give e.g. {key}={example}.")
        if smallest is not None and value < smallest:
            raise UserError(f"{key}={value} is below {smallest:g} ({meaning}): give {smallest:g} or more.")
        if key == "optim.lr" and value <= 0:
            raise UserError(f"optim.lr={value} trains nothing: give a positive learning rate, e.g. optim.lr=5e-5.")
    check_data_dir(OmegaConf.select(cfg, "dataset.data_dir"))
    from lightning_ft.backbones import check_available

    check_available(OmegaConf.select(cfg, "backbone.name"))
    if cfg.get("monitor_mode") not in (None, "min", "max"):
        raise UserError(f"monitor_mode={cfg.monitor_mode} is not min or max: give monitor_mode=max (accuracy, F1) "
                        "or min (loss), or leave it out for the task's own.")
    if cfg.get("train") and OmegaConf.select(cfg, "trainer.max_epochs") == 0 and \
            (OmegaConf.select(cfg, "trainer.max_steps") or -1) < 0:
        raise UserError("trainer.max_epochs=0 trains nothing and would export the untrained model: give 1 or more, "
                        "or train=false with ckpt_path= to evaluate a checkpoint.")
    from lightning_ft.paths import config_dir

    groups = {p.name for p in config_dir().iterdir() if p.is_dir()} | {"hydra"}
    known = (set(OmegaConf.load(config_dir() / "train.yaml")) - {"defaults"}) | groups
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"'{unknown[0]}' is not a key lightning_ft reads{hint}: drop +{unknown[0]}=..., or set one "
                        "of the config's keys (python -m lightning_ft.train --cfg job lists them).")


def check_data_dir(data_dir: str | None) -> None:
    """Refuse a ``dataset.data_dir`` that is not a folder (here before torch is even imported: the answer comes in
    half a second, not after the ten it takes to load the libraries)."""
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise UserError(f"dataset.data_dir '{data_dir}' does not exist (resolved to "
                        f"{Path(data_dir).expanduser().resolve()}): fix the path.")


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
