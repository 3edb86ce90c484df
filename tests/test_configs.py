"""Every shipped config composes (old names as their new ones), and every experiment runs with a tiny model."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import QUICK, SHARED, compose_config, needs_shared
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_ft.paths import config_dir, sample_dir
from lightning_ft.train import train

# Where each experiment's dataset lives on this machine (the experiments name hub datasets).
LOCAL_DATA = {"sst2": SHARED / "glue_sst2", "stsb": SHARED / "glue_stsb", "conll2003": SHARED / "conll2003",
              "wnut17": SHARED / "wnut17", "stsb_similarity": SHARED / "glue_stsb",
              "squad": sample_dir("squad"),  # only the SQuAD dev file is on this machine: the embedded sample
              "openbookqa": SHARED / "openbookqa" / "main", "multi30k": SHARED / "multi30k",
              "scitldr": SHARED / "scitldr", "tiny_shakespeare": SHARED / "tiny_shakespeare"}
# The tiny model of each task that has no BERT head (QUICK's tiny_bert is swapped for it).
TINY_BACKBONES = {"translation": "tiny_t5", "summarization": "tiny_t5", "clm": "tiny_gpt2", "mlm": "tiny_bert_scratch"}
# Composed but not instantiated here: they need something this machine does not have.
NEEDS_EXTRA = {("trainer", "gpu"): "a GPU", ("trainer", "ddp"): "GPUs", ("trainer", "fsdp"): "GPUs",
               ("trainer", "deepspeed"): "GPUs and the deepspeed package"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


GROUPS = ["task", "dataset", "backbone", "trainer", "optim", "scheduler", "callbacks", "logger", "peft", "recipe",
          "debug", "experiment", "hparams_search"]
GLOBAL_GROUPS = {"recipe", "debug", "experiment", "hparams_search"}  # @package _global_: merged into the top level
ALIAS = "# old name, kept for one release"
CALLBACKS = ["model_checkpoint", "last_checkpoint", "step_checkpoint", "learning_rate_monitor", "throughput",
             "progress_bar"]


def aliases() -> list[tuple[str, str, str]]:
    """(group, old name, new name) of every alias file: the comment line and a defaults list naming the new file."""
    found = []
    for path in sorted(config_dir().glob("*/*.yaml")):
        text = path.read_text()
        if ALIAS in text:
            (new,) = yaml.safe_load(text)["defaults"]
            found.append((path.parent.name, path.stem, new))
    return found


def own_defaults(group: str, option: str) -> list[str]:
    """The same-group configs a file inherits (its defaults list, less _self_ and overrides of other groups)."""
    data = yaml.safe_load((config_dir() / group / f"{option}.yaml").read_text()) or {}
    return [d.split("@")[0] for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes_and_instantiates(tmp_path, group, option):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    if group not in GLOBAL_GROUPS:
        assert group in cfg
    if group in {"trainer", "callbacks", "logger"} and (group, option) not in NEEDS_EXTRA:
        cfg.monitor, cfg.monitor_mode = "val/accuracy", "max"
        node = cfg[group]  # trainer: every key is a pytorch_lightning.Trainer argument (lightning_ft's are top-level)
        objects = [instantiate(node)] if group == "trainer" else [instantiate(c) for c in (node or {}).values()]
        assert all(o is not None for o in objects)
    if group in {"optim", "scheduler"}:
        assert instantiate(cfg[group]).func is not None  # a _partial_ factory


def test_every_group_has_a_default_and_the_defaults_point_at_real_files():
    text = (config_dir() / "train.yaml").read_text()
    for group in ["task", "backbone", "trainer", "optim", "scheduler", "callbacks", "logger", "hydra"]:
        assert f"  - {group}: " in text and options(group)


@pytest.mark.parametrize("group,old,new", aliases())
def test_every_old_name_composes_to_its_new_one(tmp_path, group, old, new):
    path = config_dir() / group / f"{old}.yaml"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines == [ALIAS, "defaults:", f"  - {new}"], f"{path} should be a thin alias: the comment and its new name"
    assert ALIAS not in (config_dir() / group / f"{new}.yaml").read_text()  # an alias names a real config
    extra = ["task=text_classification"] if group == "dataset" else []
    before, after = (OmegaConf.to_container(compose_config([*extra, f"{group}={name}"], tmp_path), resolve=True)
                     for name in (old, new))
    assert before == after


def test_the_renamed_configs_have_their_old_names():
    names = {(group, old): new for group, old, new in aliases()}
    renamed = {"bert-base-cased": "bert_base_cased", "bert-base-uncased": "bert_base_uncased",
               "distilbert-base-uncased": "distilbert_base_uncased", "roberta-base": "roberta_base",
               "t5-small": "t5_small", "bart-base": "bart_base"}
    assert {old: names.get(("backbone", old)) for old in renamed} == renamed
    assert names.get(("dataset", "stsb_sample")) == "sample_stsb"
    for path in config_dir().glob("*/*.yaml"):  # one scheme: underscores (the aliases keep the old hyphens)
        assert "-" not in path.stem or ALIAS in path.read_text(), f"{path}: use underscores in config names"


@pytest.mark.parametrize("group,option", [(g, o) for g in ["dataset", "trainer", "backbone"] for o in options(g)
                                          if own_defaults(g, o) and ALIAS not in (config_dir() / g / f"{o}.yaml")
                                          .read_text()])
def test_an_inheriting_config_does_not_repeat_what_it_inherits(tmp_path, group, option):
    text = (config_dir() / group / f"{option}.yaml").read_text()
    own = yaml.safe_load(text)
    own.pop("defaults")
    if "# @package _global_" in text:  # e.g. the GLUE dataset configs, which set task keys too
        own = own[group]
    for parent in own_defaults(group, option):
        inherited = OmegaConf.to_container(compose_config([f"{group}={parent}"], tmp_path)[group], resolve=False)
        repeated = [k for k, v in own.items() if k in inherited and inherited[k] == v]
        assert not repeated, f"{group}/{option}.yaml repeats {repeated} of {parent}.yaml"


def test_the_default_callbacks_are_one_file_each(tmp_path):
    callbacks = compose_config([], tmp_path).callbacks
    assert list(callbacks) == CALLBACKS
    for name in CALLBACKS:  # each file places itself at callbacks.<name>, alone or in default.yaml
        assert list(compose_config([f"callbacks={name}"], tmp_path).callbacks) == [name]
    # step_checkpoint is last_checkpoint's settings plus a step interval, and the two stay independent
    last, step = (OmegaConf.to_container(callbacks[k]) for k in ("last_checkpoint", "step_checkpoint"))
    assert step == {**last, "every_n_train_steps": 500}
    cfg = compose_config(["callbacks.step_checkpoint.every_n_train_steps=100", "~callbacks.progress_bar",
                          "callbacks.last_checkpoint.filename=latest"], tmp_path)
    assert cfg.callbacks.step_checkpoint.every_n_train_steps == 100 and cfg.callbacks.step_checkpoint.filename == "last"
    assert "progress_bar" not in cfg.callbacks and cfg.callbacks.last_checkpoint.filename == "latest"
    assert list(compose_config(["callbacks=early_stopping"], tmp_path).callbacks) == [*CALLBACKS, "early_stopping"]


def test_skip_nonfinite_is_a_top_level_key_not_a_trainer_one(tmp_path):
    cfg = compose_config(["skip_nonfinite=true"], tmp_path)
    assert cfg.skip_nonfinite is True and "skip_nonfinite" not in cfg.trainer


@pytest.mark.parametrize("overrides", [[], ["hparams_search=optuna"], ["hydra/launcher=slurm"]])
def test_hydra_settings_come_from_hydra_default(tmp_path, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"run_dir={tmp_path}"], return_hydra_config=True)
    hydra = cfg.hydra
    assert hydra.runtime.choices.hydra == "default" and "\nhydra:" not in (config_dir() / "train.yaml").read_text()
    assert hydra.run.dir == str(tmp_path) == cfg.run_dir  # Hydra's files go to the run directory
    assert OmegaConf.to_container(hydra.sweep)["subdir"] == "${hydra.job.num}"
    assert str(OmegaConf.to_container(hydra.sweep)["dir"]).startswith("outputs/multirun/${now:")
    assert hydra.job.chdir is False and hydra.hydra_logging.loggers.alembic.level == "WARNING"
    assert {k: v._target_ for k, v in hydra.callbacks.items()} == {"check_run_dir": "lightning_ft.rundir.CheckRunDir",
                                                                  "check_sweep": "lightning_ft.sweep.CheckSweep",
                                                                  "sweep_summary": "lightning_ft.sweep.SweepSummary"}
    if overrides == ["hydra/launcher=slurm"]:
        assert "submitit" in hydra.launcher._target_ and hydra.launcher.timeout_min == 60
    if overrides == ["hparams_search=optuna"]:
        assert "optuna" in hydra.sweeper._target_ and hydra.sweeper.n_trials == 8


def test_recipes_and_experiments_say_what_they_are_for():
    for group, role in (("recipe", "# recipe: a task's tuned defaults, applied automatically"),
                        ("experiment", "# experiment: a named, opt-in recipe")):
        for path in (config_dir() / group).glob("*.yaml"):
            assert path.read_text().splitlines()[1].startswith(role), f"{path}: start with the group's role"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs_with_a_tiny_model(tmp_path, experiment):
    text = (config_dir() / "experiment" / f"{experiment}.yaml").read_text()
    dataset = next(line.split(":")[1].strip() for line in text.splitlines() if "override /dataset" in line)
    assert dataset in LOCAL_DATA, f"add where the {dataset} data lives to LOCAL_DATA"
    needs_shared(LOCAL_DATA[dataset])  # skips, naming the folder, where the real data is absent
    task = next((line.split(":")[1].strip() for line in text.splitlines() if "override /task" in line), None)
    quick = [o.replace("tiny_bert", TINY_BACKBONES.get(task, "tiny_bert")) for o in QUICK]
    overrides = [f"experiment={experiment}", *quick, f"dataset.data_dir={LOCAL_DATA[dataset]}",
                 "dataset.max_train_examples=200", "dataset.max_eval_examples=100",
                 "trainer.max_epochs=1"]  # an experiment's own epochs (3 to 10) would only repeat debug=limit's batches
    if task in ("translation", "summarization"):  # a random tiny model generates to the limit: keep it short
        overrides += ["task.max_new_tokens=8", "task.num_beams=1"]
    cfg = compose_config(overrides, tmp_path)
    assert cfg.run_name == experiment  # the experiment's own keys win over train.yaml's
    best = train(cfg)
    metrics = json.loads(Path(tmp_path, "metrics.json").read_text())
    assert best is not None and metrics["best_score"] == best and (metrics.get("test") or not cfg.test)
    assert Path(tmp_path, "hf_model", "config.json").is_file()
