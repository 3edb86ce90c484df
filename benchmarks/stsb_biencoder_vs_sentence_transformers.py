"""lightning_ft vs the sentence-transformers trainer: a MiniLM bi-encoder on GLUE STS-B, in one process.

1. The pretrained all-MiniLM-L6-v2 as it is: cosine Spearman on STS-B dev.
2. Bi-encoder training with lightning_ft (``experiment=minilm_stsb_biencoder``) and with sentence-transformers'
   own ``SentenceTransformerTrainer``: both fit the cosine similarity of the pair to score / 5 (MSE,
   ``CosineSimilarityLoss``) over all 5,749 train pairs, with batch 16, lr 2e-5, weight decay 0.01, 10% linear warmup
   then linear decay, clipping at 1.0, fused AdamW, fp32, max length 128, the same seed, mean pooling and 2 threads.
   Train throughput (pairs/s) is timed from train start to train end with no evaluation inside.
3. Both final models (the weights after the last epoch, no selection on dev) are scored by the same evaluator,
   sentence-transformers' ``EmbeddingSimilarityEvaluator`` (cosine Spearman on STS-B dev, 1,500 pairs).

    python benchmarks/stsb_biencoder_vs_sentence_transformers.py --epochs 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import (  # noqa: E402
    MINILM,
    ROOT,
    append_report,
    hf_timer,
    lightning_ft_module,
    lightning_timer,
    report_heading,
    summary_line,
    timed_trainer,
)

DATA = ROOT.parent / "shared" / "data" / "glue_stsb"
LR, BATCH, MAX_LEN, WEIGHT_DECAY, WARMUP = 2e-5, 16, 128, 0.01, 0.1


def read_split(name: str, limit: int | None = None) -> dict[str, list]:
    import csv

    with open(DATA / name, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return {"sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
            "score": [float(r["score"]) / 5.0 for r in rows]}


def dev_spearman(model_dir: str) -> float:
    """sentence-transformers' own STS evaluation of a model directory: cosine Spearman on STS-B dev."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = MAX_LEN
    dev = read_split("dev.tsv")
    evaluator = EmbeddingSimilarityEvaluator(dev["sentence1"], dev["sentence2"], dev["score"], name="stsb-dev")
    return float(evaluator(model)["stsb-dev_spearman_cosine"])


def run_lightning_ft(epochs: int, seed: int, train_limit: int | None, group_by_length: bool) -> dict:
    import pytorch_lightning as pl

    overrides = ["experiment=minilm_stsb_biencoder", f"dataset.data_dir={DATA}", f"dataset.batch_size={BATCH}",
                 f"dataset.max_length={MAX_LEN}", f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}",
                 f"scheduler.warmup_ratio={WARMUP}", f"dataset.group_by_length={str(group_by_length).lower()}"]
    if train_limit:
        overrides.append(f"+dataset.max_train_examples={train_limit}")
    module, datamodule = lightning_ft_module(overrides, seed)

    timer = lightning_timer()
    trainer = timed_trainer(timer, max_epochs=epochs)
    trainer.fit(module, datamodule=datamodule)
    evaluator = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False)
    own = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]["val/spearman"]
    with tempfile.TemporaryDirectory() as out:
        module.export(out, datamodule.tokenizer)
        spearman = dev_spearman(out)
    return {"seconds": timer.seconds, "samples": timer.samples, "spearman": spearman, "own_metric": float(own)}


