"""lightning_ft vs the Hugging Face Trainer on the same work: MiniLM fine-tuned on SST-2 and on CoNLL-2003 NER.

One process, alternating runs (the same seed for both sides of a pair), medians. Both sides get the same model
directory, training rows, epochs, max length 128, batch 32, lr, linear decay without warmup, clipping at 1.0, fused
AdamW, precision and 2 threads. Each side runs as its users would run it by default: lightning_ft with its shipped
dataset configs (packed batches: each batch's examples, a random draw, packed into rows), the HF Trainer with its
defaults (shuffled batches; the run_glue.py and run_ner.py preprocessing). ``--sides`` adds lightning_ft with padded
shuffled batches (the HF Trainer's), with length-grouped batches, packing required, token-budget batches
(``dataset.max_tokens``) or torch.compile, and the HF Trainer with its
own length grouping (``train_sampling_strategy="group_by_length"``, its fastest setting). Train throughput is timed
from train start to train end with no evaluation inside; then both are scored on the dev split.

    python benchmarks/compare_hf.py --task sst2 conll --precision bf16 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    MINILM,
    PRECISIONS,
    ROOT,
    append_report,
    hf_timer,
    lightning_ft_module,
    lightning_timer,
    metric_words,
    paired_table,
    report_heading,
    summary_line,
    timed_trainer,
)

DATA = ROOT.parent / "shared" / "data"
BATCH, MAX_LEN = 32, 128
# lr and weight decay: the HF examples' defaults for each task (run_glue.py README: 2e-5..5e-5; run_ner.py: 5e-5).
TASKS = {
    "sst2": {"lr": 5e-5, "weight_decay": 0.01, "metric": "accuracy", "rows": 67349, "max_tokens": 512,
             "title": "SST-2 (GLUE), dev accuracy on all 872 dev sentences", "short": "SST-2, MiniLM"},
    "conll": {"lr": 5e-5, "weight_decay": 0.0, "metric": "f1", "rows": 14041, "max_tokens": 1024,
              "title": "CoNLL-2003 NER, entity-level micro F1 on all 3,250 dev sentences",
              "short": "CoNLL-2003 NER, MiniLM"},
}
SIDES = ("hf_trainer", "lightning_ft", "lightning_ft_shuffled", "lightning_ft_grouped", "lightning_ft_packed",
         "lightning_ft_compiled", "lightning_ft_max_tokens", "hf_trainer_grouped")
# What each lightning_ft side changes in its shipped dataset config (packed, where the backbone allows, for both tasks).
BATCHING = {"lightning_ft": [], "lightning_ft_packed": ["dataset.packing=true"],
            "lightning_ft_shuffled": ["dataset.packing=false", "dataset.group_by_length=false"],
            "lightning_ft_grouped": ["dataset.packing=false", "dataset.group_by_length=true"],
            "lightning_ft_compiled": ["compile=true"],  # the shipped batches, the model through torch.compile
            # token-budget batches of about the tokens 32 rows hold on average, plus the longest row (the task's
            # "max_tokens"): about as many steps as batches of 32
            "lightning_ft_max_tokens": ["dataset.max_tokens={max_tokens}"]}


def lightning_ft_run(task: str, epochs: int, train_rows: int | None, precision: str, seed: int,
                     batching: list[str] = ()) -> dict:
    from lightning_ft.throughput import ThroughputMonitor

    spec = TASKS[task]
    data = {"sst2": ["dataset=sst2", f"dataset.data_dir={DATA / 'glue_sst2'}"],
            "conll": ["task=ner", "dataset=conll2003", f"dataset.data_dir={DATA / 'conll2003'}"]}[task]
    overrides = [*data, f"dataset.batch_size={BATCH}", f"dataset.max_length={MAX_LEN}", f"optim.lr={spec['lr']}",
                 f"optim.weight_decay={spec['weight_decay']}", "scheduler.warmup_ratio=0.0"]
    compiled = "compile=true" in batching
    overrides += [b.format(**spec) for b in batching if b != "compile=true"]  # compile: train.py's step, below
    if train_rows:
        overrides.append(f"dataset.max_train_examples={train_rows}")
    module, datamodule = lightning_ft_module(overrides, seed)
    if compiled:
        from lightning_ft.compiling import compile_model

        compiled = compile_model(module.model, "cpu")
    import pytorch_lightning as pl

    timer, monitor = lightning_timer(), ThroughputMonitor()
    precision = PRECISIONS[precision]
    trainer = timed_trainer(timer, max_epochs=epochs, precision=precision)
    trainer.callbacks.append(monitor)
    trainer.fit(module, datamodule=datamodule)
    evaluator = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                           enable_model_summary=False)
    scores = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
    return {"seconds": timer.seconds, "samples": timer.samples, "tokens": timer.tokens,
            "real_tokens": timer.real_tokens, "metric": scores[f"val/{spec['metric']}"],
            "data_wait": monitor.summary["data_wait"],
            **({"compile_graphs": compiled.graphs, "compile_seconds": compiled.seconds} if compiled else {})}


def _sst2_hf(tokenizer, train_rows: int | None):
    import datasets

    read = {"delimiter": "\t", "quoting": 3}
    train = datasets.load_dataset("csv", data_files=str(DATA / "glue_sst2" / "train.tsv"), split="train", **read)
    dev = datasets.load_dataset("csv", data_files=str(DATA / "glue_sst2" / "dev.tsv"), split="train", **read)
    if train_rows:
        train = train.select(range(train_rows))

    def encode(batch):  # run_glue.py's preprocess_function
        return tokenizer(batch["sentence"], truncation=True, max_length=MAX_LEN)

    train = train.map(encode, batched=True, remove_columns=["sentence"])
    dev = dev.map(encode, batched=True, remove_columns=["sentence"])

    def score(predictions) -> float:
        return float((np.argmax(predictions.predictions, -1) == predictions.label_ids).mean())

    return train, dev, {"num_labels": 2}, None, score


def _conll_hf(tokenizer, train_rows: int | None):
    import datasets
    from seqeval.metrics import f1_score
    from transformers import DataCollatorForTokenClassification

    from lightning_ft.data.conll import read_conll

    splits = {}
    for split, name in [("train", "train.txt"), ("dev", "valid.txt")]:
        rows = read_conll(DATA / "conll2003" / name)
        splits[split] = datasets.Dataset.from_dict({"tokens": rows["tokens"], "ner_tags": rows["ner_tags"]})
    if train_rows:
        splits["train"] = splits["train"].select(range(train_rows))
    label_list = sorted({t for row in splits["train"]["ner_tags"] for t in row})  # run_ner.py: sorted labels
    label_to_id = {label: i for i, label in enumerate(label_list)}

    def encode(batch):  # run_ner.py's tokenize_and_align_labels with label_all_tokens=False
        encoding = tokenizer(batch["tokens"], truncation=True, max_length=MAX_LEN, is_split_into_words=True)
        labels = []
        for i, tags in enumerate(batch["ner_tags"]):
            previous, row = None, []
            for word in encoding.word_ids(batch_index=i):
                row.append(-100 if word is None or word == previous else label_to_id[tags[word]])
                previous = word
            labels.append(row)
        encoding["labels"] = labels
        return encoding

    train = splits["train"].map(encode, batched=True, remove_columns=["tokens", "ner_tags"])
    dev = splits["dev"].map(encode, batched=True, remove_columns=["tokens", "ner_tags"])

    def score(predictions) -> float:  # run_ner.py's compute_metrics: seqeval over first sub-tokens
        predicted = np.argmax(predictions.predictions, axis=2)
        gold, guess = [], []
        for p_row, l_row in zip(predicted, predictions.label_ids):
            gold.append([label_list[label] for label in l_row if label != -100])
            guess.append([label_list[p] for p, label in zip(p_row, l_row) if label != -100])
        return f1_score(gold, guess)

    head = {"num_labels": len(label_list), "id2label": dict(enumerate(label_list)), "label2id": label_to_id}
    return train, dev, head, DataCollatorForTokenClassification(tokenizer), score


def hf_trainer_run(task: str, epochs: int, train_rows: int | None, precision: str, seed: int,
                   grouped: bool = False, lr: float | None = None, wrap=None, checkpoint: bool = False) -> dict:
    """run_glue / run_ner written out with the Trainer. ``wrap`` turns the model into the one trained (peft_vs_full:
    peft's ``get_peft_model``); ``lr`` overrides the task's; ``checkpoint`` adds the size of ``save_model``'s files."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from lightning_ft.backbones import resolve_name

    spec = TASKS[task]
    model_dir = resolve_name(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, dev, head, collator, score = (_sst2_hf if task == "sst2" else _conll_hf)(tokenizer, train_rows)
    set_seed(seed)  # as lightning_ft seeds before building its model
    auto = AutoModelForSequenceClassification if task == "sst2" else AutoModelForTokenClassification
    model = auto.from_pretrained(model_dir, **head)
    if wrap is not None:
        model = wrap(model)

    padding = collator or DataCollatorWithPadding(tokenizer)
    counts = {"samples": 0, "tokens": 0, "real_tokens": 0}
    timer = hf_timer(counts)

    def collate(features):  # counts what enters the model; zeroed when training starts
        batch = padding(features)
        counts["samples"] += len(features)
        counts["tokens"] += batch["input_ids"].numel()
        counts["real_tokens"] += int(batch["attention_mask"].sum())
        return batch

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=2 * BATCH,
            learning_rate=lr or spec["lr"], weight_decay=spec["weight_decay"], max_grad_norm=1.0,
            num_train_epochs=epochs, lr_scheduler_type="linear", warmup_steps=0, logging_strategy="no",
            save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=seed, dataloader_num_workers=0,
            disable_tqdm=True, bf16=precision.startswith("bf16"),  # "bf16" here, "bf16-mixed" from peft_vs_full
            train_sampling_strategy="group_by_length" if grouped else "random",
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[timer])
        trainer.train()
        result = {"seconds": timer.seconds, **timer.counts, "metric": score(trainer.predict(dev))}
        if checkpoint:
            trainer.save_model(out)
            result["checkpoint_mb"] = sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file()) / 2**20
    return result


