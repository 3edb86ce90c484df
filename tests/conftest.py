"""Shared fixtures: offline mode, an isolated datasets cache, tiny models, composing the shipped configs, and the
real datasets in ../shared/data (tests that read them skip where they are absent; on CI such a skip fails the run)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports `datasets`/`transformers`: never reach the hub, and keep tokenized caches per test run.
os.environ["HF_HUB_OFFLINE"] = "1"
if "HF_DATASETS_CACHE" not in os.environ:
    # Removed when this process ends: each test run (and each xdist worker) made one of 60 MB and left it in /tmp.
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lft-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One core a worker (pytest -n 2 on 2 cores): torch's default of every core per process would oversubscribe them.
    # Subprocesses the tests start inherit it.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from lightning_ft.config import register_resolvers  # noqa: E402
from lightning_ft.paths import config_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The real datasets, outside the project: CI has them at ../shared/data next to the clone, a plain clone does not.
# LFT_SHARED_DATA points the tests at another copy (the same folder layout: glue_sst2/, conll2003/, ...).
SHARED_DEFAULT = ROOT.parent / "shared" / "data"
_SHARED_OVERRIDE = os.environ.get("LFT_SHARED_DATA")
SHARED = Path(_SHARED_OVERRIDE).expanduser().resolve() if _SHARED_OVERRIDE else SHARED_DEFAULT
SHARED_SKIP = "(the real datasets; absent in a plain clone)"  # ends every skip reason for missing real data
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# Fast settings for runs that only check the plumbing.
QUICK = ["backbone=tiny_bert", "debug=limit", "~callbacks.progress_bar"]

register_resolvers()


def compose_config(overrides: list[str], run_dir: Path):
    """The config `python -m lightning_ft.train <overrides>` would get, with its output in ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"run_dir={run_dir}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # the app itself never sees this node
    return cfg


def needs_shared(folder: str | Path) -> Path:
    """``SHARED / folder`` (an absolute path is returned as it is); skips the test, naming the folder, when that
    real-data folder is not on this machine. As a marker, ``@pytest.mark.needs_shared("conll2003", ...)`` skips
    before any fixture is built."""
    path = SHARED / folder
    if path.is_relative_to(SHARED) and not path.is_dir():
        where = SHARED if _SHARED_OVERRIDE else "../shared/data"
        pytest.skip(f"needs {where}/{path.relative_to(SHARED)} {SHARED_SKIP}")
    return path


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): a worker a core, at most 4: each holds torch and a few tiny models, and the
    suite's longest tests bound it past that."""
    return max(1, min(os.cpu_count() or 1, 4))


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end runs first: in parallel they overlap the many short tests instead of trailing them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_shared"):
        for folder in mark.args:
            needs_shared(folder)


# The CI guard: tests skipped for missing real data (recorded from every report, so it also sees xdist workers').
_skipped_for_shared: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and SHARED_SKIP in str(report.longrepr):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped_for_shared.append(f"{report.nodeid}: {reason.removeprefix('Skipped: ')}")


def _shared_skips_fail() -> bool:
    """On CI (``CI=true``) with the real datasets on the machine, no test may skip for want of them: a folder is
    missing from the copy, or a test looks in the wrong place."""
    on_ci = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
    return bool(_skipped_for_shared) and on_ci and (SHARED_DEFAULT.is_dir() or SHARED.is_dir())


def pytest_sessionfinish(session, exitstatus):
    if _shared_skips_fail() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _shared_skips_fail():
        terminalreporter.section("real data skipped on CI", red=True, bold=True)
        where = SHARED_DEFAULT if SHARED_DEFAULT.is_dir() else SHARED
        terminalreporter.write_line(f"CI=true and the real datasets are on this machine ({where}), yet "
                                    f"{len(_skipped_for_shared)} test(s) skipped for want of them: the run fails.",
                                    red=True)
        for line in _skipped_for_shared:
            terminalreporter.write_line(f"  {line}")


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> str:
    """A tiny BERT saved like a hub checkpoint: loading it goes through from_pretrained (eval mode and all)."""
    from transformers import AutoConfig, AutoModel

    from lightning_ft.backbones import load_tokenizer, resolve_name

    path = tmp_path_factory.mktemp("tiny_pretrained")
    config = AutoConfig.from_pretrained(resolve_name(MINILM), **TINY)
    AutoModel.from_config(config).save_pretrained(path)
    load_tokenizer(MINILM).save_pretrained(path)
    return str(path)


SENTIMENT_WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull", "film", "plot", "actor", "scene"]


def random_sentences(folder: Path, sizes: dict[str, int], words: list[str] = SENTIMENT_WORDS, longest: int = 12
                     ) -> Path:
    """``<split>.tsv`` files of random sentences (3 to ``longest`` of ``words``) with a 0/1 label, as many rows as
    ``sizes`` gives each split; seeded, so every run writes the same ones."""
    import random

    rng = random.Random(0)
    for split, rows in sizes.items():
        lines = ["sentence\tlabel"] + [" ".join(rng.choices(words, k=rng.randint(3, longest))) +
                                       f"\t{rng.randint(0, 1)}" for _ in range(rows)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _rank_loop(rank: int, port: int, inbox, outbox) -> None:
    """One rank of the pool: joins the gloo group once, then runs each ``(worker, args)`` it is sent, until
    ``_TwoRanks.close`` kills it (a rank may be stuck in a collective, so it is never asked to stop)."""
    import traceback

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    while True:
        worker, args = inbox.get()
        try:
            outbox.put((rank, True, worker(rank, *args)))
        except BaseException:  # sent back whole, so the test shows the rank's own traceback
            outbox.put((rank, False, traceback.format_exc()))


class _TwoRanks:
    """Two gloo processes, started once per test process and reused: a spawn costs each test 6 s alone and 15-20 s
    beside the other xdist worker (the children import torch, transformers and the test module)."""

    def __init__(self) -> None:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        context = mp.get_context("spawn")
        self.inboxes, self.outbox = [context.Queue(), context.Queue()], context.Queue()
        self.processes = [context.Process(target=_rank_loop, args=(rank, port, self.inboxes[rank], self.outbox),
                                          daemon=True) for rank in range(2)]
        for process in self.processes:
            process.start()

    def run(self, worker, args: tuple) -> dict:
        for inbox in self.inboxes:
            inbox.put((worker, args))
        results = {}
        for _ in range(2):
            rank, ok, value = self._next_result()
            if not ok:  # raised at once: its partner may wait in a collective for good (on_two_ranks kills both)
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
        return results

    def _next_result(self, seconds: float = 300) -> tuple:
        import queue
        import time

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                return self.outbox.get(timeout=1)
            except queue.Empty:
                if dead := [p.exitcode for p in self.processes if not p.is_alive()]:
                    raise RuntimeError(f"a rank process died (exit code {dead[0]})") from None
        raise TimeoutError(f"the two ranks gave no result in {seconds} s")

    def close(self) -> None:
        for process in self.processes:
            process.kill()


_two_ranks: _TwoRanks | None = None


def on_two_ranks(worker, *args) -> dict:
    """``worker(rank, *args)`` on 2 gloo processes (a real DDP process group); its return value by rank.
    ``worker`` must be a module-level function, so the processes can import it. A worker that fails on either
    rank raises here with its traceback, and the next call starts two fresh processes."""
    global _two_ranks
    if _two_ranks is None:
        _two_ranks = _TwoRanks()
        atexit.register(_two_ranks.close)
    try:
        return _two_ranks.run(worker, args)
    except BaseException:
        _two_ranks.close()
        _two_ranks = None
        raise
