"""lightning_ft vs the Hugging Face QA and multiple-choice examples, MiniLM-L6, on the same data and settings.

SQuAD: only the v1.1 dev file is here. Its 48 articles are split by position: the first 38 (8,582 questions) train,
the last 10 (1,988 questions, "Intergovernmental_Panel_on_Climate_Change" .. "Force") are held out for evaluation.
Both sides train on the same questions with the same settings (max length 384, doc stride 128, batch 16, lr 1e-4
with 10% linear warmup then linear decay, weight decay 0.01, clip 1.0, fused AdamW, the same precision, seed 42) and
are scored with the official SQuAD v1.1 EM/F1 on the held-out articles. The HF side is ``run_qa.py`` written out
(its ``prepare_train_features``, ``prepare_validation_features`` with padding to max length, the default, and
``utils_qa.postprocess_qa_predictions``) with the ``Trainer``; the official scoring script is written out too.

Evaluation memory: each trained model then evaluates the whole dev file (10,570 questions, 10,833 windows) in a
fresh process; a sampler thread records the process's resident memory every 5 ms, and the report gives the peak
during evaluation above the level at its start, plus the bytes each side keeps for post-processing.

OpenBookQA: both sides train on its train split (4,957) with the ``run_swag.py`` scheme (dynamic padding, max length
64) and report dev accuracy (500).

    python benchmarks/qa_vs_hf.py --epochs 1 --precision bf16 --train-questions 4000
    # one change on lightning_ft's side, the HF side's models of an earlier run reused
    python benchmarks/qa_vs_hf.py --epochs 1 --precision bf16 --train-questions 4000 --seeds 42 43 44 \
        --skip cross memory obqa --reuse <run folder> --lightning-ft-overrides dataset.pad_to_multiple_of=384
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
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
)

DATA = ROOT.parent / "shared" / "data"
SQUAD = DATA / "squad_v1.1" / "dev-v1.1.json"
TRAIN_ARTICLES = 38
MAX_LEN, STRIDE, BATCH, LR, WARMUP, DECAY, N_BEST, MAX_ANSWER = 384, 128, 16, 1e-4, 0.1, 0.01, 20, 30
OBQA_LR, OBQA_LEN, OBQA_EPOCHS = 5e-5, 64, 2


# ---- the official SQuAD v1.1 evaluation script, written out (the HF side's metric) ------------------------------
def official_normalize(s: str) -> str:
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    def f1(prediction, truth):
        p, t = official_normalize(prediction).split(), official_normalize(truth).split()
        same = sum((collections.Counter(p) & collections.Counter(t)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(p), same / len(t)
        return 2 * precision * recall / (precision + recall)

    em = f = 0.0
    for qid, truths in references.items():
        if qid not in predictions:
            continue
        em += max(float(official_normalize(predictions[qid]) == official_normalize(t)) for t in truths)
        f += max(f1(predictions[qid], t) for t in truths)
    return {"exact_match": 100 * em / len(references), "f1": 100 * f / len(references)}


# ---- data ----------------------------------------------------------------------------------------------------------
def write_split(folder: Path, train_questions: int | None) -> dict[str, Path]:
    """train.json: the first 38 articles (or a fixed random draw of ``train_questions`` of their questions, seed 0,
    article and paragraph structure kept); validation.json: the last 10 articles; full.json: all 48."""
    import random

    document = json.loads(SQUAD.read_text(encoding="utf-8"))
    train = document["data"][:TRAIN_ARTICLES]
    if train_questions:
        ids = [qa["id"] for article in train for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
        keep = set(random.Random(0).sample(ids, train_questions))
        train = [{**article, "paragraphs": [{**p, "qas": [qa for qa in p["qas"] if qa["id"] in keep]}
                                            for p in article["paragraphs"]]} for article in train]
    parts = {"train": train, "validation": document["data"][TRAIN_ARTICLES:], "full": document["data"]}
    paths = {}
    for name, articles in parts.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")
    return paths


def squad_rows(path: Path):
    import datasets

    from lightning_ft.data.squad import read_squad_json

    return datasets.Dataset.from_list(read_squad_json(path))


# ---- lightning_ft ------------------------------------------------------------------------------------------------
def lightning_ft_qa(paths: dict[str, Path], epochs: int, precision: str, out: Path, seed: int = 42,
                    extra: tuple[str, ...] = ()) -> dict:
    """lightning_ft's side; ``extra``: overrides on top of the shipped config (``--lightning-ft-overrides``)."""
    import pytorch_lightning as pl

    overrides = ["experiment=minilm_squad", "dataset.data_dir=null", "dataset.hub_name=null",
                 f"+dataset.data_files={{train: {paths['train']}, validation: {paths['validation']}}}",
                 f"dataset.batch_size={BATCH}", f"optim.lr={LR}", f"optim.weight_decay={DECAY}",
                 f"scheduler.warmup_ratio={WARMUP}", f"dataset.max_length={MAX_LEN}", f"dataset.doc_stride={STRIDE}",
                 *extra]
    module, datamodule = lightning_ft_module(overrides, seed=seed)
    timer = lightning_timer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_epochs=epochs, gradient_clip_val=1.0,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    evaluator = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                           enable_model_summary=False)
    started = time.perf_counter()
    scores = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
    eval_seconds = time.perf_counter() - started
    module.export(out, datamodule.tokenizer)
    return {"seconds": timer.seconds, "windows": timer.samples, "real_tokens": timer.real_tokens,
            "tokens": timer.tokens, "exact_match": scores["val/exact_match"], "f1": scores["val/f1"],
            "eval_seconds": eval_seconds}


