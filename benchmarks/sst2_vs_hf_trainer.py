"""lightning_ft vs the Hugging Face Trainer: MiniLM fine-tuned on SST-2, same work, one process, alternating runs.

Both get the same model directory, training subset, max length 128, batch 32, AdamW (lr, weight decay, no decay on
biases/LayerNorm), linear schedule, clipping at 1.0, number of steps and 2 threads. Train throughput is timed the
same way for both (train start to train end, no evaluation inside); then both evaluate on the full SST-2 dev split.

    python benchmarks/sst2_vs_hf_trainer.py --steps 150 --repeats 2 --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    MINILM,
    ROOT,
    append_report,
    environment,
    hf_timer,
    lightning_ft_module,
    lightning_timer,
    timed_trainer,
)

DATA = ROOT.parent / "shared" / "data" / "glue_sst2"
LR, BATCH, MAX_LEN, WEIGHT_DECAY = 5e-5, 32, 128, 0.01


def run_lightning_ft(steps: int, train_examples: int, precision: str, seed: int, grouped: bool = False) -> dict:
    overrides = [
        "dataset=sst2", f"dataset.data_dir={DATA}", f"+dataset.max_train_examples={train_examples}",
        f"dataset.batch_size={BATCH}", f"dataset.max_length={MAX_LEN}", f"optim.lr={LR}",
        f"optim.weight_decay={WEIGHT_DECAY}", "scheduler.warmup_ratio=0.0", f"dataset.group_by_length={grouped}",
    ]
    module, datamodule = lightning_ft_module(overrides, seed)

    timer = lightning_timer()
    trainer = timed_trainer(timer, max_steps=steps, max_epochs=-1,
                            precision="bf16-mixed" if precision == "bf16" else "32-true")
    trainer.fit(module, datamodule=datamodule)
    accuracy = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/accuracy"]
    return {"seconds": timer.seconds, "samples": steps * BATCH, "tokens": timer.tokens,
            "real_tokens": timer.real_tokens, "accuracy": accuracy}


def run_hf_trainer(steps: int, train_examples: int, precision: str, seed: int) -> dict:
    import datasets
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from lightning_ft.backbones import resolve_name

    model_dir = resolve_name(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    read = {"delimiter": "\t", "quoting": 3}
    train = datasets.load_dataset("csv", data_files=str(DATA / "train.tsv"), split="train", **read)
    dev = datasets.load_dataset("csv", data_files=str(DATA / "dev.tsv"), split="train", **read)
    train = train.select(range(train_examples))

    def encode(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=MAX_LEN)

    train = train.map(encode, batched=True, remove_columns=["sentence"])
    dev = dev.map(encode, batched=True, remove_columns=["sentence"])
    set_seed(seed)  # as lightning_ft seeds before building its model: the same classifier-head initialisation
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

    padding = DataCollatorWithPadding(tokenizer)
    counts = {"tokens": 0, "real_tokens": 0}
    timer = hf_timer(counts)

    def collate(features):  # counts what enters the model; reset when training starts
        batch = padding(features)
        counts["tokens"] += batch["input_ids"].numel()
        counts["real_tokens"] += int(batch["attention_mask"].sum())
        return batch

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=2 * BATCH,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=1.0, max_steps=steps,
            lr_scheduler_type="linear", warmup_steps=0, logging_strategy="no", save_strategy="no",
            eval_strategy="no", report_to=[], use_cpu=True, seed=seed, dataloader_num_workers=0,
            disable_tqdm=True, bf16=precision == "bf16",
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate,
                          callbacks=[timer])
        trainer.train()
        predictions = trainer.predict(dev)
    accuracy = float((np.argmax(predictions.predictions, -1) == predictions.label_ids).mean())
    return {"seconds": timer.seconds, "samples": steps * BATCH, **timer.counts, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed runs of both first (kernel caches)")
    parser.add_argument("--grouped", action="store_true", help="also time lightning_ft with group_by_length=true")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = {"lightning_ft": run_lightning_ft, "hf_trainer": run_hf_trainer}
    if args.grouped:
        variants["lightning_ft grouped"] = functools.partial(run_lightning_ft, grouped=True)
    rows = []
    for precision in args.precision:
        if args.warmup_steps:  # the first run in a process pays one-time costs (oneDNN kernel caches, allocator)
            for fn in variants.values():
                fn(args.warmup_steps, 1000, precision, seed=0)
        runs = {name: [] for name in variants}
        for repeat in range(args.repeats):  # alternate, so drift in machine speed hits all alike
            for name, fn in variants.items():
                result = fn(args.steps, args.train_examples, precision, seed=42 + repeat)
                runs[name].append(result)
                print(f"[{precision} seed {42 + repeat}] {name}: {result['samples'] / result['seconds']:.1f} samples/s,"
                      f" {result['tokens'] / result['seconds']:.0f} padded tokens/s, padding "
                      f"{1 - result['real_tokens'] / result['tokens']:.1%}, dev accuracy {result['accuracy']:.4f}",
                      flush=True)
        hf = runs["hf_trainer"]
        hf_samples = statistics.median(r["samples"] / r["seconds"] for r in hf)
        hf_tokens = statistics.median(r["tokens"] / r["seconds"] for r in hf)
        for name in variants:
            mine = runs[name]
            samples = statistics.median(r["samples"] / r["seconds"] for r in mine)
            tokens = statistics.median(r["tokens"] / r["seconds"] for r in mine)
            padding = statistics.median(1 - r["real_tokens"] / r["tokens"] for r in mine)
            accuracy = statistics.median(r["accuracy"] for r in mine)
            rows.append(f"| {precision} | {name} | {samples:.1f} | **{samples / hf_samples:.3f}** | {tokens:.0f} | "
                        f"{tokens / hf_tokens:.3f} | {padding:.1%} | {accuracy:.4f} |")

    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute()
                                    else sys.argv[0], *sys.argv[1:]])
    report = "\n".join([
        f"\n## SST-2, MiniLM-L6: lightning_ft vs Hugging Face Trainer ({datetime.date.today()})\n",
        f"Command: `{command}`  ",
        f"Machine: {environment()}  ",
        f"Work: {args.steps} steps x batch {BATCH} from the first {args.train_examples} GLUE SST-2 train rows, max "
        f"length {MAX_LEN}, lr {LR}, linear decay, clip 1.0, fused AdamW in both; dev = full GLUE SST-2 dev (872). "
        f"Untimed warm-up runs of each first. Medians of {args.repeats} alternating runs each "
        f"(seeds 42..{41 + args.repeats}, the same seed for both "
        "sides of a pair). Both shuffle, so batch order and hence padding differ between the sides: padded tokens/s "
        "is the rate of work, samples/s also carries padding luck.\n",
        "| precision | run | train samples/s | ratio to HF | padded tokens/s | ratio to HF | padding | dev accuracy |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    append_report(args.results, report)


if __name__ == "__main__":
    main()
