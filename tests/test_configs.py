"""Every shipped config composes, and every experiment runs with a tiny model."""

import json
from pathlib import Path

import pytest
from conftest import QUICK, ROOT, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_ft.paths import config_dir, sample_dir
from lightning_ft.train import OWN_TRAINER_KEYS, train

SHARED = ROOT.parent / "shared" / "data"
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


GROUPS = ["task", "dataset", "backbone", "trainer", "optim", "scheduler", "callbacks", "logger", "recipe", "debug",
          "experiment"]
GLOBAL_GROUPS = {"recipe", "debug", "experiment"}  # @package _global_: merged into the top level


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes_and_instantiates(tmp_path, group, option):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    if group not in GLOBAL_GROUPS:
        assert group in cfg
    if group in {"trainer", "callbacks", "logger"} and (group, option) not in NEEDS_EXTRA:
        cfg.monitor, cfg.monitor_mode = "val/accuracy", "max"
        node = cfg[group]
        if group == "trainer":  # as train.py does: its own keys are not the Trainer's
            node = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in OWN_TRAINER_KEYS}
        objects = [instantiate(node)] if group == "trainer" else [instantiate(c) for c in (node or {}).values()]
        assert all(o is not None for o in objects)
    if group in {"optim", "scheduler"}:
        assert instantiate(cfg[group]).func is not None  # a _partial_ factory


def test_every_group_has_a_default_and_the_defaults_point_at_real_files():
    text = (config_dir() / "train.yaml").read_text()
    for group in ["task", "backbone", "trainer", "optim", "scheduler", "callbacks", "logger"]:
        assert f"  - {group}: " in text and options(group)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs_with_a_tiny_model(tmp_path, experiment):
    text = (config_dir() / "experiment" / f"{experiment}.yaml").read_text()
    dataset = next(line.split(":")[1].strip() for line in text.splitlines() if "override /dataset" in line)
    assert dataset in LOCAL_DATA, f"add where the {dataset} data lives to LOCAL_DATA"
    task = next((line.split(":")[1].strip() for line in text.splitlines() if "override /task" in line), None)
    quick = [o.replace("tiny_bert", TINY_BACKBONES.get(task, "tiny_bert")) for o in QUICK]
    overrides = [f"experiment={experiment}", *quick, f"dataset.data_dir={LOCAL_DATA[dataset]}",
                 "+dataset.max_train_examples=200", "+dataset.max_eval_examples=100"]
    if task in ("translation", "summarization"):  # a random tiny model generates to the limit: keep it short
        overrides.append("task.max_new_tokens=8")
    cfg = compose_config(overrides, tmp_path)
    assert cfg.run_name == experiment  # the experiment's own keys win over train.yaml's
    best = train(cfg)
    metrics = json.loads(Path(tmp_path, "metrics.json").read_text())
    assert best is not None and metrics["best_score"] == best and (metrics.get("test") or not cfg.test)
    assert Path(tmp_path, "hf_model", "config.json").is_file()
