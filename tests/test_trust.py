"""Trust on a user's machine: a checkpoint is data and never code, a run directory belongs to one run and a finished
run is never overwritten, Ctrl-C saves the step, and Hydra's files never land apart from the run's."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli import run_cli
from conftest import QUICK, compose_config, random_sentences

from lightning_ft.errors import UserError
from lightning_ft.train import train

TESTS = Path(__file__).resolve().parent
WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull", "film", "plot"]


class RunsCode:
    """A pickle that runs a shell command when it is loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return random_sentences(tmp_path_factory.mktemp("data"), {"train": 32, "validation": 16}, WORDS, longest=9)


def args(data_dir: Path, *extra: str) -> list[str]:
    return [*QUICK, f"dataset.data_dir={data_dir}", "dataset.batch_size=8", "trainer.max_epochs=1",
            "trainer.log_every_n_steps=1", *extra]


def quick(data_dir: Path, run_dir: Path, *extra: str):
    return compose_config(args(data_dir, *extra), run_dir)


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory) -> Path:
    """A finished run, trained through the command line (so Hydra wrote its .hydra/ too)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = run_cli([*args(data_dir), f"run_dir={run_dir}"], cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


# ---- a checkpoint is data -----------------------------------------------------------------------------------------
def test_a_checkpoint_that_would_run_code_is_refused_through_every_entry(data_dir, tmp_path, monkeypatch, capsys):
    from lightning_ft.predict import main as predict

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "lightning_ft": {"task": "TextClassificationTask"}, "x": RunsCode(marker)}, crafted)
    (tmp_path / "in.jsonl").write_text('{"text": "good"}\n')

    assert predict([f"ckpt_path={crafted}", f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'o.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert "holds more than tensors and plain data" in err and "weights_only=True" in err
    with pytest.raises(UserError, match="holds more than tensors and plain data.*never runs code from one"):
        train(quick(data_dir, tmp_path / "a", f"ckpt_path={crafted}"))
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "last.ckpt").write_bytes(crafted.read_bytes())
    train(quick(data_dir, resumed, "resume=auto", "test=false", "export=false"))  # skipped with a warning
    assert not marker.exists()  # nothing ran, through any of the three
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


# ---- a run directory belongs to one run ---------------------------------------------------------------------------
def test_a_finished_run_is_never_overwritten_by_a_new_training(finished, data_dir):
    before = files_of(finished)
    again = run_cli([*args(data_dir), f"run_dir={finished}"], cwd=finished.parent)
    assert again.returncode == 2
    assert "already holds a run" in again.stderr and "resume=auto" in again.stderr
    assert files_of(finished) == before  # .hydra/, the log, checkpoints, metrics: byte for byte
    with pytest.raises(UserError, match="already holds a run .*continue it with resume=auto"):
        train(quick(data_dir, finished))
    assert files_of(finished) == before


def test_an_evaluation_of_a_finished_run_writes_beside_its_record(finished, data_dir):
    before = files_of(finished)
    best = json.loads((finished / "metrics.json").read_text())
    done = run_cli([*args(data_dir), f"run_dir={finished}", "train=false",
                    f"ckpt_path={best['best_model_path']}"], cwd=finished.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert files_of(finished).items() >= before.items()  # every file of the record, unchanged
    (evaluation,) = finished.glob("evaluation-*")
    result = json.loads((evaluation / "metrics.json").read_text())
    assert result["validation"]["val/accuracy"] == pytest.approx(best["best_score"])
    assert (evaluation / ".hydra" / "overrides.yaml").is_file() and not (evaluation / "checkpoints").exists()


def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_first(data_dir, tmp_path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                   "started": "2026-12-01 10:00:00", "slurm_job": None}))
        with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} on .*started 2026-12-01"):
            train(quick(data_dir, run_dir))
        refused = run_cli([*args(data_dir), f"run_dir={run_dir}"], cwd=tmp_path)
        assert refused.returncode == 2 and f"pid {holder.pid}" in refused.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # not even Hydra's files
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(data_dir, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    train(quick(data_dir, run_dir, "test=false", "export=false"))
    assert f"taking over the lock of a run that has ended (pid {dead.pid}" in caplog.text
    assert not (run_dir / ".lock").exists()  # released at the end
    assert (run_dir / "metrics.json").is_file()


def test_two_trainings_started_together_into_one_run_dir(data_dir, tmp_path):
    run_dir = tmp_path / "shared_dir"
    first = subprocess.Popen([sys.executable, "-m", "lightning_ft.train", *args(data_dir, "trainer.max_epochs=3"),
                              f"run_dir={run_dir}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / ".lock").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    second = run_cli([*args(data_dir), f"run_dir={run_dir}"], cwd=tmp_path)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and f"in use by another run (pid {first.pid}" in second.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] is not None and (run_dir / "config.yaml").read_text().count("max_epochs: 3") == 1


def test_a_run_dir_that_is_a_file_or_split_by_hydra_run_dir_is_refused(data_dir, tmp_path):
    file = tmp_path / "a_file"
    file.write_text("mine")
    refused = run_cli([*args(data_dir), f"run_dir={file}"], cwd=tmp_path)
    assert refused.returncode == 2 and f"run_dir '{file}' is a file" in refused.stderr and file.read_text() == "mine"
    split = run_cli([*args(data_dir), f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'elsewhere'}"],
                    cwd=tmp_path)
    assert split.returncode == 2 and "set run_dir= instead" in split.stderr
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "run").exists()


# ---- Ctrl-C -------------------------------------------------------------------------------------------------------
def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(data_dir, tmp_path):
    from lightning_ft.lifecycle import Preempted

    before = signal.getsignal(signal.SIGINT)
    interrupt = ["+callbacks.ctrl_c._target_=run_callbacks.SignalAtStep", "+callbacks.ctrl_c.step=2",
                 "+callbacks.ctrl_c.signal_name=INT"]
    with pytest.raises(Preempted, match="received SIGINT: saved step 2 .* resume=auto") as stop:
        train(quick(data_dir, tmp_path / "run", *interrupt))
    assert stop.value.signum == signal.SIGINT  # the entry point exits with 128 + 2
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) == before


def test_a_second_ctrl_c_stops_at_once(data_dir, tmp_path):
    env_path = os.environ.get("PYTHONPATH", "")
    twice = ["+callbacks.first._target_=run_callbacks.SignalAtStep", "+callbacks.first.step=1",
             "+callbacks.first.signal_name=INT", "+callbacks.second._target_=run_callbacks.SignalAtStep",
             "+callbacks.second.step=1", "+callbacks.second.signal_name=INT"]
    os.environ["PYTHONPATH"] = f"{TESTS}{os.pathsep}{env_path}" if env_path else str(TESTS)
    try:
        done = run_cli([*args(data_dir, *twice), f"run_dir={tmp_path / 'run'}"], cwd=tmp_path)
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert done.returncode not in (0, 130), done.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# ---- bad values fail before any work, naming the key --------------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc' is not a whole number"),
    ("optim.lr=-1", "optim.lr=-1 trains nothing: give a positive learning rate"),
    ("optim.lr=fast", "optim.lr='fast' is not a number"),
    ("dataset.batch_size=0", "dataset.batch_size=0 is below 1"),
    ("seed=abc", "seed='abc' is not a whole number"),
    ("dataset.max_length=-1", "dataset.max_length=-1 is below 1"),
    ("dataset.max_length=0", "dataset.max_length=0 is below 1"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 trains nothing and would export the untrained model"),
    ("+foo=1", "'foo' is not a key lightning_ft reads"),
    ("+monitr=val/accuracy", "'monitr' is not a key lightning_ft reads \\(did you mean monitor\\?\\)"),
    ("monitor_mode=sideways", "monitor_mode=sideways is not min or max"),
    ("dataset.problem_type=wrong", "dataset.problem_type 'wrong' is not one of"),
])
def test_a_bad_value_is_refused_before_any_work_naming_the_key(override, message, data_dir, tmp_path):
    with pytest.raises(UserError, match=message):
        train(quick(data_dir, tmp_path / "run", override))
    assert not (tmp_path / "run").exists()


def test_a_monitor_the_task_does_not_log_is_refused_before_the_first_step(data_dir, tmp_path):
    with pytest.raises(UserError, match="monitor=val/acc is not a metric this task logs \\(did you mean "
                                        "val/accuracy\\?\\): it logs .*val/f1_macro"):
        train(quick(data_dir, tmp_path / "run", "monitor=val/acc", "monitor_mode=max"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # not an epoch trained


# ---- a sweep goes on past a failing job ---------------------------------------------------------------------------
def test_a_sweep_goes_on_past_a_failing_job_and_exits_non_zero(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli(["-m", *args(data_dir, "test=false", "export=false"), "optim.lr=-1,1e-4",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "1 of the sweep's jobs failed (0)" in done.stderr
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and "failed (UserError: optim.lr=-1 trains nothing" in rows[1] and ",done," in rows[2]
    assert (sweep / "1" / "metrics.json").is_file() and (sweep / "0" / "failed.json").is_file()


# ---- iteration-based training resumes exactly -----------------------------------------------------------------------
def test_a_max_steps_run_resumed_from_an_end_of_epoch_checkpoint_trains_the_batches_an_uninterrupted_one_would(
        data_dir, tmp_path):
    def steps(run_dir: Path, max_steps: int, *extra: str):
        return compose_config([*QUICK, f"dataset.data_dir={data_dir}", "dataset.batch_size=8", "~debug",
                               "trainer.max_epochs=-1", f"trainer.max_steps={max_steps}", "trainer.precision=32-true",
                               "trainer.num_sanity_val_steps=0", "test=false", "export=false",
                               "+callbacks.recorder._target_=run_callbacks.BatchRecorder",
                               f"+callbacks.recorder.path={run_dir}/batches.jsonl", *extra], run_dir)

    def recorded(run_dir: Path) -> list[tuple[int, str]]:
        return [(r["step"], r["batch"]) for r in map(json.loads, (run_dir / "batches.jsonl").read_text().splitlines())]

    whole, part = tmp_path / "whole", tmp_path / "part"
    for run_dir in (whole, part):
        run_dir.mkdir()
    train(steps(whole, 12))  # 4 batches an epoch: 3 epochs
    train(steps(part, 4))  # ends on the first epoch's last batch: its checkpoint is an end-of-epoch one
    train(steps(part, 12, "resume=auto"))
    assert recorded(part) == recorded(whole)  # steps 1-12, the same batch at every step


@pytest.mark.parametrize(("override", "message"), [
    ("dataset.val_fractio=0.1", "did you mean dataset.val_fraction?"),
    ("task=nosuch", "task=nosuch is not a task config: use one of clm, mlm"),
    ("backbone=tiny_brt", "did you mean backbone=tiny_bert?"),
])
def test_a_mistyped_key_or_option_on_the_command_line_names_the_one_meant(override, message, tmp_path):
    done = run_cli([override], cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "outputs").exists()


def test_a_max_length_beyond_the_backbones_positions_is_refused_before_tokenizing(data_dir, tmp_path):
    with pytest.raises(UserError, match="dataset.max_length=100000 is longer than the backbone takes \\(512 tokens"):
        train(quick(data_dir, tmp_path / "run", "dataset.max_length=100000"))
    with pytest.raises(UserError, match="dataset.max_length=600 is longer than the backbone takes"):
        train(quick(data_dir, tmp_path / "ner", "task=ner", "dataset.max_length=600"))
