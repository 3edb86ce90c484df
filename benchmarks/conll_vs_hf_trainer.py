"""lightning_ft vs a Hugging Face Trainer token-classification script: MiniLM on CoNLL-2003 NER, in one process.

Both get the same model directory, the CoNLL-2003 files in ../shared/data/conll2003, max length 128, batch 32,
AdamW (lr, no weight decay, fused), linear decay without warmup, clipping at 1.0, seed, epochs, first-sub-token
labels, and 2 threads. The HF side is the run_ner.py recipe (tokenize with word_ids, -100 on later sub-tokens,
DataCollatorForTokenClassification, seqeval on the first sub-tokens). Train throughput is timed from train start to
train end with no evaluation inside; then both are scored on the test split (entity-level micro F1).

    python benchmarks/conll_vs_hf_trainer.py --epochs 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

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

DATA = ROOT.parent / "shared" / "data" / "conll2003"
LR, BATCH, MAX_LEN = 5e-5, 32, 128


def run_lightning_ft(epochs: int, seed: int, train_limit: int | None) -> dict:
    overrides = [
        "task=ner", "dataset=conll2003", f"dataset.data_dir={DATA}", f"dataset.batch_size={BATCH}",
        f"dataset.max_length={MAX_LEN}", f"optim.lr={LR}", "optim.weight_decay=0.0", "scheduler.warmup_ratio=0.0",
    ]
    if train_limit:
        overrides.append(f"+dataset.max_train_examples={train_limit}")
    module, datamodule = lightning_ft_module(overrides, seed)

    timer = lightning_timer()
    trainer = timed_trainer(timer, max_epochs=epochs)
    trainer.fit(module, datamodule=datamodule)
    scores = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return {"seconds": timer.seconds, "samples": timer.samples, "f1": scores["test/f1"]}


def run_hf_trainer(epochs: int, seed: int, train_limit: int | None) -> dict:
    import datasets
    from seqeval.metrics import f1_score
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from lightning_ft.backbones import resolve_name
    from lightning_ft.data.conll import read_conll

    model_dir = resolve_name(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = {}
    for split, name in [("train", "train.txt"), ("test", "test.txt")]:
        rows = read_conll(DATA / name)
        splits[split] = datasets.Dataset.from_dict({"tokens": rows["tokens"], "ner_tags": rows["ner_tags"]})
    if train_limit:
        splits["train"] = splits["train"].select(range(train_limit))
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
    test = splits["test"].map(encode, batched=True, remove_columns=["tokens", "ner_tags"])
    set_seed(seed)
    model = AutoModelForTokenClassification.from_pretrained(
        model_dir, num_labels=len(label_list), id2label=dict(enumerate(label_list)), label2id=label_to_id)

    timer = hf_timer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=2 * BATCH,
            learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, num_train_epochs=epochs, lr_scheduler_type="linear",
            warmup_steps=0, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
            use_cpu=True, seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=DataCollatorForTokenClassification(tokenizer), callbacks=[timer])
        trainer.train()
        predictions = trainer.predict(test)
    predicted = np.argmax(predictions.predictions, axis=2)
    gold_tags, predicted_tags = [], []  # run_ner.py's compute_metrics: first sub-tokens only
    for p_row, l_row in zip(predicted, predictions.label_ids):
        gold_tags.append([label_list[label] for p, label in zip(p_row, l_row) if label != -100])
        predicted_tags.append([label_list[p] for p, label in zip(p_row, l_row) if label != -100])
    return {"seconds": timer.seconds, "samples": len(train) * epochs, "f1": f1_score(gold_tags, predicted_tags)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=None, help="first N training sentences (a quick check)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for fn in (run_hf_trainer, run_lightning_ft):  # untimed: the first run in a process pays one-time costs
        fn(1, args.seed, 64)
    results = {}
    for name, fn in [("hf_trainer", run_hf_trainer), ("lightning_ft", run_lightning_ft)]:
        results[name] = fn(args.epochs, args.seed, args.train_limit)
        r = results[name]
        print(f"{name}: {r['samples'] / r['seconds']:.1f} train samples/s over {r['seconds']:.0f} s, "
              f"test F1 {r['f1']:.4f}", flush=True)
    hf_rate = results["hf_trainer"]["samples"] / results["hf_trainer"]["seconds"]
    rows = [f"| {name} | {r['samples'] / r['seconds']:.1f} | **{r['samples'] / r['seconds'] / hf_rate:.3f}** | "
            f"{r['seconds'] / 60:.1f} | {r['f1']:.4f} |" for name, r in results.items()]
    command = "python benchmarks/conll_vs_hf_trainer.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        f"\n## CoNLL-2003 NER, MiniLM-L6: lightning_ft vs Hugging Face Trainer ({datetime.date.today()})\n",
        f"Command: `{command.strip()}`  ",
        f"Machine: {environment()}  ",
        f"Work: {args.epochs} epochs over {'the first ' + str(args.train_limit) if args.train_limit else 'all 14,041'} "
        f"CoNLL-2003 train sentences, batch {BATCH}, max length {MAX_LEN}, lr {LR}, no weight decay, linear decay "
        f"without warmup, clip 1.0, fused AdamW, fp32, seed {args.seed}, first-sub-token labels, in both; test = "
        "CoNLL-2003 test (3,453 sentences), entity-level micro F1 (HF: seqeval on first sub-tokens, as run_ner.py; "
        "lightning_ft: its EntityScores metric over every word). One run each, HF first, in one process, after an "
        "untimed warm-up run of each.\n",
        "| run | train samples/s | ratio to HF | train minutes | test entity F1 |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    append_report(args.results, report)


if __name__ == "__main__":
    main()