def run_sentence_transformers(epochs: int, seed: int, train_limit: int | None) -> dict:
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.losses import CosineSimilarityLoss
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments
    from transformers import set_seed

    from lightning_ft.backbones import resolve_name

    set_seed(seed)
    model = SentenceTransformer(resolve_name(MINILM), device="cpu")
    model.max_seq_length = MAX_LEN
    train = datasets.Dataset.from_dict(read_split("train.tsv", train_limit))

    timer = hf_timer()
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, learning_rate=LR, weight_decay=WEIGHT_DECAY,
            max_grad_norm=1.0, num_train_epochs=epochs, lr_scheduler_type="linear", warmup_steps=WARMUP,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=seed,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                             loss=CosineSimilarityLoss(model), callbacks=[timer])
        trainer.train()
        model.save(out + "/final")
        spearman = dev_spearman(out + "/final")
    return {"seconds": timer.seconds, "samples": len(train) * epochs, "spearman": spearman}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each side (median throughput)")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training pairs (a quick check)")
    parser.add_argument("--sides", default="st,plain,grouped",
                        help="which runs: st (sentence-transformers), plain and grouped (lightning_ft without and with "
                             "group_by_length); the ratio needs st")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lightning_ft.backbones import resolve_name

    pretrained = dev_spearman(resolve_name(MINILM))
    print(f"pretrained MiniLM: STS-B dev Spearman {pretrained:.4f}", flush=True)
    sides = {
        "sentence-transformers": lambda limit, epochs: run_sentence_transformers(epochs, args.seed, limit),
        "lightning_ft, group_by_length=false": lambda limit, epochs: run_lightning_ft(epochs, args.seed, limit, False),
        "lightning_ft (shipped config: group_by_length=true)": lambda limit, epochs: run_lightning_ft(
            epochs, args.seed, limit, True),
    }
    chosen = args.sides.split(",")
    sides = {name: side for key, (name, side) in zip(["st", "plain", "grouped"], sides.items()) if key in chosen}
    for side in sides.values():  # untimed: the first run in a process pays one-time costs
        side(64, 1)
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, side in sides.items():
            r = side(args.train_limit, args.epochs)
            runs[name].append(r)
            print(f"{name}: {r['samples'] / r['seconds']:.1f} train pairs/s over {r['seconds']:.0f} s, "
                  f"dev Spearman {r['spearman']:.4f}", flush=True)

    def rate(name: str) -> float:
        return statistics.median(r["samples"] / r["seconds"] for r in runs[name])

    base = rate("sentence-transformers") if "sentence-transformers" in runs else float("nan")
    rows = [f"| pretrained all-MiniLM-L6-v2, no training | | | | {pretrained:.4f} |"]
    for name, results in runs.items():
        spearmans = ", ".join(f"{r['spearman']:.4f}" for r in results)
        rows.append(f"| {name} | {rate(name):.1f} | **{rate(name) / base:.3f}** | "
                    f"{statistics.median(r['seconds'] for r in results) / 60:.1f} | {spearmans} |")
    summaries = [summary_line(
        f"STS-B bi-encoder, MiniLM, {args.epochs} epochs, fp32", name, "sentence-transformers", rate(name),
        "pairs/s", rate(name) / base if "sentence-transformers" in runs else None,
        "dev Spearman " + ", ".join(f"{r['spearman']:.4f}" for r in results), len(results))
        for name, results in runs.items()]
    own = [f"{r['own_metric']:.4f}" for name in runs if name.startswith("lightning_ft") for r in runs[name]]
    report = "\n".join([
        *report_heading("STS-B bi-encoder, MiniLM-L6: lightning_ft vs sentence-transformers' trainer", __file__),
        f"Work: {args.epochs} epochs over {'the first ' + str(args.train_limit) if args.train_limit else 'all 5,749'} "
        f"STS-B train pairs, cosine loss (MSE of cosine to score/5), batch {BATCH}, max length {MAX_LEN}, lr {LR}, "
        f"weight decay {WEIGHT_DECAY}, {WARMUP:.0%} linear warmup then linear decay, clip 1.0, fused AdamW, fp32, "
        f"mean pooling, seed {args.seed}, in both. Dev Spearman: sentence-transformers' EmbeddingSimilarityEvaluator "
        "(cosine) on STS-B dev (1,500 pairs) for every model, on the weights after the last epoch. "
        f"{args.repeats} alternating run(s) per side in one process after an untimed warm-up of each; throughput is "
        f"the median. lightning_ft's own val/spearman metric on the same weights: {', '.join(own)}.\n",
        "| run | train pairs/s | ratio to sentence-transformers | train minutes | STS-B dev Spearman |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *summaries,
        "",
    ])
    append_report(args.results, report)


if __name__ == "__main__":
    main()