def run(side: str, *args, **kwargs) -> dict:
    if side.startswith("hf_trainer"):
        return hf_trainer_run(*args, grouped=side == "hf_trainer_grouped", **kwargs)
    return lightning_ft_run(*args, batching=BATCHING[side], **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", default=["sst2", "conll"], choices=list(TASKS))
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--sides", default="hf_trainer,lightning_ft",
                        help=f"comma-separated, from {', '.join(SIDES)}; the first is the reference")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-rows", type=int, nargs="+", default=None,
                        help="first N training rows, one value per --task (0 or default: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="seeds per side (--first-seed, the next, ...), the same for every side")
    parser.add_argument("--first-seed", type=int, default=42, help="the first run's seed (more seeds: a new range)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        parser.error(f"unknown side {unknown[0]!r}: use {', '.join(SIDES)}")
    rows_for = {task: n or None for task, n in zip(args.task, args.train_rows or [0] * len(args.task))}

    seeds = range(args.first_seed, args.first_seed + args.repeats)
    sections = []
    for task in args.task:
        table, runs_by, summaries = [], {}, []
        size = f"{rows_for[task]} rows" if rows_for[task] else "all train"
        for precision in args.precision:
            for side in sides:  # untimed: the first run of each in a process pays one-time costs (oneDNN kernels)
                run(side, task, 1, 320, precision, seed=0)
            runs = runs_by[precision] = {side: [] for side in sides}
            for seed in seeds:  # alternating, so drift in machine speed hits all sides alike
                for side in sides:
                    r = run(side, task, args.epochs, rows_for[task], precision, seed=seed)
                    runs[side].append(r)
                    print(f"[{task} {precision} seed {seed}] {side}: {r['samples'] / r['seconds']:.1f} "
                          f"samples/s, padding {1 - r['real_tokens'] / r['tokens']:.1%}, dev {r['metric']:.4f}"
                          + (f", compiled {r['compile_graphs']} graphs in {r['compile_seconds']:.1f} s"
                             if "compile_graphs" in r else ""), flush=True)
            reference = statistics.median(r["samples"] / r["seconds"] for r in runs[sides[0]])
            for side in sides:
                rate = statistics.median(r["samples"] / r["seconds"] for r in runs[side])
                padded = statistics.median(r["tokens"] / r["seconds"] for r in runs[side])
                padding = statistics.median(1 - r["real_tokens"] / r["tokens"] for r in runs[side])
                metrics = [r["metric"] for r in runs[side]]
                wait = (f"{statistics.median(r['data_wait'] for r in runs[side]):.1%}"
                        if "data_wait" in runs[side][0] else "")
                table.append(
                    f"| {precision} | {side} | {rate:.1f} | "
                    f"**{rate / reference:.2f}** | {padded:.0f} | {padding:.1%} | {wait} | "
                    f"{statistics.median(r['seconds'] for r in runs[side]) / 60:.1f} | {statistics.median(metrics):.4f}"
                    f" | {', '.join(f'{m:.4f}' for m in metrics)} |")
                base = None if side == sides[0] else [r["metric"] for r in runs[sides[0]]]
                summaries.append(summary_line(
                    f"{TASKS[task]['short']}, {size}, {args.epochs} epoch(s), {precision}", side, sides[0],
                    rate, "samples/s", rate / reference,
                    metric_words(f"dev {TASKS[task]['metric']}", metrics, base), args.repeats))
        paired = []
        for precision in args.precision:
            for side, results in runs_by[precision].items():
                if "compile_graphs" in results[0]:  # compiling happens in the first steps: inside the timed training
                    paired.append(f"\n{side}, {precision}: torch.compile compiled "
                                  f"{', '.join(str(r['compile_graphs']) for r in results)} graphs in "
                                  f"{', '.join(str(round(r['compile_seconds'])) for r in results)} s per seed "
                                  "(inside its train minutes).")
            paired += [f"\nDev metric over the seeds, {precision}, paired with {sides[0]} on the same seed:\n",
                       *paired_table(sides[0], {side: [r["metric"] for r in runs_by[precision][side]]
                                                for side in sides})]
        rows = f"the first {rows_for[task]}" if rows_for[task] else f"all {TASKS[task]['rows']}"
        sections.append("\n".join([
            f"\n### {TASKS[task]['title']}\n",
            f"Work: {args.epochs} epoch(s) over {rows}"
            f" train rows, batch {BATCH}, max length {MAX_LEN}, lr {TASKS[task]['lr']}, weight decay "
            f"{TASKS[task]['weight_decay']}, linear decay without warmup, clip 1.0, fused AdamW. Medians of "
            f"{args.repeats} alternating runs per side (seeds {seeds[0]}..{seeds[-1]}, same seed for both sides of a "
            "pair), after an untimed warm-up run of each.\n",
            "| precision | run | train samples/s | ratio | padded tokens/s | padding | waiting for data | train minutes"
            " | dev median | dev per seed |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *table,
            *paired,
            "",
            *summaries,
        ]))
    report = "\n".join([
        *report_heading("lightning_ft vs Hugging Face Trainer, MiniLM-L6, shipped defaults", __file__),
        f"Ratio: train samples/s over {sides[0]}'s. {Path(__file__).name} docstring: what each side does.",
        *sections,
        "",
    ])
    append_report(args.results, report)


if __name__ == "__main__":
    main()
