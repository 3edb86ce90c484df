"""The entry point from the command line: mistakes fail fast with one clear message, sweeps get a dir per run."""

import csv
import json

import pytest
import yaml
from cli import run_cli
from conftest import QUICK


def test_mistyped_config_group_lists_the_options(tmp_path):
    result = run_cli(["dataset=sst3"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "dataset=sst3 is not a dataset config (did you mean dataset=sst2?): use one of" in result.stderr
    assert "sample_ner" in result.stderr


def test_mistyped_key_names_it_and_the_fix(tmp_path):
    result = run_cli(["trainer.max_epoch=1"], tmp_path)
    assert result.returncode == 2
    assert "trainer.max_epoch is not a key of the config: did you mean trainer.max_epochs" in result.stderr


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
    assert "backbone.name 'no-such-org/no-such-model' is neither a local directory" in result.stderr


@pytest.mark.slow
def test_a_multirun_of_multi_process_runs_writes_one_directory_per_run_and_a_summary(tmp_path):
    """Hydra multirun + DDP, the peers' known crash: each job's ranks run that job alone, in its directory."""
    result = run_cli(["-m", "optim.lr=1e-4,3e-4", *QUICK, "trainer.max_epochs=1", "test=false", "trainer=ddp_sim",
                      "hydra.sweep.dir=sweep"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    lrs = [yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] for run in runs]
    assert lrs == [1e-4, 3e-4]
    scores = []
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        scores.append(metrics["best_score"])
        # the command that reruns this job alone is recorded, not the sweep's
        argv = metrics["environment"]["argv"]
        assert "-m" not in argv and ("optim.lr=0.0001" if run.name == "0" else "optim.lr=0.0003") in argv
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "hf_model" / "config.json").is_file()
        assert (run / "train_ddp_process_1.log").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("sweep",)]  # no stray directory of a rank
    with (sweep / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(float(r["optim.lr"]), float(r["best val/accuracy"]), r["status"]) for r in rows] == [
        (1e-4, scores[0], "done"), (3e-4, scores[1], "done")]
    best = max(range(2), key=lambda i: scores[i])
    assert f"Best: job {best} (optim.lr=" in (sweep / "summary.md").read_text()
    assert (sweep / "summary.png").stat().st_size > 0


def test_a_search_space_key_the_config_lacks_is_refused_before_any_run(tmp_path):
    result = run_cli(["-m", "hparams_search=optuna", "+hydra.sweeper.params={optim.lrr:'choice(1e-4,3e-4)'}",
                      "hydra.sweep.dir=sweep"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the search space (hydra.sweeper.params) names 'optim.lrr', which the config does not have. Did you "
        "mean optim.lr or optim or optim.eps? Fix the key, or write +optim.lrr to add a new one.")
    assert not (tmp_path / "sweep").exists()


def test_slurm_tasks_per_node_must_match_the_devices_before_submitting(tmp_path):
    result = run_cli(["-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", "hydra.sweep.dir=sweep"],
                     tmp_path)
    assert result.returncode == 2 and "hydra.launcher.tasks_per_node=2 but trainer.devices=1" in result.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(("option", "extra"), [("hydra/launcher=slurm", "slurm"), ("hparams_search=optuna", "optuna")])
def test_an_option_whose_package_is_missing_names_the_extra(option, extra, monkeypatch, capsys):
    import importlib.util

    from lightning_ft import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "hydra_plugins" in name else real(name))
    monkeypatch.setattr("sys.argv", ["lightning_ft/train.py", "-m", option])
    with pytest.raises(SystemExit) as stop:
        train.cli()
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"{option} needs" in error and f"pip install 'lightning_ft[{extra}]'" in error


def test_help_answers_without_training(tmp_path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0 and "== Configuration groups ==" in result.stdout
    assert "dataset: " in result.stdout and "sample_text_classification" in result.stdout
