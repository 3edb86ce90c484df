"""The entry point: ``python -m lightning_ft.train [task=...] [dataset=...] [backbone=...] [key=value ...]``.

compose config -> seed -> DataModule (data checked and tokenized first) -> task module -> Trainer -> fit -> test
-> export. Heavy libraries are imported inside ``train`` so ``--help`` and config errors answer fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from lightning_ft import IMPORTED_AT
from lightning_ft.config import register_resolvers
from lightning_ft.errors import UserError
from lightning_ft.paths import config_dir

log = logging.getLogger("lightning_ft")


def _build(node: DictConfig | None) -> list[Any]:
    """Instantiate a named group of objects (callbacks, loggers), skipping entries set to null."""
    from hydra.utils import instantiate

    return [instantiate(c) for c in (node or {}).values() if c is not None]


def build_task(cfg: DictConfig, datamodule: Any) -> Any:
    """The task's LightningModule, from ``cfg.task`` plus what the data says about labels."""
    from hydra.utils import get_class, instantiate

    kwargs = OmegaConf.to_container(cfg.task, resolve=True)
    task_class = get_class(kwargs.pop("_target_"))
    return task_class(
        **kwargs,
        **datamodule.model_kwargs(),
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        optimizer=instantiate(cfg.optim) if cfg.get("optim") else None,
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )


def _tokenizer_and_data(cfg: DictConfig, run_dir: Path, saved_checkpoint: dict[str, Any] | None) -> tuple[Any, Any]:
    """The tokenizer and the DataModule. A backbone built from a config with ``train_tokenizer`` gets a tokenizer
    trained on the training text, saved in ``<run_dir>/tokenizer`` (the checkpoint's backbone points at it, and the
    export copies it); a resumed or tested checkpoint, or a run directory that has one already (another DDP rank),
    reuses it, since Unigram training is not deterministic."""
    from hydra.utils import instantiate

    from lightning_ft.backbones import load_tokenizer

    spec = cfg.backbone.get("train_tokenizer")
    if not spec:
        tokenizer = load_tokenizer(**cfg.backbone)
        return tokenizer, instantiate(cfg.dataset, tokenizer=tokenizer, seed=cfg.seed, _convert_="all")
    datamodule = instantiate(cfg.dataset, tokenizer=None, seed=cfg.seed, _convert_="all")
    saved = run_dir / "tokenizer"
    source = (_checkpoint_tokenizer(saved_checkpoint)
              or (saved if (saved / "tokenizer_config.json").is_file() else None))
    if source:
        tokenizer = load_tokenizer(tokenizer=str(source))
        log.info("Using the tokenizer trained for this model: %s", source)
    else:
        from lightning_ft.tokenizer_training import train_tokenizer

        tokenizer = train_tokenizer(datamodule.training_texts(), **spec)
        log.info("Trained a %s tokenizer of %d tokens on the training text: %s", spec.get("algorithm", "unigram"),
                 len(tokenizer), saved)
    if source != saved:
        tokenizer.save_pretrained(saved)
    with open_dict(cfg):
        cfg.backbone.tokenizer = str(saved)
    datamodule.tokenizer = tokenizer
    return tokenizer, datamodule


def _checkpoint_tokenizer(saved: dict[str, Any] | None) -> Path | None:
    """The trained tokenizer a checkpoint's model was built with, when it still exists."""
    if not saved:
        return None
    folder = (saved.get("hyper_parameters", {}).get("backbone") or {}).get("tokenizer")
    if folder and not Path(folder).is_dir():
        raise UserError(f"the checkpoint's model was built for the tokenizer in '{folder}', which no longer exists: "
                        "restore that folder (its run directory's tokenizer/) to use this checkpoint.")
    return Path(folder) if folder else None


def _checkpoint_to_use(cfg: DictConfig, run_dir: Path) -> tuple[str | None, dict[str, Any] | None]:
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


# Keys of the trainer config that lightning_ft reads itself; the rest go to pytorch_lightning.Trainer.
OWN_TRAINER_KEYS = ("skip_nonfinite",)
LOGGER_RUN_KEYS = {"WandbLogger": "id", "MLFlowLogger": "run_id"}  # the argument that reopens a logger's run


def _build_loggers(cfg: DictConfig, run_dir: Path, resume_step: int | None) -> list[tuple[str, Any]]:
    """The configured loggers; on a resume, wandb and MLflow reopen the run they logged to before, and the CSV log
    keeps the rows logged before the checkpoint's step."""
    from hydra.utils import instantiate

    saved_path = run_dir / "logger_runs.json"
    resuming = resume_step is not None
    saved = json.loads(saved_path.read_text()) if resuming and saved_path.is_file() else {}
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
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


def _check_sweep_direction(monitor: str, mode: str) -> None:
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


