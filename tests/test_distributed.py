"""Several ranks from one command: `trainer=ddp_sim` (2 CPU processes over gloo) trains, writes one run directory,
tokenizes once, and evaluates to exactly the numbers one process gets on the same weights."""

import json
import shutil
import threading
import time

import pytest
from cli import run_cli
from conftest import QUICK, ROOT, compose_config

from lightning_ft.errors import UserError
from lightning_ft.launch import DATA_READY, _launch_id, wait_for_rank_zero_data
from lightning_ft.train import train


def _odd_sized_copy(task: str, folder):
    """The task's embedded sample with 151 validation rows: 2 ranks get 76 and 75, and DistributedSampler pads the
    second with a repeat of row 0, which a corpus metric must not count twice."""
    folder.mkdir()
    if task == "sft":  # 21 problems: 11 and 10, two packed rows each way; 10 answered, in batches of 8 and 2
        for split, count in (("train", 40), ("validation", 21)):
            lines = (ROOT / "data" / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:count]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    elif task == "ner":
        for split in ("train", "validation"):
            sentences = (ROOT / "data" / "wnut17" / f"{split}.conll").read_text().strip().split("\n\n")
            kept = sentences[:151] if split == "validation" else sentences[:400]
            (folder / f"{split}.conll").write_text("\n\n".join(kept) + "\n")
    else:
        shutil.copy(ROOT / "data" / "sst2" / "train.tsv", folder / "train.tsv")
        lines = (ROOT / "data" / "sst2" / "validation.tsv").read_text().splitlines()
        (folder / "validation.tsv").write_text("\n".join(lines[:152]) + "\n")  # header + 151 rows
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("task,extra", [("text_classification", []), ("ner", []), ("sft", []),
                                        # LoRA and token-budget batches in one run: a launch costs 25 s here
                                        ("text_classification", ["peft=lora", "dataset.max_tokens=512"])])
def test_two_ranks_train_into_one_run_dir_and_evaluate_like_one_process(task, extra, tmp_path, monkeypatch):
    data = _odd_sized_copy(task, tmp_path / "data")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))  # rank 0 tokenizes afresh
    tiny = (["backbone=tiny_gpt2", "dataset.chat_template=chatml", "dataset.max_length=256", "task.max_new_tokens=8",
             "task.generate_limit=10", "dataset.eval_batch_size=1"] if task == "sft" else [])
    quick = [a for a in QUICK if not (tiny and a.startswith("backbone="))]
    common = [f"task={task}", f"dataset.data_dir={data}", *quick, *tiny, "trainer.limit_val_batches=1.0",
              "test=false", "trainer.precision=32-true", *extra]
    result = run_cli([*common, "trainer=ddp_sim", "run_dir=ddp"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "ddp"]  # no directory per rank
    ranks = json.loads((run_dir / "metrics.json").read_text())
    assert ranks["data"]["examples_tokenized"] > 0  # rank 0 tokenized...
    assert "rank 1: tokenized 0 rows" in (run_dir / "train_ddp_process_1.log").read_text()  # ...rank 1 read its cache
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "hf_model" / "config.json").is_file()
    assert len(ranks["validation"]) > 2
    if task == "sft":  # the answers of both ranks, gathered
        assert ranks["validation"]["val/answered"] == 10.0
        assert len(json.loads((run_dir / "predictions_val.json").read_text())) == 10

    # The same weights evaluated by one process, over the same 151 rows.
    one = tmp_path / "one"
    train(compose_config([*common, "train=false", f"ckpt_path={ranks['best_model_path']}", "export=false"], one))
    single = json.loads((one / "metrics.json").read_text())["validation"]
    assert single.keys() == ranks["validation"].keys()
    for name, value in single.items():
        assert ranks["validation"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_a_rank_started_beside_rank_zero_waits_for_this_launch_s_data(tmp_path, monkeypatch):
    """srun starts every rank at once: ranks > 0 wait for rank 0's mark of this launch, not a previous job's."""
    for key, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / DATA_READY).write_text("7;0;0;")  # left by the job's first run, before its requeue
    threading.Timer(0.6, lambda: (tmp_path / DATA_READY).write_text(_launch_id())).start()
    started = time.monotonic()
    wait_for_rank_zero_data(tmp_path, timeout_s=30)
    assert time.monotonic() - started >= 0.5
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # rank 0 of this launch never gets there
    with pytest.raises(UserError, match="waited 1 s for rank 0 to prepare the data"):
        wait_for_rank_zero_data(tmp_path, timeout_s=1)


@pytest.mark.parametrize("env", [{}, {"SLURM_PROCID": "3"}, {"LOCAL_RANK": "1", "SLURM_PROCID": "3"},
                                 {"RANK": "2", "LOCAL_RANK": "0"}, {"JSM_NAMESPACE_RANK": "5"}])
def test_the_launch_rank_read_before_lightning_is_lightnings_rank(env, monkeypatch):
    """launch_rank reads the rank without importing Lightning, by Lightning's own rule (a private function of
    lightning_fabric, pinned here)."""
    import sys

    from lightning_fabric.utilities.rank_zero import _get_rank

    from lightning_ft.launch import launch_rank

    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delitem(sys.modules, "lightning_fabric.utilities.rank_zero")  # as in a process that has not loaded it
    assert launch_rank() == (_get_rank() or 0)
