"""The work lightning_ft does not do: padding, re-tokenizing, slow start-up. Measured on SST-2 and CoNLL-2003.

1. Padding: the share of padded positions over one full training epoch (batch 32, max length 128), for shuffled
   batches (what the HF Trainer does by default), length-grouped batches (lightning_ft's default) and each with
   ``pad_to_multiple_of=8``. No model runs: only the batches are built.
2. Tokenized cache: ``prepare_data`` in a fresh process with an empty cache, then again in a second fresh process
   (a second identical run).
3. Start-up: ``python -m lightning_ft.train --help``, a mistyped config group, and the default command up to its
   first training step (``seconds_to_first_step`` from the run's metrics.json), medians of ``--repeats``.

    python benchmarks/data_and_startup.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, append_report, report_heading

DATA = ROOT.parent / "shared" / "data"
DATASETS = {
    "SST-2": ["dataset=sst2", f"dataset.data_dir={DATA / 'glue_sst2'}"],
    "CoNLL-2003": ["task=ner", "dataset=conll2003", f"dataset.data_dir={DATA / 'conll2003'}"],
}

PREPARE = """
import json, time
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning_ft.backbones import load_tokenizer
from lightning_ft.config import register_resolvers
from lightning_ft.paths import config_dir
register_resolvers()
with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
    cfg = compose("train", overrides={overrides!r} + ["run_dir=unused"])
dm = instantiate(cfg.dataset, tokenizer=load_tokenizer(**cfg.backbone), _convert_="all")
start = time.perf_counter()
dm.prepare_data()
print(json.dumps({{"seconds": time.perf_counter() - start, "tokenized": dm.examples_tokenized,
                  "tokenize_seconds": dm.tokenize_seconds}}))
"""


def padding_table(name: str, overrides: list[str]) -> list[str]:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_ft.backbones import load_tokenizer
    from lightning_ft.config import register_resolvers
    from lightning_ft.paths import config_dir

    register_resolvers()

    rows = []
    for grouped in (False, True):
        for multiple in (None, 8):
            extra = [f"dataset.group_by_length={grouped}", f"+dataset.pad_to_multiple_of={multiple or 'null'}"]
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose("train", overrides=[*overrides, *extra, "run_dir=unused"])
            dm = instantiate(cfg.dataset, tokenizer=load_tokenizer(**cfg.backbone), _convert_="all")
            dm.prepare_data()
            real = padded = batches = 0
            for batch in dm.train_dataloader():
                real += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
                batches += 1
            label = ("length-grouped (lightning_ft default)" if grouped else "shuffled (HF Trainer default)")
            rows.append(f"| {name} | {label} | {multiple or '-'} | {batches} | {real:,} | {padded:,} | "
                        f"{1 - real / padded:.1%} |")
    return rows


def cache_rows(name: str, overrides: list[str]) -> list[str]:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        script = PREPARE.format(overrides=overrides)
        runs = []
        for attempt in ("first run (empty cache)", "second identical run"):
            out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(f"| {name} | {attempt} | {result['tokenized']:,} | {result['tokenize_seconds']:.2f} | "
                        f"{result['seconds']:.2f} |")
    return runs


def timed(command: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def startup_rows(repeats: int) -> list[str]:
    python = sys.executable
    with tempfile.TemporaryDirectory() as work:
        help_s = [timed([python, "-m", "lightning_ft.train", "--help"], work) for _ in range(repeats)]
        error_s = [timed([python, "-m", "lightning_ft.train", "dataset=sst3"], work) for _ in range(repeats)]
        first_step = []
        for i in range(repeats):
            run_dir = f"{work}/run{i}"
            subprocess.run([python, "-m", "lightning_ft.train", f"run_dir={run_dir}", "+trainer.max_steps=2",
                            "trainer.max_epochs=1", "test=false", "export=false", "validate_before=false",
                            "trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=1"],
                           cwd=work, capture_output=True, check=True)
            metrics = json.loads(Path(run_dir, "metrics.json").read_text())
            first_step.append(metrics["throughput"]["seconds_to_first_step"])
    return [
        f"| `python -m lightning_ft.train --help` (whole process) | {statistics.median(help_s):.2f} |",
        f"| `python -m lightning_ft.train dataset=sst3` (error listing the options; whole process) | "
        f"{statistics.median(error_s):.2f} |",
        "| `python -m lightning_ft.train` (default: MiniLM, embedded SST-2 sample, cache warm): import of "
        f"lightning_ft to the first training step | {statistics.median(first_step):.2f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()

    padding = [row for name, overrides in DATASETS.items() for row in padding_table(name, overrides)]
    cache = [row for name, overrides in DATASETS.items() for row in cache_rows(name, overrides)]
    startup = startup_rows(args.repeats)
    report = "\n".join([
        *report_heading("Padding, tokenized cache and start-up", __file__),
        "",
        "Padding over one full training epoch, batch 32, max length 128 (MiniLM's tokenizer):\n",
        "| data | batching | pad_to_multiple_of | batches | real tokens | padded positions | padding |",
        "|---|---|---|---|---|---|---|",
        *padding,
        "\nPreparing all splits (`prepare_data`: read the files, check them, tokenize or read the tokenized cache), "
        "each run in a fresh process, sharing one datasets cache:\n",
        "| data | run | rows tokenized | seconds tokenizing (or reading the cache) | seconds in all |",
        "|---|---|---|---|---|",
        *cache,
        f"\nStart-up, medians of {args.repeats}:\n",
        "| what | seconds |",
        "|---|---|",
        *startup,
        "",
    ])
    append_report(args.results, report)


if __name__ == "__main__":
    main()