# ---- the HF run_qa.py example, written out ------------------------------------------------------------------------
def hf_features(tokenizer, examples, train: bool):
    """run_qa.py's prepare_train_features / prepare_validation_features (pad_to_max_length=True, its default)."""
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(examples["question"], examples["context"], truncation="only_second", max_length=MAX_LEN,
                          stride=STRIDE, return_overflowing_tokens=True, return_offsets_mapping=True,
                          padding="max_length")
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    if not train:
        tokenized["example_id"] = []
        for i in range(len(tokenized["input_ids"])):
            sequence_ids = tokenized.sequence_ids(i)
            tokenized["example_id"].append(examples["id"][sample_mapping[i]])
            tokenized["offset_mapping"][i] = [o if sequence_ids[k] == 1 else None
                                              for k, o in enumerate(tokenized["offset_mapping"][i])]
        return tokenized
    offset_mapping = tokenized.pop("offset_mapping")
    tokenized["start_positions"], tokenized["end_positions"] = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id)
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start_index = 0
        while sequence_ids[token_start_index] != 1:
            token_start_index += 1
        token_end_index = len(input_ids) - 1
        while sequence_ids[token_end_index] != 1:
            token_end_index -= 1
        if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
        else:
            while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                token_start_index += 1
            tokenized["start_positions"].append(token_start_index - 1)
            while offsets[token_end_index][1] >= end_char:
                token_end_index -= 1
            tokenized["end_positions"].append(token_end_index + 1)
    return tokenized


def hf_postprocess(examples, features, start_logits, end_logits) -> dict[str, str]:
    """utils_qa.postprocess_qa_predictions for v1.1 (n-best 20, max answer length 30)."""
    feature_index = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        feature_index[example_id].append(i)
    offsets_of = features["offset_mapping"]
    predictions = {}
    for example in examples:
        candidates = []
        for i in feature_index[example["id"]]:
            offsets = offsets_of[i]
            starts = np.argsort(start_logits[i])[-1:-N_BEST - 1:-1].tolist()
            ends = np.argsort(end_logits[i])[-1:-N_BEST - 1:-1].tolist()
            for s in starts:
                for e in ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if len(offsets[s]) < 2 or len(offsets[e]) < 2 or e < s or e - s + 1 > MAX_ANSWER:
                        continue
                    candidates.append((start_logits[i][s] + end_logits[i][e], offsets[s][0], offsets[e][1]))
        best = sorted(candidates, reverse=True)[:N_BEST]
        predictions[example["id"]] = example["context"][best[0][1]:best[0][2]] if best else "empty"
    return predictions


