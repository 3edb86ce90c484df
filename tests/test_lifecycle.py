"""The run lifecycle with real processes: exact resume after kill -9 and after SIGTERM, atomic and checked
checkpoints, non-finite losses, the run report and the saved environment."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from cli import run_cli
from conftest import QUICK, compose_config, random_sentences

from lightning_ft.errors import UserError
from lightning_ft.train import train as train_run

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """72 training and 16 validation sentences: 9 batches of 8 per epoch."""
    return random_sentences(tmp_path_factory.mktemp("data"), {"train": 72, "validation": 16})


def run_args(run_dir: Path, data_dir: Path) -> list[str]:
    """Tiny BERT, dropout on, fp32, 2 epochs of 9 steps, a step checkpoint every 4 steps, every batch recorded."""
    return ["backbone=tiny_bert", f"dataset.data_dir={data_dir}", "dataset.batch_size=8", "trainer.max_epochs=2",
            "trainer.precision=32-true", "callbacks.step_checkpoint.every_n_train_steps=4", "~callbacks.progress_bar",
            "test=false", "export=false", "trainer.log_every_n_steps=1",
            "+callbacks.recorder._target_=run_callbacks.BatchRecorder",
            f"+callbacks.recorder.path={run_dir}/batches.jsonl"]


def train(run_dir: Path, data_dir: Path, *extra: str):
    """A real training process, as a user (or a scheduler) starts it."""
    args = [*run_args(run_dir, data_dir), f"run_dir={run_dir}", *extra]
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{TESTS}{os.pathsep}{env_path}" if env_path else str(TESTS)
    try:
        return run_cli(args, cwd=run_dir.parent, timeout=300)
    finally:
        os.environ["PYTHONPATH"] = env_path


def batches(run_dir: Path) -> list[list[tuple[int, str]]]:
    """The recorded (step, batch hash) sequences, one per process that trained in ``run_dir``."""
    attempts: dict[int, list] = {}
    for line in (run_dir / "batches.jsonl").read_text().splitlines():
        row = json.loads(line)
        attempts.setdefault(row["pid"], []).append((row["step"], row["batch"]))
    return list(attempts.values())


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def signal_at(step: int, name: str) -> list[str]:
    key = f"+callbacks.signal_{step}"
    return [f"{key}._target_=run_callbacks.SignalAtStep", f"{key}.step={step}", f"{key}.signal_name={name}"]


@pytest.mark.slow
def test_an_interrupted_run_resumes_exactly_as_if_never_interrupted(data_dir, tmp_path):
    whole = tmp_path / "whole"
    train_run(compose_config(run_args(whole, data_dir), whole))  # the uninterrupted reference, in this process
    [reference] = batches(whole)
    assert [s for s, _ in reference] == list(range(1, 19))

    run = tmp_path / "interrupted"
    # SIGTERM at step 6 (mid-epoch): the step is finished and saved, and the process exits 128 + 15
    stopped = train(run, data_dir, *signal_at(6, "TERM"))
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    assert "received SIGTERM: saved step 6" in stopped.stdout + stopped.stderr
    # kill -9 at step 10: the newest checkpoint is the end of epoch 0 (step 9)
    assert train(run, data_dir, "resume=auto", *signal_at(10, "KILL")).returncode == -9
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    # kill -9 at step 14, mid-epoch, two steps after the step-12 checkpoint
    assert train(run, data_dir, "resume=auto", *signal_at(14, "KILL")).returncode == -9
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    resumed = train(run, data_dir, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=auto: continuing from" in resumed.stdout + resumed.stderr

    # each attempt trained on exactly the batches the uninterrupted run had at those steps, in the same order
    attempts = batches(run)
    assert [(a[0][0], a[-1][0]) for a in attempts] == [(1, 6), (7, 10), (10, 14), (13, 18)]
    for attempt in attempts:
        first = attempt[0][0]
        assert attempt == reference[first - 1:first - 1 + len(attempt)]

    expected, weights = final_weights(whole), final_weights(run)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["validation"] == pytest.approx(json.loads((whole / "metrics.json").read_text())["validation"],
                                                  abs=1e-5)
    assert metrics["resumed_from"].endswith("last.ckpt")
    # Hydra's own files go to the run directory too, nothing to ./outputs
    assert (run / ".hydra" / "overrides.yaml").is_file() and not (tmp_path / "outputs").exists()
    # the history of the earlier attempts is kept: the report's table and curve cover every validation
    report = (run / "report.md").read_text()
    assert "| 9 | 0 |" in report and "| 18 | 1 |" in report
    # the CSV log reads as one run: each step's training loss logged once
    with (run / "metrics.csv").open() as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps == list(range(18))  # Lightning logs step N's loss at step N - 1


# ---- in one process: checkpoints, non-finite losses, loggers, the report --------------------------------------
def quick(data_dir: Path, run_dir: Path, *extra: str):
    return compose_config([*QUICK, f"dataset.data_dir={data_dir}", "dataset.batch_size=8", "test=false",
                           "export=false", "trainer.log_every_n_steps=1", *extra], run_dir)


def test_a_checkpoint_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from lightning_fabric.plugins.io import torch_io

    from lightning_ft.lifecycle import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def killed_halfway(checkpoint, target):
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # as a kill during the write

    monkeypatch.setattr(torch_io, "_atomic_save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the previous checkpoint, whole


def test_resume_auto_skips_a_corrupt_checkpoint_for_the_previous_good_one(tmp_path, caplog):
    from lightning_ft.lifecycle import find_resume_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"state_dict": {}, "loops": {}, "global_step": 8}, folder / "best-epoch00-step8.ckpt")
    good = folder / "best-epoch00-step8.ckpt"
    (folder / "last.ckpt").write_bytes(good.read_bytes()[:100])  # truncated, and newer
    found, contents = find_resume_checkpoint(tmp_path)
    assert found == good and contents["global_step"] == 8
    assert "skipping" in caplog.text and "last.ckpt" in caplog.text and "truncated" in caplog.text
    assert find_resume_checkpoint(tmp_path / "nothing-here") is None


def test_a_corrupt_or_foreign_checkpoint_given_explicitly_is_one_clear_sentence(data_dir, tmp_path):
    first = quick(data_dir, tmp_path / "a")
    train_run(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(UserError, match=r"broken.ckpt' cannot be read, it is truncated or not a checkpoint"):
        train_run(quick(data_dir, tmp_path / "b", f"ckpt_path={broken}"))
    with pytest.raises(UserError, match="does not exist"):
        train_run(quick(data_dir, tmp_path / "b", f"ckpt_path={tmp_path / 'missing.ckpt'}"))
    with pytest.raises(UserError, match="resume=yes is not a choice"):
        train_run(quick(data_dir, tmp_path / "b", "+resume=yes"))

    # another task's checkpoint: named as such, before any training
    other_task = quick(data_dir, tmp_path / "c", "task=ner", "dataset=sample_ner", f"ckpt_path={last}")
    with pytest.raises(UserError, match="written by TextClassificationTask but this run is TokenClassificationTask"):
        train_run(other_task)
    # the same task on another backbone: named; another head size: the weights that do not fit are named
    foreign = torch.load(last, weights_only=True)
    foreign["lightning_ft"]["backbone"]["name"] = "bert-base-cased"
    torch.save(foreign, tmp_path / "foreign.ckpt")
    with pytest.raises(UserError, match="trained from backbone 'bert-base-cased' but this run builds"):
        train_run(quick(data_dir, tmp_path / "d", f"ckpt_path={tmp_path / 'foreign.ckpt'}"))
    wider = quick(data_dir, tmp_path / "e", "backbone.config_overrides.hidden_size=64", f"ckpt_path={last}")
    with pytest.raises(UserError, match=r"does not fit this model: weights of another shape \(model.bert"):
        train_run(wider)
    assert not (tmp_path / "e" / "checkpoints").exists()  # nothing was trained or overwritten


def test_a_non_finite_loss_stops_naming_the_step_or_is_skipped_when_asked(data_dir, tmp_path):
    nan_at_3 = ["+callbacks.nan._target_=run_callbacks.NaNAtStep", "+callbacks.nan.step=3",
                "callbacks.step_checkpoint.every_n_train_steps=2"]
    with pytest.raises(UserError, match=r"training loss is nan at step 3 \(epoch 0, batch 2\): stopped") as stop:
        train_run(quick(data_dir, tmp_path / "a", *nan_at_3))
    assert f"Last good checkpoint: {tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}" in str(stop.value)

    train_run(quick(data_dir, tmp_path / "b", *nan_at_3, "skip_nonfinite=true"))
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["skipped_nonfinite_steps"] == 1
    assert all(v == v for v in metrics["validation"].values())  # no NaN reached the weights


def test_csv_tensorboard_wandb_and_mlflow_log_the_run_and_a_resume_reopens_the_same_runs(data_dir, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    loggers = ["logger=[csv,tensorboard,wandb,mlflow]", "logger.wandb.offline=true"]
    train_run(quick(data_dir, run, *loggers, "trainer.max_epochs=1"))
    ids = json.loads((run / "logger_runs.json").read_text())
    assert set(ids) == {"wandb", "mlflow"}
    import wandb

    wandb.finish()  # as the process's end would: the resume must reopen the run by its id
    train_run(quick(data_dir, run, *loggers, "trainer.max_epochs=2", "resume=auto"))
    assert json.loads((run / "logger_runs.json").read_text()) == ids

    assert "train/loss" in (run / "metrics.csv").read_text().splitlines()[0]
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((run / "wandb").glob(f"offline-run-*-{ids['wandb']}"))  # one wandb run, reopened
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run}/mlflow.db")
    history = client.get_metric_history(ids["mlflow"], "val/accuracy")
    assert {4, 9} <= {m.step for m in history}  # both epochs' validations in the one MLflow run

    # what every run directory holds
    report = (run / "report.md").read_text()
    assert "## Metrics" in report and "val/accuracy" in report and "resumed from" in report
    assert (run / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    environment = json.loads((run / "environment.json").read_text())
    assert environment["versions"]["torch"] == torch.__version__ and environment["git_commit"]
    assert (run / "config.yaml").is_file()


def test_sigusr1_saves_the_step_and_stops_and_its_handler_is_put_back(data_dir, tmp_path):
    import signal

    from lightning_ft.lifecycle import Preempted

    before = signal.getsignal(signal.SIGUSR1)
    usr1_at_3 = ["+callbacks.usr1._target_=run_callbacks.SignalAtStep", "+callbacks.usr1.step=3",
                 "+callbacks.usr1.signal_name=USR1"]
    with pytest.raises(Preempted, match="received SIGUSR1: saved step 3") as stop:
        train_run(quick(data_dir, tmp_path / "run", *usr1_at_3))
    assert stop.value.signum == signal.SIGUSR1  # the entry point exits with 128 + 10
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_trainer_this_machine_cannot_run_is_refused_before_any_work(data_dir, tmp_path, monkeypatch):
    import importlib.util

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else
                        real_find_spec(name, *a))
    with pytest.raises(UserError, match="deepspeed_stage_2 needs the deepspeed package"):
        train_run(quick(data_dir, tmp_path / "a", "trainer=deepspeed"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserError, match="runs on GPUs .* but this machine has none: use trainer=cpu"):
        train_run(quick(data_dir, tmp_path / "b", "trainer=ddp"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"trainer.devices=4 asks for 4 GPUs but this machine has 2"):
        train_run(quick(data_dir, tmp_path / "c", "trainer=fsdp", "trainer.devices=4"))
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written
