"""The run lifecycle with real processes: exact resume after kill -9 and after SIGTERM, atomic and checked
checkpoints, non-finite losses, the run report and the saved environment."""

import csv
import json
import os
import random
from pathlib import Path

import pytest
import torch
from cli import run_cli

TESTS = Path(__file__).resolve().parent
WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull", "film", "plot", "actor", "scene"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """72 training and 16 validation sentences: 9 batches of 8 per epoch."""
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("data")
    for split, rows in (("train", 72), ("validation", 16)):
        lines = ["sentence\tlabel"] + [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + f"\t{rng.randint(0, 1)}"
                                       for _ in range(rows)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def train(run_dir: Path, data_dir: Path, *extra: str):
    """A real training process: tiny BERT, dropout on, fp32, 2 epochs of 9 steps, a step checkpoint every 4 steps,
    every batch recorded."""
    args = ["backbone=tiny_bert", f"dataset.data_dir={data_dir}", "dataset.batch_size=8", "trainer.max_epochs=2",
            "trainer.precision=32-true", "callbacks.step_checkpoint.every_n_train_steps=4", "~callbacks.progress_bar",
            "test=false", "export=false", "trainer.log_every_n_steps=1", f"run_dir={run_dir}",
            "+callbacks.recorder._target_=run_callbacks.BatchRecorder",
            f"+callbacks.recorder.path={run_dir}/batches.jsonl",
            *extra]
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
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def signal_at(step: int, name: str) -> list[str]:
    key = f"+callbacks.signal_{step}"
    return [f"{key}._target_=run_callbacks.SignalAtStep", f"{key}.step={step}", f"{key}.signal_name={name}"]


@pytest.mark.slow
def test_an_interrupted_run_resumes_exactly_as_if_never_interrupted(data_dir, tmp_path):
    whole = tmp_path / "whole"
    assert train(whole, data_dir).returncode == 0
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
    # the history of the earlier attempts is kept: the report's table and curve cover every validation
    report = (run / "report.md").read_text()
    assert "| 9 | 0 |" in report and "| 18 | 1 |" in report
    # the CSV log reads as one run: each step's training loss logged once
    with (run / "metrics.csv").open() as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps == list(range(18))  # Lightning logs step N's loss at step N - 1