def hf_trainer_qa(paths: dict[str, Path], epochs: int, precision: str, out: Path, seed: int = 42) -> dict:
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from lightning_ft.backbones import resolve_name

    model_dir = resolve_name(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_rows = squad_rows(paths["train"])
    train = train_rows.map(lambda b: hf_features(tokenizer, b, True), batched=True,
                           remove_columns=train_rows.column_names)
    set_seed(seed)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    counts = {"samples": 0, "tokens": 0, "real_tokens": 0}
    timer = hf_timer(counts)
    from transformers import default_data_collator

    def collate(features):
        batch = default_data_collator(features)
        counts["samples"] += len(features)
        counts["tokens"] += batch["input_ids"].numel()
        counts["real_tokens"] += int(batch["attention_mask"].sum())
        return batch

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=2 * BATCH,
        learning_rate=LR, weight_decay=DECAY, max_grad_norm=1.0, num_train_epochs=epochs, lr_scheduler_type="linear",
        warmup_steps=WARMUP, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, seed=seed, dataloader_num_workers=0, disable_tqdm=True, bf16=precision == "bf16-mixed",
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[timer])
    trainer.train()
    started = time.perf_counter()
    predictions = hf_evaluate(trainer, tokenizer, squad_rows(paths["validation"]))
    eval_seconds = time.perf_counter() - started
    references = {r["id"]: r["answers"]["text"] for r in squad_rows(paths["validation"])}
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    scores = official_scores(predictions, references)
    return {"seconds": timer.seconds, "windows": timer.counts["samples"], "real_tokens": timer.counts["real_tokens"],
            "tokens": timer.counts["tokens"], **scores, "eval_seconds": eval_seconds}


def hf_evaluate(trainer, tokenizer, examples) -> dict[str, str]:
    features = examples.map(lambda b: hf_features(tokenizer, b, False), batched=True,
                            remove_columns=examples.column_names)
    output = trainer.predict(features.remove_columns(["example_id", "offset_mapping"]))
    start_logits, end_logits = output.predictions
    hf_evaluate.held_bytes = start_logits.nbytes + end_logits.nbytes
    return hf_postprocess(examples, features, start_logits, end_logits)


