"""The entry point: ``python -m lightning_ft.train [task=...] [dataset=...] [backbone=...] [key=value ...]``.

compose config -> plan (checkpoint, devices, precision: checked before anything is written) -> seed -> tokenizer and
DataModule (data checked and tokenized first) -> task module -> Trainer -> fit -> validate and test the best weights
-> export and report. Heavy libraries are imported inside ``train`` so ``--help`` and config errors answer fast.
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
from omegaconf import DictConfig, OmegaConf

from lightning_ft import IMPORTED_AT
from lightning_ft.config import register_resolvers
from lightning_ft.errors import UserError
from lightning_ft.paths import config_dir

log = logging.getLogger("lightning_ft")


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Hydra's instantiate, except that a UserError raised while building the object comes out as itself: Hydra
    wraps it in an InstantiationException whose message names the class, not the setting and the fix."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def _build(node: Any) -> list[Any]:
    """Instantiate a named group of objects (callbacks, loggers), skipping entries set to null."""
    return [instantiate(c) for c in (node or {}).values() if c is not None]


def build_task(cfg: DictConfig, datamodule: Any, backbone: dict[str, Any] | None = None) -> Any:
    """The task's LightningModule, from ``cfg.task`` plus what the data says about labels. ``backbone``: the
    backbone settings, when they differ from ``cfg.backbone`` (a tokenizer trained for this run)."""
    from hydra.utils import get_class

    from lightning_ft import peft as adapters

    kwargs = OmegaConf.to_container(cfg.task, resolve=True)
    task_class = get_class(kwargs.pop("_target_"))
    unknown = sorted(set(kwargs) - _keyword_args(task_class))
    if unknown:  # e.g. a GLUE dataset config's task.metrics under task=ner
        raise UserError(f"task.{unknown[0]} is not a setting of {task_class.__name__}, yet the config sets it (a "
                        "dataset config made for another task sets task keys: the GLUE ones, for text "
                        "classification): pick a dataset config made for this task, or drop the key with "
                        f"~task.{unknown[0]}.")
    backbone = dict(backbone or OmegaConf.to_container(cfg.backbone, resolve=True))
    peft = OmegaConf.to_container(cfg.peft, resolve=True) if cfg.get("peft") else None
    adapters.check(peft, backbone)  # before the model (plan.check_values would be earlier still: before the data)
    if adapters.settings(peft) or backbone.get("freeze") is not None:
        # Only the trained part is checkpointed: the rest must come back the same, new heads and fresh models too.
        backbone["init_seed"] = int(cfg.seed)
    optim = OmegaConf.to_container(cfg.optim, resolve=True) if cfg.get("optim") else None
    layer_decay = optim.pop("layer_decay", None) if optim else None  # the module's, not an AdamW argument
    return task_class(
        **kwargs,
        **datamodule.model_kwargs(),
        backbone=backbone,
        optimizer=instantiate(optim) if optim else None,
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        peft=peft,
        layer_decay=layer_decay,
    )


def _keyword_args(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s and, through ``**kwargs``, its bases'."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def prepare_data(cfg: DictConfig, run_dir: Path, saved_checkpoint: dict[str, Any] | None
                 ) -> tuple[Any, Any, dict[str, Any]]:
    """The tokenizer, the DataModule connected to it, and the backbone settings. A backbone built from a config
    with ``train_tokenizer`` gets a tokenizer trained on the training text, saved in ``<run_dir>/tokenizer`` (the
    backbone settings point at it, and the export copies it); a resumed or tested checkpoint, or a run directory
    that has one already (another DDP rank), reuses it, since Unigram training is not deterministic."""
    from lightning_ft.backbones import load_tokenizer

    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    datamodule = instantiate(cfg.dataset, seed=cfg.seed, _convert_="all")
    spec = backbone.get("train_tokenizer")
    if not spec:
        tokenizer = load_tokenizer(**backbone)
        datamodule.connect(tokenizer)
        return tokenizer, datamodule, backbone
    saved = run_dir / "tokenizer"
    source = (_checkpoint_tokenizer(saved_checkpoint)
              or (saved if (saved / "tokenizer_config.json").is_file() else None))
    if source:
        tokenizer = load_tokenizer(tokenizer=str(source))
        log.info("Using the tokenizer trained for this model: %s", source)
    else:
        from lightning_ft.tokenizer_training import train_tokenizer

        tokenizer = train_tokenizer(datamodule.training_texts(), **spec,
                                    extra_special_tokens=datamodule.special_tokens())
        log.info("Trained a %s tokenizer of %d tokens on the training text: %s", spec.get("algorithm", "unigram"),
                 len(tokenizer), saved)
    datamodule.connect(tokenizer)  # before saving: predict reads it as connecting leaves it (a chat template...)
    if source != saved:
        tokenizer.save_pretrained(saved)
    return tokenizer, datamodule, {**backbone, "tokenizer": str(saved)}


def _checkpoint_tokenizer(saved: dict[str, Any] | None) -> Path | None:
    """The trained tokenizer a checkpoint's model was built with, when it still exists."""
    if not saved:
        return None
    folder = (saved.get("hyper_parameters", {}).get("backbone") or {}).get("tokenizer")
    if folder and not Path(folder).is_dir():
        raise UserError(f"the checkpoint's model was built for the tokenizer in '{folder}', which no longer exists: "
                        "restore that folder (its run directory's tokenizer/) to use this checkpoint.")
    return Path(folder) if folder else None


