"""The entry point from the command line: mistakes fail fast with one clear message, sweeps get a dir per run."""

import json

import yaml
from cli import run_cli
from conftest import QUICK


def test_mistyped_config_group_lists_the_options(tmp_path):
    result = run_cli(["dataset=sst3"], tmp_path)
    assert result.returncode != 0
    assert "Could not find 'dataset/sst3'" in result.stderr and "Available options in 'dataset'" in result.stderr
    assert "sst2" in result.stderr


def test_mistyped_key_names_it_and_the_fix(tmp_path):
    result = run_cli(["trainer.max_epoch=1"], tmp_path)
    assert result.returncode != 0
    assert "Key 'max_epoch' is not in struct" in result.stderr and "+trainer.max_epoch=1" in result.stderr


def test_bad_data_path_is_one_sentence_without_traceback(tmp_path):
    result = run_cli([*QUICK, "dataset.data_dir=no/such/dir"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset.data_dir 'no/such/dir' does not exist") and last.endswith("fix the path.")
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.ckpt"))


def test_unknown_backbone_offline_is_one_sentence(tmp_path):
    result = run_cli(["backbone.name=no-such-org/no-such-model", "debug=fast_dev_run"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "backbone tokenizer 'no-such-org/no-such-model' is neither a local directory" in result.stderr


def test_multirun_writes_one_directory_per_run(tmp_path):
    result = run_cli(["-m", "optim.lr=1e-4,3e-4", *QUICK, "test=false", "hydra.sweep.dir=sweep"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    lrs = [yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] for run in runs]
    assert lrs == [1e-4, 3e-4]
    for run in runs:
        assert json.loads((run / "metrics.json").read_text())["best_score"] is not None
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "hf_model" / "config.json").is_file()


def test_help_answers_without_training(tmp_path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0 and "== Configuration groups ==" in result.stdout
    assert "dataset: " in result.stdout and "sample_text_classification" in result.stdout