def _cluster_environment() -> list[Any]:
    """Inside a SLURM job: Lightning's SLURM environment (ranks from SLURM) without its auto-requeue, which saves
    from inside the signal handler in the middle of a step; PreemptionCheckpoint saves at the step's end and
    requeues instead."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


DATA_READY = ".data_ready"  # rank 0 writes it in the run directory once the tokenizer and the tokenized cache exist


def _launch_id() -> str:
    """What every rank of one launch shares, and the next launch (a requeue) does not."""
    keys = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID")
    return ";".join(os.environ.get(key, "") for key in keys)


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


def launch_rank() -> int:
    """This process's global rank as its launcher set it (Lightning's rule: RANK, LOCAL_RANK, SLURM_PROCID), known
    before any Trainer exists: ranks > 0 write nothing to the run directory."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def train(cfg: DictConfig, command: list[str] | None = None) -> float | None:
    """Run one training job; returns the best value of the monitored metric (what a sweep optimizes).
    ``command``: the command line to record (default ``sys.argv``)."""
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate

    from lightning_ft.lifecycle import AtomicCheckpointIO, PreemptionCheckpoint, check_checkpoint_fits
    from lightning_ft.report import RunRecord, save_environment, write_report
    from lightning_ft.throughput import ThroughputMonitor, resolve_precision

    run_dir = Path(cfg.run_dir)
    # before anything is written: a bad ckpt_path leaves no run dir
    ckpt_path, saved_checkpoint = _checkpoint_to_use(cfg, run_dir)
    check_devices(cfg.trainer)
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = launch_rank() == 0
    with open_dict(cfg):
        cfg.ckpt_path = ckpt_path
        skip_nonfinite = bool(cfg.trainer.get("skip_nonfinite", False))
        for key in OWN_TRAINER_KEYS:
            cfg.trainer.pop(key, None)
    pl.seed_everything(cfg.seed, workers=True)

    if not writer:  # ranks started beside rank 0 (srun, torchrun) use its tokenizer and tokenized cache
        wait_for_rank_zero_data(run_dir)
    tokenizer, datamodule = _tokenizer_and_data(cfg, run_dir, saved_checkpoint)
    datamodule.prepare_data()  # checks columns and labels and tokenizes (or reads the cache) before any model
    if writer:
        (run_dir / DATA_READY).write_text(_launch_id())
    else:
        log.info("rank %d: tokenized %d rows (0: every split read from rank 0's cache)", launch_rank(),
                 datamodule.examples_tokenized)
    module = build_task(cfg, datamodule)
    embeddings = module.model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {embeddings}: give "
            "backbone.tokenizer the model's own tokenizer, or build the model fresh (backbone.pretrained=false)."
        )

    resume_step = None
    if saved_checkpoint is not None:
        check_checkpoint_fits(saved_checkpoint, ckpt_path, module)
        resume_step = int(saved_checkpoint.get("global_step", 0)) if cfg.train else None
        saved_checkpoint = None  # Lightning reads the file itself in fit: let go of the mapping
    module.skip_nonfinite = skip_nonfinite

    metric, mode = module.monitor
    with open_dict(cfg):
        cfg.monitor = cfg.monitor or metric
        cfg.monitor_mode = cfg.monitor_mode or mode
        cfg.trainer.precision = resolve_precision(cfg.trainer.get("precision", "auto"),
                                                  cfg.trainer.get("accelerator", "auto"))
    _check_sweep_direction(cfg.monitor, cfg.monitor_mode)
    if writer:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    results: dict[str, Any] = {"monitor": cfg.monitor, "precision": str(cfg.trainer.precision),
                               "data": datamodule.preparation, "resumed_from": ckpt_path if cfg.train else None,
                               "environment": save_environment(run_dir, command, write=writer)}

    record = RunRecord()
    callbacks = [*_build(cfg.get("callbacks")), record, PreemptionCheckpoint(str(run_dir / "checkpoints"))]
    loggers = _build_loggers(cfg, run_dir, resume_step)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=[lg for _, lg in loggers] or False,
                          plugins=[AtomicCheckpointIO(), *_cluster_environment()])
    if skip_nonfinite and trainer.world_size > 1:
        raise UserError("trainer.skip_nonfinite=true works on one device only (a step skipped on one rank would hang "
                        "the others' gradient all-reduce): leave it false with several devices.")
    # The callback keeping the best checkpoint by the monitored metric (not the one keeping last.ckpt).
    checkpoint = next((cb for cb in trainer.checkpoint_callbacks if cb.monitor == cfg.monitor), None)

    if cfg.train and cfg.get("validate_before") and not ckpt_path:
        before = trainer.validate(module, datamodule=datamodule)[0]
        results["before_training"] = {k: float(v) for k, v in before.items()}
    if cfg.train:
        if trainer.is_global_zero:
            _save_logger_runs(loggers, run_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if module.skipped_steps:
            results["skipped_nonfinite_steps"] = module.skipped_steps
        throughput = next((cb for cb in trainer.callbacks if isinstance(cb, ThroughputMonitor)), None)
        if throughput is not None and throughput.summary:
            results["throughput"] = throughput.summary
    best_path = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
    weights = best_path if cfg.train else ckpt_path
    if weights:  # test and export the best weights, not the last ones
        module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=False)["state_dict"])

    results["best_model_path"] = best_path
    if cfg.train:
        best_score = checkpoint.best_model_score if checkpoint else None
        results["best_score"] = float(best_score) if best_score is not None else None
        best = [v for v in record.validation if best_score is not None and cfg.monitor in v
                and math.isclose(v[cfg.monitor], results["best_score"], rel_tol=1e-6)]
        # the first validation that reached it: a later equal score does not replace ModelCheckpoint's best
        results["best_epoch"] = best[0]["epoch"] if best else None
        results["best_step"] = best[0]["step"] if best else None
    # Every reported number describes the same weights: the ones that are tested and exported.
    validated = trainer.validate(module, datamodule=datamodule)  # [] when trainer.limit_val_batches=0
    results["validation"] = {k: float(v) for k, v in (validated or [{}])[0].items()}
    if cfg.test and datamodule.has_split("test"):
        results["test"] = {k: float(v) for k, v in trainer.test(module, datamodule=datamodule)[0].items()}

    if trainer.is_global_zero:
        # Tasks whose answers are text (QA) keep the last evaluation's answers per example id: save them.
        for stage, answers in getattr(module, "predictions", {}).items():
            path = run_dir / f"predictions_{stage}.json"
            path.write_text(json.dumps(answers, indent=1, ensure_ascii=False))
            results.setdefault("predictions", {})[stage] = str(path)
        if getattr(module, "examples", None):
            results["examples"] = module.examples
        if cfg.export and not trainer.fast_dev_run:
            results["export_dir"] = str(module.export(run_dir / "hf_model", datamodule.tokenizer))
        results["wall_seconds"] = time.perf_counter() - IMPORTED_AT
        results["report"] = str(write_report(run_dir, OmegaConf.to_container(cfg, resolve=True), results,
                                             record if cfg.train else None))
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        _print_summary(results, run_dir)
    return results.get("best_score")