def train(cfg: DictConfig, command: list[str] | None = None) -> float | None:
    """Run one training job; returns the best value of the monitored metric (what a sweep optimizes).
    ``command``: the command line to record (default ``sys.argv``)."""
    from lightning_ft.launch import launch_rank
    from lightning_ft.plan import plan_run
    from lightning_ft.rundir import RunDirLock

    # 1. The plan, before anything is written: a bad ckpt_path or trainer leaves no run directory.
    plan, saved_checkpoint = plan_run(cfg, command, rank=launch_rank())
    lock = RunDirLock(plan.run_dir).acquire() if plan.writer else None  # a second run into it is refused
    try:
        return _run(cfg, plan, saved_checkpoint)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: DictConfig, plan: Any, saved_checkpoint: dict[str, Any] | None) -> float | None:
    """The run itself, once its plan is settled and its directory is this run's."""
    import pytorch_lightning as pl
    import torch

    from lightning_ft import tasks
    from lightning_ft.compiling import compile_model
    from lightning_ft.launch import cluster_environment, mark_data_ready, wait_for_rank_zero_data
    from lightning_ft.lifecycle import (
        AtomicCheckpointIO,
        MonitorCheck,
        PreemptionCheckpoint,
        build_loggers,
        check_checkpoint_fits,
        save_logger_runs,
    )
    from lightning_ft.plan import check_sweep_direction
    from lightning_ft.report import RunRecord, print_summary, save_environment, write_model_card, write_report
    from lightning_ft.throughput import ThroughputMonitor

    command = plan.command
    pl.seed_everything(plan.seed, workers=True)

    # 2. Data: rank 0 checks and tokenizes (or reads the cache) before any model; the other ranks read its cache.
    if not plan.writer:
        wait_for_rank_zero_data(plan.run_dir)
    tokenizer, datamodule, backbone = prepare_data(cfg, plan.run_dir, saved_checkpoint)
    datamodule.prepare_data()
    if plan.writer:
        mark_data_ready(plan.run_dir)
    else:
        log.info("rank %d: tokenized %d rows (0: every split read from rank 0's cache)", plan.rank,
                 datamodule.examples_tokenized)

    # 3. The task module, checked against the tokenizer and the checkpoint.
    module = build_task(cfg, datamodule, backbone)
    embeddings = module.model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {embeddings}: give "
            "backbone.tokenizer the model's own tokenizer, or build the model fresh (backbone.pretrained=false)."
        )
    if saved_checkpoint is not None:
        check_checkpoint_fits(saved_checkpoint, plan.ckpt_path, module)
        saved_checkpoint = None  # Lightning reads the file itself in fit: let go of the mapping
    module.skip_nonfinite = plan.skip_nonfinite
    module.data_columns = datamodule.predict_columns()
    plan = plan.monitoring(module.monitor)
    check_sweep_direction(plan.monitor, plan.monitor_mode)
    resolved = plan.config(cfg, **{"backbone.tokenizer": backbone.get("tokenizer")})
    if plan.writer:
        (plan.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved, resolve=True))
    results: dict[str, Any] = {"task": tasks.of_module(module).name, "monitor": plan.monitor,
                               "precision": plan.precision, "data": datamodule.preparation,
                               "resumed_from": plan.ckpt_path if plan.train else None,
                               "environment": save_environment(plan.run_dir, command, write=plan.writer)}
    trainable, total = module.trainable_parameters  # what trains of the model (peft, backbone.freeze), and its share
    results["parameters"] = {"trainable": trainable, "total": total, "trainable_share": trainable / total}

    # 4. The Trainer.
    record = RunRecord()
    callbacks = [*_build(resolved.get("callbacks")), record, PreemptionCheckpoint(str(plan.run_dir / "checkpoints")),
                 MonitorCheck(plan.monitor)]
    loggers = build_loggers(resolved.get("logger"), plan.run_dir, plan.resume_step)
    trainer = instantiate(resolved.trainer, callbacks=callbacks, logger=[lg for _, lg in loggers] or False,
                          plugins=[AtomicCheckpointIO(), *cluster_environment()])
    if plan.skip_nonfinite and trainer.world_size > 1:
        raise UserError("skip_nonfinite=true works on one device only (a step skipped on one rank would hang the "
                        "others' gradient all-reduce): leave it false with several devices.")
    compiled = compile_model(module.model, trainer.strategy.root_device.type) if plan.compile and plan.train else None
    # The callback keeping the best checkpoint by the monitored metric (not the one keeping last.ckpt).
    checkpoint = next((cb for cb in trainer.checkpoint_callbacks if cb.monitor == plan.monitor), None)

    # 5. Fit, then validate and test the best weights.
    if plan.train and plan.validate_before and not plan.ckpt_path:
        before = trainer.validate(module, datamodule=datamodule)[0]
        results["before_training"] = {k: float(v) for k, v in before.items()}
    if plan.train:
        if trainer.is_global_zero:
            save_logger_runs(loggers, plan.run_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=plan.ckpt_path, weights_only=True)
        if module.skipped_steps:
            results["skipped_nonfinite_steps"] = module.skipped_steps
        throughput = next((cb for cb in trainer.callbacks if isinstance(cb, ThroughputMonitor)), None)
        if throughput is not None and throughput.summary:
            results["throughput"] = throughput.summary
        if compiled is not None:  # what training compiled (evaluation, run compiled too, may add its own graphs)
            counts = {"compile_graphs": compiled.graphs, "compile_seconds": round(compiled.seconds, 2)}
            results["throughput" if "throughput" in results else "compile"] = {**results.get("throughput", {}),
                                                                              **counts}
    best_path = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
    weights = best_path if plan.train else plan.ckpt_path
    if weights:  # test and export the best weights, not the last ones
        module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["state_dict"])
    results["best_model_path"] = best_path
    if plan.train:
        results.update(_best_of(checkpoint, record, plan.monitor))
    # Every reported number describes the same weights: the ones that are tested and exported.
    validated = trainer.validate(module, datamodule=datamodule)  # [] when trainer.limit_val_batches=0
    results["validation"] = {k: float(v) for k, v in (validated or [{}])[0].items()}
    if plan.test and datamodule.has_split("test"):
        results["test"] = {k: float(v) for k, v in trainer.test(module, datamodule=datamodule)[0].items()}

    # 6. What the run leaves: predictions, the export, the report (rank 0).
    if trainer.is_global_zero:
        for stage, answers in module.predictions.items():
            path = plan.run_dir / f"predictions_{stage}.json"
            path.write_text(json.dumps(answers, indent=1, ensure_ascii=False))
            results.setdefault("predictions", {})[stage] = str(path)
        if module.examples:
            results["examples"] = module.examples
        if plan.export and not trainer.fast_dev_run:
            results["export_dir"] = str(module.export(plan.run_dir / "hf_model", datamodule.tokenizer))
            write_model_card(Path(results["export_dir"]), OmegaConf.to_container(resolved, resolve=True), results,
                             tasks.of_module(module).pipeline)
        results["wall_seconds"] = time.perf_counter() - IMPORTED_AT
        results["report"] = str(write_report(plan.run_dir, OmegaConf.to_container(resolved, resolve=True), results,
                                             record if plan.train else None))
        (plan.run_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        print_summary(results, plan.run_dir)
    return results.get("best_score")


def _best_of(checkpoint: Any, record: Any, monitor: str) -> dict[str, Any]:
    """The best monitored score and the epoch and step of the first validation that reached it (a later equal
    score does not replace ModelCheckpoint's best)."""
    best_score = checkpoint.best_model_score if checkpoint else None
    score = float(best_score) if best_score is not None else None
    best = [v for v in record.validation if score is not None and monitor in v
            and math.isclose(v[monitor], score, rel_tol=1e-6)]
    return {"best_score": score, "best_epoch": best[0]["epoch"] if best else None,
            "best_step": best[0]["step"] if best else None}


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lightning_ft.launch import end_distributed_job, job_run_dir, launcher_environment, pin_job_command
    from lightning_ft.plan import with_values

    run_dir, multirun = job_run_dir(cfg)
    cfg = with_values(cfg, run_dir=run_dir)
    original = command = pin_job_command(run_dir)
    if multirun:  # what reruns this job alone (the original holds the whole sweep, or submitit's worker)
        command = ["lightning_ft/train.py", *sys.argv[1:]]
    launcher_env = launcher_environment()
    try:
        return train(cfg, command)
    except (Exception, SystemExit) as err:
        # Lightning and lifecycle are imported only once the config has passed its checks (an error before that
        # answers in half a second): where they are not loaded, err is neither of their stops.
        lifecycle = sys.modules.get("lightning_ft.lifecycle")
        exceptions = sys.modules.get("pytorch_lightning.utilities.exceptions")
        if lifecycle is not None and isinstance(err, lifecycle.Preempted):
            log.warning("%s", err)
            sys.exit(128 + err.signum)
        if exceptions is not None and isinstance(err, exceptions.SIGTERMException):
            # the checkpoint was written at the end of the step (or, during validation, before)
            log.warning("stopped on SIGTERM; resume=auto continues from the newest checkpoint in %s.",
                        Path(run_dir) / "checkpoints")
            sys.exit(128 + 15)
        if isinstance(err, SystemExit):
            raise
        if not multirun:
            if isinstance(err, UserError):
                log.error("%s", err)
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            raise
        # A sweep goes on past a failing job: it is recorded for the summary, and the sweep exits non-zero at its end.
        from lightning_ft.sweep import record_failure

        log.error("this job failed, the sweep goes on: %s", err, exc_info=not isinstance(err, UserError))
        print(f"error: {err}", file=sys.stderr)
        record_failure(run_dir, err)
        return float("nan")  # what an Optuna sweep takes as a failed trial
    finally:
        sys.argv = original
        end_distributed_job(launcher_env)


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
    from lightning_ft.config_keys import check_overrides

    problem = check_overrides(sys.argv[1:])  # a mistyped key, in one sentence with the key meant
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
