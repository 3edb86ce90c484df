"""A checkpoint written by an earlier lightning_ft (tests/fixtures/README.md: the commit and command) still predicts
and still resumes training: reorganising the code must not orphan the checkpoints users already have."""

import json
import shutil
from pathlib import Path

import torch
from conftest import QUICK, compose_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# A text classification run of lightning_ft 0.1.0 (commit d36211e): tiny_bert at 2 wide, 1 epoch of 5 steps.
OLD_CHECKPOINT = FIXTURES / "text_classification_v0.1.0.pt"
# The width the fixture was trained at (the backbone overrides of its command): a resumed run builds the same model.
WIDTH = ["backbone.config_overrides.hidden_size=2", "backbone.config_overrides.intermediate_size=4"]
TEXTS = ["a gripping, funny and moving film", "dull, and far too long", "fine"]


def _old_checkpoint(tmp_path: Path) -> Path:
    """A copy of the fixture in a run directory's layout, so nothing is ever written beside the original."""
    assert OLD_CHECKPOINT.is_file(), f"{OLD_CHECKPOINT} is missing (see tests/fixtures/README.md)"
    target = tmp_path / "old_run" / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copyfile(OLD_CHECKPOINT, target)
    return target


def test_the_fixture_is_what_its_readme_says():
    checkpoint = torch.load(OLD_CHECKPOINT, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 5 and checkpoint["epoch"] == 0
    assert checkpoint["lightning_ft"]["task"] == "lightning_ft.tasks.text_classification.TextClassificationTask"
    assert checkpoint["lightning_ft"]["backbone"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert checkpoint["hyper_parameters"]["id2label"] == {0: "negative", 1: "positive"}


def test_an_old_checkpoint_still_predicts(tmp_path):
    from lightning_ft.predict import main

    source, target = tmp_path / "texts.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    code = main([f"ckpt_path={_old_checkpoint(tmp_path)}", f"input={source}", f"output={target}"])
    assert code == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [row["text"] for row in rows] == TEXTS
    assert all(row["label"] in ("negative", "positive") for row in rows)


def test_an_old_checkpoint_still_resumes_training(tmp_path):
    from lightning_ft.train import train

    given = _old_checkpoint(tmp_path)
    old = torch.load(given, map_location="cpu", weights_only=True)
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    overrides = [*QUICK, *WIDTH, f"ckpt_path={given}", "trainer.max_epochs=2", "test=false", "export=false",
                 "+callbacks.recorder._target_=run_callbacks.BatchRecorder",
                 f"+callbacks.recorder.path={run_dir}/batches.jsonl"]
    train(compose_config(overrides, run_dir))

    # the second epoch's 5 steps, and only those: training continued from step 5, it did not start again
    steps = [json.loads(line)["step"] for line in (run_dir / "batches.jsonl").read_text().splitlines()]
    assert steps == [6, 7, 8, 9, 10]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 10 > old["global_step"]
    assert last["epoch"] == 1
    # the optimizer carried on from the old state (AdamW's step count), and the run's record kept the old history
    assert {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()} == {10.0}
    history = last["callbacks"]["RunRecord"]["train_loss"]
    assert history[:5] == old["callbacks"]["RunRecord"]["train_loss"] and len(history) == 10