def _save_logger_runs(loggers: list[tuple[str, Any]], run_dir: Path) -> None:
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


def _print_summary(results: dict[str, Any], run_dir: Path) -> None:
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
            + (f", MFU {speed['mfu']:.1%}" if "mfu" in speed else "")
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


def _multirun_job_dir(cfg: DictConfig) -> bool:
    """In a multirun, each job writes into its own sweep subdirectory (unless its overrides give run_dir).
    Returns whether this is a multirun job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    given = any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN and not given:
        with open_dict(cfg):
            cfg.run_dir = hydra_cfg.runtime.output_dir
    return hydra_cfg.mode == RunMode.MULTIRUN


# What Lightning's launcher puts in the environment of rank 0 when it starts ranks 1..N-1 itself.
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _end_distributed_job(launcher_env: dict[str, str | None]) -> None:
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


def _this_job_command(cfg: DictConfig) -> list[str]:
    """The command line that runs this job alone, in this job's run directory. With several devices on one machine,
    Lightning starts ranks 1..N-1 by re-running ``sys.argv`` plus Hydra's ``hydra.run.dir``. In a multirun sys.argv
    still holds the whole sweep (``-m optim.lr=1e-5,3e-5``), so every rank would start the sweep again; and
    ``run_dir`` comes from the clock, so a rank started a second later would write to another directory."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    if not HydraConfig.initialized():
        return list(sys.argv)
    hydra_cfg = HydraConfig.get()
    run_dir = str(Path(cfg.run_dir).resolve())
    with open_dict(cfg):
        cfg.run_dir = run_dir
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = run_dir  # Lightning passes it on as hydra.run.dir (where a rank's log file goes)
    overrides = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") != "run_dir"]
    return [sys.argv[0], *overrides, f'run_dir="{run_dir}"']


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from lightning_ft.lifecycle import Preempted

    multirun = _multirun_job_dir(cfg)
    command = list(sys.argv)
    sys.argv = _this_job_command(cfg)
    if multirun:  # what reruns this job alone (sys.argv holds the whole sweep, or submitit's worker)
        command = ["lightning_ft/train.py", *sys.argv[1:]]
    launcher_env = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    try:
        return train(cfg, command)
    except UserError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Preempted as stop:
        log.warning("%s", stop)
        sys.exit(128 + stop.signum)
    except SIGTERMException:  # the checkpoint was written at the end of the step (or, during validation, before)
        log.warning("stopped on SIGTERM; resume=auto continues from the newest checkpoint in %s.",
                    Path(cfg.run_dir) / "checkpoints")
        sys.exit(128 + 15)
    finally:
        sys.argv = command
        _end_distributed_job(launcher_env)


# Options that need an optional package, and the extra that installs it. Hydra itself would only say that it
# "could not find hydra/launcher/submitit_slurm".
OPTIONAL_PLUGINS = {
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna", "hydra-optuna-sweeper"),
}


def cli() -> None:
    """The command line: an option whose optional package is missing stops here, in one sentence; then main."""
    import importlib.util

    for arg in sys.argv[1:]:
        module, extra, package = OPTIONAL_PLUGINS.get(arg, (None, None, None))
        if module and importlib.util.find_spec(module) is None:
            print(f"error: {arg} needs {package}, which is not installed: pip install 'lightning_ft[{extra}]'.",
                  file=sys.stderr)
            sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
