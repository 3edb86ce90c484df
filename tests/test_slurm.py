"""A real one-node SLURM on this machine (scripts/slurm/local-cluster-up.sh installs and starts Debian's slurmctld,
slurmd and munge): a sweep submitted through ``hydra/launcher=slurm`` (submitit) and a job from
``scripts/slurm/train.sbatch``. Each is signalled through SLURM in the middle of training, as before a time limit,
and must save, requeue itself, and finish from its checkpoint with the step count of an uninterrupted run."""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, ROOT

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
STEPS = 10  # QUICK: 2 epochs of 5 batches
# The README's SLURM commands (its ```sh blocks): these tests run them, with a tiny model and this cluster's limits.
README_COMMANDS = [line for block in re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                   for line in block.splitlines() if line.strip() and not line.startswith("#")]


def readme_command(start: str) -> list[str]:
    found = [c for c in README_COMMANDS if c.startswith(start)]
    assert len(found) == 1, f"the README should show one command starting with {start!r}: {README_COMMANDS}"
    return shlex.split(found[0].replace("<partition>", "debug"))


def test_the_readme_shows_the_two_slurm_commands_these_tests_run():
    assert len(README_COMMANDS) == 2
    readme_command("python -m lightning_ft.train -m hydra/launcher=slurm")
    readme_command("sbatch scripts/slurm/train.sbatch")


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        if os.environ.get("CI"):
            pytest.fail("the SLURM tests install and start a local SLURM: they need root and apt-get")
        pytest.skip("needs root and apt-get to install and start a local SLURM")
    up = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "local-cluster-up.sh")], capture_output=True,
                        text=True, timeout=600, env={**os.environ, "SLURM_CI_CPUS": "4"}, stdin=subprocess.DEVNULL)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    yield
    subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "local-cluster-down.sh")], timeout=120)


@pytest.fixture
def job_env(monkeypatch):
    """Jobs inherit the submitting environment (sbatch --export=ALL): the test callbacks must be importable."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def _wait_for(path: Path, seconds: float, what: str, log: Path | None = None) -> str:
    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            detail = log.read_text()[-3000:] if log and log.is_file() else ""
            pytest.fail(f"no {what} after {seconds} s\n{detail}")
        time.sleep(0.2)
    return path.read_text()


def _wait_at_step_4(marker: Path) -> list[str]:
    key = "+callbacks.wait_for_signal"
    return [f"{key}._target_=run_callbacks.WaitForSignalAtStep", f"{key}.step=4", f"{key}.marker={marker}"]


def _check_finished_from_checkpoint(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert metrics["environment"]["slurm"]["restart_count"] == "1"
    assert metrics["best_score"] is not None and metrics["validation"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == STEPS
    with (run_dir / "metrics.csv").open() as handle:
        logged = [(row["step"], name) for row in csv.DictReader(handle) for name, v in row.items()
                  if v and name not in ("step", "epoch")]
    assert len(logged) == len(set(logged))  # nothing logged twice by the two runs


def test_jobs_signalled_through_slurm_requeue_and_finish_from_their_checkpoints_and_ranks_come_from_slurm(
        slurm_cluster, job_env, tmp_path, monkeypatch):
    """Both at once (the cluster declares 4 CPUs), so that their waits for SLURM's requeue overlap; and a 2-task job
    whose ranks SLURM starts together."""
    # The README's sweep, reduced to one run (a second would only queue behind it on 2 cores).
    readme = readme_command("python -m lightning_ft.train -m hydra/launcher=slurm")
    args = [a if not a.startswith("optim.lr=") else "optim.lr=" + a.split("=")[1].split(",")[0] for a in readme[3:]]
    sweep_marker, sweep_log = tmp_path / "sweep_at_step_4", tmp_path / "sweep.log"
    command = [sys.executable, "-m", "lightning_ft.train", *args, "hydra.launcher.cpus_per_task=1",
               "hydra.launcher.mem_gb=3", f"hydra.sweep.dir={tmp_path / 'sweep'}", *QUICK, "test=false",
               *_wait_at_step_4(sweep_marker)]
    # The README's sbatch job.
    readme = readme_command("sbatch scripts/slurm/train.sbatch")
    # Beside them, the template with 2 tasks: srun starts both ranks at once, Lightning reads them from SLURM.
    ranks_run = tmp_path / "two_tasks"
    monkeypatch.setenv("RUN_DIR", str(ranks_run))
    ranks_job = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out", "--ntasks-per-node=2",
         "--cpus-per-task=1", "--mem-per-cpu=2G", str(ROOT / readme[1]), *readme[2:], *QUICK, "test=false",
         "trainer=ddp_sim", f"+dataset.cache_dir={tmp_path / 'two_tasks_cache'}"],
        capture_output=True, text=True, check=True).stdout.strip()
    batch_marker, batch_run = tmp_path / "batch_at_step_4", tmp_path / "batch_run"
    monkeypatch.setenv("RUN_DIR", str(batch_run))
    with sweep_log.open("w") as out:
        sweep = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            batch_job = subprocess.run(
                ["sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out",
                 "--cpus-per-task=1", "--mem=3G", str(ROOT / readme[1]), *readme[2:], *QUICK, "test=false",
                 *_wait_at_step_4(batch_marker)], capture_output=True, text=True, check=True).stdout.strip()
            batch_log = tmp_path / f"slurm-{batch_job}.out"
            # What SLURM sends before the time limit: submitit asks for USR2 (signal_delay_s), the template USR1.
            sweep_job = _wait_for(sweep_marker, 180, "sweep job at step 4", sweep_log)
            subprocess.run(["scancel", "--signal=USR2", sweep_job], check=True)
            assert _wait_for(batch_marker, 180, "sbatch job at step 4", batch_log) == batch_job
            subprocess.run(["scancel", "--signal=USR1", batch_job], check=True)
            assert sweep.wait(timeout=300) == 0, sweep_log.read_text()[-3000:]
        finally:
            sweep.kill()
    deadline = time.monotonic() + 300
    while subprocess.run(["squeue", "-h", "-j", f"{batch_job},{ranks_job}"], capture_output=True,
                         text=True).stdout.strip():
        assert time.monotonic() < deadline, batch_log.read_text()[-3000:]
        time.sleep(0.5)

    sweep_run = tmp_path / "sweep" / "0"
    _check_finished_from_checkpoint(sweep_run)
    assert json.loads((sweep_run / "metrics.json").read_text())["environment"]["slurm"]["job_id"] == sweep_job
    assert (tmp_path / "sweep" / "summary.md").is_file()
    text = batch_log.read_text()
    assert f"requeued SLURM job {batch_job}" in text and "restart 1" in text, text[-3000:]
    _check_finished_from_checkpoint(batch_run)

    ranks_log = (tmp_path / f"slurm-{ranks_job}.out").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in ranks_log and "GLOBAL_RANK: 1, MEMBER: 2/2" in ranks_log, ranks_log[-3000:]
    metrics = json.loads((ranks_run / "metrics.json").read_text())
    assert metrics["environment"]["slurm"]["ntasks"] == "2" and metrics["validation"]
    assert metrics["data"]["examples_tokenized"] > 0  # rank 0 tokenized; rank 1 waited for its cache:
    assert "rank 1: tokenized 0 rows" in ranks_log
