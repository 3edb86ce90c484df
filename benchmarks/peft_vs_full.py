"""LoRA against full fine-tuning, and lightning_ft's LoRA against the Hugging Face Trainer with the same peft config.

MiniLM on SST-2 (the first ``--train-rows`` train rows) and on CoNLL-2003 NER (``--conll-rows``; 0, the default: all
14,041 sentences), 1 epoch, ``--precision`` (bf16 by default): lightning_ft full fine-tuning, lightning_ft
``peft=lora`` at r 8 and r 16, and the HF Trainer (compare_hf.py's run_glue / run_ner side, its data and metric) with
peft's ``get_peft_model`` and the very ``LoraConfig`` lightning_ft builds (its target layers, alpha 16, dropout 0.05,
the classifier in ``modules_to_save``); ``--tasks`` picks them (SST-2 alone by default). Each side trains at each
learning rate of ``--lrs`` and is reported at its best; each run is a fresh child process, so its peak resident
memory is its own. Checkpoint size: what a run saves to resume
(lightning_ft: its checkpoint, weights that train and their optimizer state; the HF Trainer: ``save_model``, the adapter
and head).

SmolLM2-135M-Instruct (``backbone=smollm2_gguf``) as a causal LM on Tiny Shakespeare: full fine-tuning against
LoRA, with and without gradient checkpointing, the same ``--lm-steps`` steps of 4 blocks of ``--lm-block-size``
tokens: train tokens/s, peak resident memory, validation perplexity. The block size sets how much of the peak is
activations (which LoRA does not shrink) rather than gradients and optimizer state (which it does). A side named
``<side>_chunked`` is that side with ``task.chunked_loss=true``: the loss without the full logits; a LoRA side named
``<side>_bf16_frozen`` keeps the weights that do not train in bf16 (``backbone.frozen_dtype=bfloat16``).

    python benchmarks/peft_vs_full.py --train-rows 4000 --lrs 5e-5 5e-4 --lm-steps 30
    python benchmarks/peft_vs_full.py --tasks conll --skip lm --lrs 5e-5 1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import (  # noqa: E402
    PRECISIONS,
    ROOT,
    append_report,
    lightning_ft_module,
    lightning_timer,
    report_heading,
    summary_line,
    timed_trainer,
)

DATA = ROOT.parent / "shared" / "data"
# The fine-tuning tasks compared: their name in the report, the dev metric (compare_hf.TASKS names its key) and unit.
TASK_ROWS = {"sst2": ("SST-2", "dev accuracy", "samples/s"), "conll": ("CoNLL-2003 NER", "dev F1", "sentences/s")}
BATCH, MAX_LEN = 32, 128
SIDES = {"full": [], "lora_r8": ["peft=lora", "peft.r=8"], "lora_r16": ["peft=lora", "peft.r=16"],
         # the language-model comparison's extra side: peft skips the adapters' dropout (and its copy of each
         # adapted layer's input, kept for the backward pass) when it is 0
         "lora_r8_no_dropout": ["peft=lora", "peft.r=8", "peft.dropout=0.0"]}
# The LoRA sides with their frozen weights stored in bf16 (backbone.frozen_dtype; needs --precision bf16).
SIDES |= {f"{side}_bf16_frozen": [*overrides, "backbone.frozen_dtype=bfloat16"]
          for side, overrides in list(SIDES.items()) if side.startswith("lora")}
# The same sides trained on the chunked loss (no full logits) rather than the model's own (the default).
SIDES |= {f"{side}_chunked": [*overrides, "task.chunked_loss=true"] for side, overrides in list(SIDES.items())}
TASK_SIDES = ("full", "lora_r8", "lora_r16", "hf_peft_r8")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def lightning_ft_run(task: str, side: str, lr: float, rows: int, seed: int, precision: str) -> dict:
    import pytorch_lightning as pl
    from compare_hf import TASKS

    data = {"sst2": ["dataset=sst2", f"dataset.data_dir={DATA / 'glue_sst2'}"],
            "conll": ["task=ner", "dataset=conll2003", f"dataset.data_dir={DATA / 'conll2003'}"]}[task]
    overrides = [*data, f"dataset.batch_size={BATCH}", f"dataset.max_length={MAX_LEN}", f"optim.lr={lr}",
                 f"optim.weight_decay={TASKS[task]['weight_decay']}", "scheduler.warmup_ratio=0.0", *SIDES[side]]
    if rows:
        overrides.append(f"dataset.max_train_examples={rows}")
    module, datamodule = lightning_ft_module(overrides, seed)
    timer = lightning_timer()
    trainer = timed_trainer(timer, max_epochs=1, precision=precision)
    trainer.fit(module, datamodule=datamodule)
    with tempfile.TemporaryDirectory() as folder:
        trainer.save_checkpoint(Path(folder) / "run.ckpt")
        size = (Path(folder) / "run.ckpt").stat().st_size
    evaluator = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                           enable_model_summary=False)
    scores = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
    trainable, total = module.trainable_parameters
    return {"metric": scores[f"val/{TASKS[task]['metric']}"], "samples_per_sec": timer.samples / timer.seconds,
            "checkpoint_mb": size / 2**20, "trainable": trainable, "total": total}


def hf_peft_run(task: str, r: int, lr: float, rows: int, seed: int, precision: str) -> dict:
    from compare_hf import hf_trainer_run
    from peft import LoraConfig, get_peft_model

    from lightning_ft.backbones import head_modules
    from lightning_ft.peft import target_pattern

    def lora(model):  # the LoraConfig lightning_ft builds for this model
        config = LoraConfig(r=r, lora_alpha=16, lora_dropout=0.05, target_modules=target_pattern(model, None),
                            modules_to_save=head_modules(model) or None)
        return get_peft_model(model, config)

    run = hf_trainer_run(task, 1, rows or None, precision, seed, lr=lr, wrap=lora, checkpoint=True)
    return {"metric": run["metric"], "samples_per_sec": run["samples"] / run["seconds"],
            "checkpoint_mb": run["checkpoint_mb"]}


def lightning_ft_lm(side: str, steps: int, block_size: int, checkpointing: bool, seed: int, precision: str) -> dict:
    import pytorch_lightning as pl

    overrides = ["task=clm", "backbone=smollm2_gguf", "dataset=tiny_shakespeare",
                 f"dataset.data_dir={DATA / 'tiny_shakespeare'}", "dataset.data_files.train=input.txt",
                 "dataset.val_fraction=0.1", f"dataset.block_size={block_size}", "dataset.batch_size=4",
                 "optim.lr=" + ("1e-4" if side.startswith("full") else "5e-4"),
                 f"backbone.gradient_checkpointing={checkpointing}", *SIDES[side]]
    module, datamodule = lightning_ft_module(overrides, seed)
    loaded_mb = peak_mb()  # the peak so far: loading (the GGUF file dequantised) and tokenizing
    timer = lightning_timer()
    trainer = timed_trainer(timer, max_steps=steps, precision=precision)
    trainer.fit(module, datamodule=datamodule)
    evaluator = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                           enable_model_summary=False, limit_val_batches=20)
    scores = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
    return {"tokens_per_sec": timer.real_tokens / timer.seconds, "perplexity": scores.get("val/perplexity"),
            "loss": scores["val/loss"], "loaded_mb": loaded_mb}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    kind, side = args.child.split(":")
    precision = PRECISIONS[args.precision]
    if kind in TASK_ROWS:
        rows = args.train_rows if kind == "sst2" else args.conll_rows
        result = (hf_peft_run(kind, int(side.removeprefix("hf_peft_r")), args.lr, rows, args.seed, precision)
                  if side.startswith("hf_peft") else lightning_ft_run(kind, side, args.lr, rows, args.seed, precision))
    else:
        result = lightning_ft_lm(side, args.lm_steps, args.lm_block_size, args.checkpointing, args.seed, precision)
    result["peak_mb"] = peak_mb()
    Path(args.out).write_text(json.dumps(result))


def spawn(what: str, args: argparse.Namespace, **extra: object) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, __file__, "--child", what, "--out", out, "--threads", str(args.threads),
               "--precision", args.precision,
               "--train-rows", str(args.train_rows), "--conll-rows", str(args.conll_rows),
               "--lm-steps", str(args.lm_steps), "--lm-block-size",
               str(args.lm_block_size), "--seed", str(args.seed)]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(command, check=True)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    print(what, extra, result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sst2"], choices=list(TASK_ROWS))
    parser.add_argument("--train-rows", type=int, default=4000, help="SST-2 training rows")
    parser.add_argument("--conll-rows", type=int, default=0, help="CoNLL-2003 training sentences (0: all)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 5e-4])
    parser.add_argument("--lm-steps", type=int, default=30)
    parser.add_argument("--lm-block-size", type=int, default=256, help="tokens per block, 4 blocks a step")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=list(PRECISIONS),
                        help="every run's; bf16 only where it is native (AVX512-BF16 or AMX): elsewhere it is "
                             "emulated, several times slower")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sst2", "lm"],
                        help="sst2: SST-2 left out of --tasks; lm: no SmolLM2 comparison")
    parser.add_argument("--lm-sides", nargs="+", default=["full", "lora_r8", "lora_r8_no_dropout"],
                        choices=list(SIDES), help="the language-model comparison's sides; the first is the reference")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=lambda v: v == "True", default=False, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    lines, summaries = [], []
    for task in [task for task in args.tasks if task not in args.skip]:
        runs = {side: {lr: spawn(f"{task}:{side}", args, lr=lr) for lr in args.lrs} for side in TASK_SIDES}
        best = {side: max(by_lr.items(), key=lambda item: item[1]["metric"]) for side, by_lr in runs.items()}
        full_ckpt = best["full"][1]["checkpoint_mb"]
        hf_rate = best["hf_peft_r8"][1]["samples_per_sec"]
        rows = args.train_rows if task == "sst2" else args.conll_rows
        name, metric, unit = TASK_ROWS[task]
        amount = f"the first {rows} train rows" if rows else "all train rows"
        lines += [f"\n{name}, MiniLM, {amount}, 1 epoch, batch {BATCH}, {args.precision}, seed {args.seed}; {metric} "
                  f"at each side's best learning rate of {args.lrs}:\n",
                  f"| side | best lr | {metric} | {metric} at each lr | train {unit} | vs HF + peft r8 | "
                  "peak resident MB | checkpoint MB | vs full | trainable share |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for side, (lr, r) in best.items():
            share = f"{r['trainable'] / r['total']:.2%}" if "trainable" in r else ""
            lines.append(f"| {side} | {lr:g} | {r['metric']:.4f} | "
                         f"{', '.join(format(runs[side][x]['metric'], '.4f') for x in args.lrs)} | "
                         f"{r['samples_per_sec']:.1f} | {r['samples_per_sec'] / hf_rate:.2f} | {r['peak_mb']:.0f} | "
                         f"{r['checkpoint_mb']:.1f} | {r['checkpoint_mb'] / full_ckpt:.1%} | {share} |")
            summaries.append(summary_line(
                f"LoRA vs full, {name}, MiniLM, {rows or 'all'} rows, 1 epoch, {args.precision}", side, "hf_peft_r8",
                r["samples_per_sec"], unit, r["samples_per_sec"] / hf_rate,
                f"{metric} {r['metric']:.4f} at its best lr {lr:g} of {len(args.lrs)}; checkpoint "
                f"{r['checkpoint_mb'] / full_ckpt:.1%} of full; peak {r['peak_mb']:.0f} MB", 1))
    if "lm" not in args.skip:
        reference = args.lm_sides[0]
        lm = {(side, ckpt): spawn(f"lm:{side}", args, checkpointing=ckpt)
              for side in args.lm_sides for ckpt in (False, True)}
        lines += [f"\nSmolLM2-135M-Instruct (GGUF), causal LM on Tiny Shakespeare, {args.lm_steps} steps of 4 blocks "
                  f"of {args.lm_block_size} tokens, {args.precision} (lr 1e-4 full, 5e-4 LoRA); validation over 20 "
                  "batches. Peak after loading: the process's peak before training starts (model, data):\n",
                  "| side | gradient checkpointing | train tokens/s | peak resident MB | peak after loading MB | "
                  f"vs {reference}, same checkpointing | validation perplexity |", "|---|---|---|---|---|---|---|"]
        for (side, ckpt), r in lm.items():
            ratio = r["peak_mb"] / lm[reference, ckpt]["peak_mb"]
            lines.append(f"| {side} | {ckpt} | {r['tokens_per_sec']:.0f} | {r['peak_mb']:.0f} | "
                         f"{r['loaded_mb']:.0f} | {ratio:.0%} | {r['perplexity']:.2f} |")
            summaries.append(summary_line(
                f"LoRA vs full, SmolLM2-135M CLM, {args.lm_steps} steps"
                + (f" of 4 x {args.lm_block_size} tokens" if args.lm_block_size != 256 else "") + f", {args.precision}"
                + (", gradient checkpointing" if ckpt else ""), side, reference, r["tokens_per_sec"], "tokens/s",
                r["tokens_per_sec"] / lm[reference, ckpt]["tokens_per_sec"],
                f"peak memory {ratio:.0%} of {reference}'s ({r['peak_mb']:.0f} MB); perplexity {r['perplexity']:.2f}",
                1))
    append_report(args.results, "\n".join([
        *report_heading("LoRA vs full fine-tuning, and vs the HF Trainer with the same peft config", __file__),
        "Each run a fresh child process (peak resident memory its own). peft_vs_full.py docstring: the sides.",
        *lines, "", *summaries, ""]))


if __name__ == "__main__":
    main()