# ---- evaluation memory, in a fresh process per side ----------------------------------------------------------------
class RssSampler:
    """Peak resident memory of this process while the ``with`` block runs, sampled every 5 ms."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * self.page

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())


def evaluate_model(side: str, model: str | Path, paths: dict[str, Path], split: str, precision: str) -> dict:
    """``side``'s evaluation (lightning_ft's module, or run_qa's Trainer.predict + post-processing) of ``model`` on
    ``split``: EM/F1, seconds, the resident memory evaluation added and the bytes kept for post-processing."""
    if side == "lightning_ft":
        import pytorch_lightning as pl

        overrides = ["experiment=minilm_squad", "dataset.data_dir=null", "dataset.hub_name=null",
                     f"backbone.name={model}",
                     f"+dataset.data_files={{train: {paths['train']}, validation: {paths[split]}}}"]
        module, datamodule = lightning_ft_module(overrides, seed=42)
        evaluator = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                               enable_model_summary=False)
        windows = len(datamodule.datasets["validation"])
        with RssSampler() as memory:
            started = time.perf_counter()
            scores = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
            seconds = time.perf_counter() - started
        held = windows * (4 * N_BEST * 8 + 3 * 8)  # SpanCandidates: 4 rows of top-k plus 3 numbers a window
        return {"peak_mb": (memory.peak - memory.start) / 2**20, "seconds": seconds, "held_mb": held / 2**20,
                "exact_match": scores["val/exact_match"], "f1": scores["val/f1"]}
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model)
    trainer = Trainer(model=AutoModelForQuestionAnswering.from_pretrained(model), args=TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_eval_batch_size=2 * BATCH, report_to=[], use_cpu=True,
        disable_tqdm=True, bf16=precision == "bf16-mixed", dataloader_num_workers=0))
    examples = squad_rows(paths[split])
    with RssSampler() as memory:
        started = time.perf_counter()
        predictions = hf_evaluate(trainer, tokenizer, examples)
        seconds = time.perf_counter() - started
    references = {r["id"]: r["answers"]["text"] for r in examples}
    return {"peak_mb": (memory.peak - memory.start) / 2**20, "seconds": seconds,
            "held_mb": hf_evaluate.held_bytes / 2**20, **official_scores(predictions, references)}


def measure_memory(side: str, model: Path, folder: Path, precision: str, threads: int) -> dict:
    """``evaluate_model`` on the whole dev file in a fresh process, so nothing earlier inflates its memory."""
    result = folder / f"memory_{side}.json"
    subprocess.run([sys.executable, __file__, "--memory-child", side, "--model", str(model), "--folder",
                    str(folder), "--precision", "bf16" if precision == "bf16-mixed" else "fp32", "--threads",
                    str(threads), "--out", str(result)], check=True)
    return json.loads(result.read_text())


# ---- OpenBookQA ----------------------------------------------------------------------------------------------------
def lightning_ft_obqa(precision: str) -> dict:
    import pytorch_lightning as pl

    overrides = ["experiment=minilm_openbookqa", f"dataset.data_dir={DATA / 'openbookqa' / 'main'}",
                 f"optim.lr={OBQA_LR}", f"dataset.max_length={OBQA_LEN}", f"dataset.batch_size={BATCH}"]
    module, datamodule = lightning_ft_module(overrides, seed=42)
    timer = lightning_timer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_epochs=OBQA_EPOCHS,
                         gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    evaluator = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                           enable_model_summary=False)
    accuracy = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]["val/accuracy"]
    return {"seconds": timer.seconds, "samples": timer.samples, "accuracy": accuracy}


def hf_trainer_obqa(precision: str, out: Path) -> dict:
    """run_swag.py's scheme: (question, choice) pairs, truncation, dynamic padding, AutoModelForMultipleChoice."""
    import datasets
    from transformers import (
        AutoModelForMultipleChoice,
        AutoTokenizer,
        DataCollatorForMultipleChoice,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from lightning_ft.backbones import resolve_name

    model_dir = resolve_name(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    folder = DATA / "openbookqa" / "main"
    raw = {split: datasets.load_dataset("json", data_files=str(folder / f"{name}.jsonl"), split="train")
           for split, name in (("train", "train"), ("dev", "dev"))}

    def preprocess(batch):
        firsts, seconds = [], []
        for question in batch["question"]:
            choices = [c["text"] for c in question["choices"]]
            firsts += [question["stem"]] * len(choices)
            seconds += choices
        encoding = tokenizer(firsts, seconds, truncation=True, max_length=OBQA_LEN)
        out_ = {k: [v[i:i + 4] for i in range(0, len(v), 4)] for k, v in encoding.items()}
        out_["label"] = ["ABCD".index(k) for k in batch["answerKey"]]
        return out_

    encoded = {s: d.map(preprocess, batched=True, remove_columns=d.column_names) for s, d in raw.items()}
    set_seed(42)
    model = AutoModelForMultipleChoice.from_pretrained(model_dir)
    timer = hf_timer()
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=2 * BATCH,
        learning_rate=OBQA_LR, weight_decay=DECAY, max_grad_norm=1.0, num_train_epochs=OBQA_EPOCHS,
        lr_scheduler_type="linear", warmup_steps=WARMUP, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, seed=42, dataloader_num_workers=0, disable_tqdm=True,
        bf16=precision == "bf16-mixed",
    )
    trainer = Trainer(model=model, args=args, train_dataset=encoded["train"],
                      data_collator=DataCollatorForMultipleChoice(tokenizer), callbacks=[timer])
    trainer.train()
    output = trainer.predict(encoded["dev"])
    accuracy = float((output.predictions.argmax(-1) == output.label_ids).mean())
    return {"seconds": timer.seconds, "samples": len(encoded["train"]) * OBQA_EPOCHS, "accuracy": accuracy}


# ---- report --------------------------------------------------------------------------------------------------------
def listed(values, digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--train-questions", type=int, default=4000,
                        help="a fixed random draw of N of the 8,582 training questions (0: all); 4,000 take the HF "
                             "side about 30 minutes here")
    parser.add_argument("--skip", nargs="*", default=[], choices=["squad", "cross", "memory", "obqa"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="SQuAD: train both sides with each seed (the same seeds for both) and report the paired "
                             "differences; the cross-evaluation and memory steps use the first seed's models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", help="the folder of an earlier run (printed at its start): evaluate the models it "
                                        "trained, with the training figures it saved, instead of training again")
    parser.add_argument("--lightning-ft-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="SQuAD: train lightning_ft's side with these overrides too (e.g. "
                             "dataset.pad_to_multiple_of=384), to isolate one change; its files in the run folder "
                             "are kept apart from the shipped side's (needs --skip cross memory)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--memory-child", choices=["lightning_ft", "hf_trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra = tuple(args.lightning_ft_overrides)
    if extra and not {"cross", "memory"} <= set(args.skip) and "squad" not in args.skip:
        parser.error("--lightning-ft-overrides: add --skip cross memory (those steps read the shipped side's models)")
    torch.set_num_threads(args.threads)
    precision = PRECISIONS[args.precision]
    if args.memory_child:
        paths = {name: Path(args.folder) / f"{name}.json" for name in ("train", "validation", "full")}
        result = evaluate_model(args.memory_child, args.model, paths, "full", precision)
        Path(args.out).write_text(json.dumps(result))
        return

    limit = args.train_questions or None
    if args.reuse:
        folder = Path(args.reuse)
        paths = {name: folder / f"{name}.json" for name in ("train", "validation", "full")}
    else:
        folder = Path(tempfile.mkdtemp(prefix="qa_bench_"))
        paths = write_split(folder, limit)
    print(f"run folder: {folder}", flush=True)
    lines, summaries = [], []
    if "squad" not in args.skip:
        runs, by_seed = {}, {"hf_trainer": [], "lightning_ft": []}
        # a changed lightning_ft side's files are named by its overrides, so that --reuse never mixes them
        changed = f"_{hashlib.sha1(' '.join(extra).encode()).hexdigest()[:8]}" if extra else ""
        for seed in args.seeds:  # the same seeds for both sides; the first seed's files keep their old names
            tag = "" if seed == args.seeds[0] else f"_seed{seed}"
            for side, run in (("hf_trainer", hf_trainer_qa), ("lightning_ft", lightning_ft_qa)):
                named = f"{side}{tag}{changed if side == 'lightning_ft' else ''}"
                saved = folder / f"train_{named}.json"
                if not (args.reuse and saved.is_file()):
                    kwargs = {"extra": extra} if side == "lightning_ft" else {}
                    saved.write_text(json.dumps(run(paths, args.epochs, precision, folder / f"model_{named}",
                                                    seed=seed, **kwargs)))
                by_seed[side].append(json.loads(saved.read_text()))
                print(side, seed, by_seed[side][-1], flush=True)
        if extra:  # the changed side is reported under its overrides
            by_seed[f"lightning_ft ({' '.join(extra)})"] = by_seed.pop("lightning_ft")
        runs = {side: results[0] for side, results in by_seed.items()}
        # Each model scored by both evaluations: separates what training did from what post-processing does.
        cross = {} if "cross" in args.skip else {
            (evaluator, model): evaluate_model(evaluator, folder / f"model_{model}", paths, "validation", precision)
            for evaluator in runs for model in runs}
        lines += [
            f"\nSQuAD v1.1, trained on the first {TRAIN_ARTICLES} dev articles "
            f"({f'a fixed random draw of {limit} of their 8,582' if limit else 'all 8,582'} questions), "
            f"{args.epochs} epoch(s); scored on the last 10 (1,988 questions):\n",
            "| run | EM | F1 | train windows/s | ratio | padding | train minutes | held-out eval seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        base = runs["hf_trainer"]["windows"] / runs["hf_trainer"]["seconds"]
        for side, r in runs.items():
            rate = r["windows"] / r["seconds"]
            lines.append(f"| {side} | {r['exact_match']:.2f} | {r['f1']:.2f} | {rate:.1f} | {rate / base:.2f} | "
                         f"{1 - r['real_tokens'] / r['tokens']:.1%} | {r['seconds'] / 60:.1f} | "
                         f"{r['eval_seconds']:.0f} |")
        hf_rate = statistics.median(r["windows"] / r["seconds"] for r in by_seed["hf_trainer"])
        for side, rs in by_seed.items():
            rate = statistics.median(r["windows"] / r["seconds"] for r in rs)
            base = None if side == "hf_trainer" else [r["f1"] for r in by_seed["hf_trainer"]]
            summaries.append(summary_line(
                f"SQuAD v1.1, MiniLM, {limit or 'all'} questions, {args.epochs} epoch(s), {args.precision}", side,
                "hf_trainer", rate, "windows/s", rate / hf_rate,
                metric_words("held-out F1", [r["f1"] for r in rs], base, digits=2), len(rs)))
        if len(args.seeds) > 1:
            lines += [f"\nOver seeds {', '.join(map(str, args.seeds))} (the table above: seed {args.seeds[0]}), "
                      "each side's own evaluation, paired by seed:\n",
                      "| run | EM per seed | F1 per seed | train windows/s per seed |", "|---|---|---|---|",
                      *[f"| {side} | {listed(r['exact_match'] for r in rs)} | {listed(r['f1'] for r in rs)} | "
                        f"{listed((r['windows'] / r['seconds'] for r in rs), 1)} |" for side, rs in by_seed.items()],
                      "\nF1:\n", *paired_table("hf_trainer", {s: [r["f1"] for r in rs] for s, rs in by_seed.items()},
                                                digits=2),
                      "\nEM:\n", *paired_table("hf_trainer", {s: [r["exact_match"] for r in rs]
                                                              for s, rs in by_seed.items()}, digits=2)]
        if cross:
            lines += [
                "\nEach trained model evaluated on the held-out articles by both evaluations (lightning_ft: its "
                "module, per-window top-20 candidates, its SQuAD metric; HF: Trainer.predict, utils_qa "
                "post-processing, the official script):\n",
                "| model trained by | EM / F1, lightning_ft evaluation | EM / F1, HF evaluation |", "|---|---|---|",
                *[f"| {model} | {ours['exact_match']:.2f} / {ours['f1']:.2f} | {hf['exact_match']:.2f} / "
                  f"{hf['f1']:.2f} |"
                  for model in runs for ours, hf in [(cross["lightning_ft", model], cross["hf_trainer", model])]],
            ]
        if "memory" not in args.skip:
            memory = {side: measure_memory(side, folder / f"model_{side}", folder, precision, args.threads)
                      for side in runs}
            lines += [
                "\nEvaluation of each trained model on the whole dev file (10,570 questions; F1 here includes the "
                "training articles), in a fresh process per side:\n",
                "| run | resident memory added by evaluation (MB, peak) | kept for post-processing (MB) | "
                "eval seconds | F1 (all 48 articles) |",
                "|---|---|---|---|---|",
                *[f"| {side} | {m['peak_mb']:.0f} | {m['held_mb']:.1f} | {m['seconds']:.0f} | {m['f1']:.2f} |"
                  for side, m in memory.items()],
            ]
    if "obqa" not in args.skip:
        obqa = {"hf_trainer": hf_trainer_obqa(precision, folder / "obqa_hf"),
                "lightning_ft": lightning_ft_obqa(precision)}
        base = obqa["hf_trainer"]["samples"] / obqa["hf_trainer"]["seconds"]
        lines += [
            f"\nOpenBookQA: {OBQA_EPOCHS} epochs on train (4,957), batch {BATCH}, lr {OBQA_LR}, max length {OBQA_LEN}; "
            "dev accuracy (500):\n",
            "| run | dev accuracy | train examples/s | ratio |", "|---|---|---|---|",
            *[f"| {side} | {r['accuracy']:.4f} | {r['samples'] / r['seconds']:.1f} | "
              f"{r['samples'] / r['seconds'] / base:.2f} |" for side, r in obqa.items()],
        ]
        summaries += [summary_line(f"OpenBookQA, MiniLM, {OBQA_EPOCHS} epochs, {args.precision}", side, "hf_trainer",
                                   r["samples"] / r["seconds"], "examples/s", r["samples"] / r["seconds"] / base,
                                   f"dev accuracy {r['accuracy']:.4f}", 1) for side, r in obqa.items()]
    report = "\n".join([
        *report_heading("Extractive QA (SQuAD v1.1 split by article) and OpenBookQA vs the HF examples", __file__),
        f"Precision: {precision}. {Path(__file__).name} docstring: what each side does."
        + (f" Training figures and models: the earlier run in {folder} (--reuse)." if args.reuse else ""),
        *lines,
        "",
        *summaries,
        "",
    ])
    append_report(args.results, report)


if __name__ == "__main__":
    main()
