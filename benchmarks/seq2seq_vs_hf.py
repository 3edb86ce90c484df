"""Translation from scratch: lightning_ft against an equivalent Hugging Face ``Seq2SeqTrainer`` script, in one run.

Multi30k German->English (../shared/data/multi30k: 29,000 train pairs, test_2016_flickr 1,000). One Unigram tokenizer
of 8,000 tokens is trained on the training text (source and target) by ``lightning_ft.tokenizer_training`` and both
sides use it. Both build the same small T5 from a config (``conf/backbone/t5_small_scratch.yaml``: 3+3 layers, 256
wide) with the same seed (``--seed``, default 42), and train it with the same data, batch (64), steps (``--epochs``
epochs), AdamW (lr 1e-3, weight decay 0.01, none on biases and norms), linear schedule with 5% warmup, clipping at
1.0, max lengths 128, bf16 autocast (``--precision fp32``: none, for a CPU without native bf16), and no evaluation
inside the timed training.

- HF side: the ``run_translation.py`` recipe written out: its ``preprocess_function``, ``DataCollatorForSeq2Seq``
  (dynamic padding, labels padded with -100), ``Seq2SeqTrainer`` with ``predict_with_generate``; the run_translation
  defaults otherwise (no length grouping). Its test generation runs under bf16 autocast: accelerate wraps the
  model's ``forward`` in the training precision's autocast, and ``generate`` calls it (the script records the
  precision it saw, and the report labels the row with it).
- lightning_ft side: ``experiment=t5_multi30k`` (``task=translation``), trained by a Lightning Trainer with its shipped
  batches: packed rows since 2026-12-06 (``dataset.packing=null``: each batch's sources packed into rows, each target
  in its source's row, attention and cross-attention confined to each pair); shuffled padded batches before that
  (length-grouped until the second run of 2026-11-24 showed that this cost 1.4 BLEU). Test generation by
  ``trainer.test`` under the run's bf16 autocast (like for like with the HF side), and again in fp32.
- ``lightning_ft_padded`` (``--sides``): the same with ``dataset.packing=false``: shuffled padded batches, as HF pads.
- ``lightning_ft_packed``: the same with ``dataset.packing=true`` (packing required rather than chosen by the module's
  check; the runs of 2026-12-06 name it).

Both generate the test split with beam search (4 beams, at most 48 new tokens) and are scored by sacreBLEU on the raw
reference text. Train throughput: pairs/s and real (non-padding) source+target tokens/s over the timed training.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sacrebleu  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    PRECISIONS,
    ROOT,
    append_report,
    hf_timer,
    lightning_ft_module,
    lightning_timer,
    report_heading,
    summary_line,
)

MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"
SPLITS = {"train": "train", "validation": "val", "test": "test_2016_flickr"}
BATCH, LR, DECAY, WARMUP, MAX_LEN, BEAMS, MAX_NEW, VOCAB = 64, 1e-3, 0.01, 0.05, 128, 4, 48, 8000
GENERATIONS = ("bf16-mixed", "32-true")  # what each side's result holds generation figures under
SIDES = {"hf_trainer": [], "lightning_ft": [], "lightning_ft_padded": ["dataset.packing=false"],
         "lightning_ft_packed": ["dataset.packing=true"]}


def read_split(name: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    texts = []
    for lang in ("de", "en"):
        with gzip.open(MULTI30K / f"{SPLITS[name]}.{lang}.gz", "rt", encoding="utf-8") as handle:
            texts.append([line.rstrip("\n") for line in handle][:limit])
    return texts[0], texts[1]


def t5_overrides() -> dict:
    from omegaconf import OmegaConf

    return dict(OmegaConf.load(ROOT / "conf" / "backbone" / "t5_small_scratch.yaml").config_overrides)


def real_tokens(batch) -> tuple[int, int]:
    """Non-padding tokens of a batch (source + target) and all tokens, padding included."""
    labels = batch["labels"]
    sources = batch["example_lengths"] if "example_lengths" in batch else batch["attention_mask"]  # packed or not
    real = int(sources.sum()) + int((labels != -100).sum())
    return real, batch["input_ids"].numel() + labels.numel()


def lightning_ft_overrides(tokenizer_dir: Path, data_dir: Path) -> list[str]:
    """lightning_ft's side of the recipe: experiment=t5_multi30k on the shared data and tokenizer, with the settings
    both sides share."""
    return ["experiment=t5_multi30k", f"dataset.data_dir={data_dir}", f"backbone.tokenizer={tokenizer_dir}",
            "~backbone.train_tokenizer", f"dataset.batch_size={BATCH}", f"optim.lr={LR}",
            f"optim.weight_decay={DECAY}", f"scheduler.warmup_ratio={WARMUP}",
            f"dataset.max_source_length={MAX_LEN}", f"dataset.max_target_length={MAX_LEN}",
            f"task.num_beams={BEAMS}", f"task.max_new_tokens={MAX_NEW}"]


def prepare_folder(folder: Path, train_pairs: int | None) -> None:
    """What both sides read, written into ``folder``: Multi30k as parallel files under ``multi30k/`` (the train
    split cut to ``train_pairs`` for smoke runs) and the Unigram tokenizer trained on its training text under
    ``tokenizer/``."""
    from lightning_ft.tokenizer_training import train_tokenizer

    data_dir = folder / "multi30k"
    data_dir.mkdir()
    for split in SPLITS:
        de, en = read_split(split, train_pairs if split == "train" else None)
        for lang, lines in (("de", de), ("en", en)):
            (data_dir / f"{SPLITS[split]}.{lang}").write_text("".join(line + "\n" for line in lines),
                                                              encoding="utf-8")
    de, en = read_split("train", train_pairs)
    train_tokenizer(de + en, algorithm="unigram", vocab_size=VOCAB).save_pretrained(folder / "tokenizer")


def lightning_ft_translation(tokenizer_dir: Path, data_dir: Path, epochs: int, extra: list[str],
                             seed: int, precision: str) -> dict:
    import pytorch_lightning as pl

    module, datamodule = lightning_ft_module([*lightning_ft_overrides(tokenizer_dir, data_dir), *extra], seed=seed)
    counts = {"real": 0, "all": 0}

    class Tokens(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            real, every = real_tokens(batch)
            counts["real"] += real
            counts["all"] += every

    timer = lightning_timer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_epochs=epochs,
                         gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer, Tokens()])
    trainer.fit(module, datamodule=datamodule)
    result = {"seconds": timer.seconds, "samples": timer.samples, "real_tokens": counts["real"],
              "tokens": counts["all"], "steps": trainer.global_step}
    for generation in GENERATIONS if precision == "bf16-mixed" else ("32-true",):
        evaluator = pl.Trainer(accelerator="cpu", devices=1, precision=generation, logger=False,
                               enable_progress_bar=False, enable_model_summary=False)
        started = time.perf_counter()
        scores = evaluator.test(module, datamodule=datamodule, verbose=False)[0]
        seconds = time.perf_counter() - started
        rows = list(module.predictions["test"].values())
        result[generation] = {
            "generate_seconds": seconds, "sentences": len(rows), "own_bleu": scores["test/bleu"],
            "bleu": sacrebleu.corpus_bleu([r["prediction"] for r in rows], [[r["references"][0] for r in rows]]).score,
            "sample": rows[0],
        }
    return result


def hf_seq2seq_trainer(tokenizer_dir: Path, epochs: int, out: Path, train_pairs: int | None,
                       seed: int, precision: str) -> dict:
    import datasets
    import numpy as np
    from transformers import (
        AutoConfig,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        set_seed,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    set_seed(seed)
    config = AutoConfig.for_model("t5", **t5_overrides())
    # What a user writes for a fresh model and its own tokenizer (lightning_ft.backbones.match_tokenizer does this).
    config.vocab_size = len(tokenizer)
    config.pad_token_id = config.decoder_start_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForSeq2SeqLM.from_config(config)
    model.generation_config.update(num_beams=BEAMS, max_new_tokens=MAX_NEW)

    def preprocess(batch):  # run_translation.py's preprocess_function
        inputs = tokenizer(batch["de"], max_length=MAX_LEN, truncation=True)
        inputs["labels"] = tokenizer(text_target=batch["en"], max_length=MAX_LEN, truncation=True)["input_ids"]
        return inputs

    def dataset(split: str):
        de, en = read_split(split, train_pairs if split == "train" else None)
        raw = datasets.Dataset.from_dict({"de": de, "en": en})
        return raw.map(preprocess, batched=True, remove_columns=["de", "en"]), en

    train, _ = dataset("train")
    test, references = dataset("test")
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    counts = {"samples": 0, "real": 0, "all": 0}
    timer = hf_timer(counts)

    def collate(features):
        batch = collator(features)
        if model.training:
            real, every = real_tokens(batch)
            counts["samples"] += len(features)
            counts["real"] += real
            counts["all"] += every
        return batch

    args = Seq2SeqTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=2 * BATCH,
        learning_rate=LR, weight_decay=DECAY, max_grad_norm=1.0, num_train_epochs=epochs, lr_scheduler_type="linear",
        warmup_steps=WARMUP, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, seed=seed, dataloader_num_workers=0, disable_tqdm=True, bf16=precision == "bf16-mixed",
        predict_with_generate=True,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train, data_collator=collate,
                             processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    autocast = set()
    hook = model.lm_head.register_forward_hook(lambda *_: autocast.add(torch.is_autocast_enabled("cpu")))
    started = time.perf_counter()
    output = trainer.predict(test, num_beams=BEAMS, max_new_tokens=MAX_NEW)
    seconds = time.perf_counter() - started
    hook.remove()
    ids = np.where(output.predictions != -100, output.predictions, tokenizer.pad_token_id)
    texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return {"seconds": timer.seconds, "samples": timer.counts["samples"], "real_tokens": timer.counts["real"],
            "tokens": timer.counts["all"], "steps": trainer.state.global_step,
            "bf16-mixed" if autocast == {True} else "32-true": {"generate_seconds": seconds, "sentences": len(texts),
                     "bleu": sacrebleu.corpus_bleu(texts, [references]).score,
                     "sample": {"prediction": texts[0], "references": [references[0]]}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="5 take the HF side about 32 minutes here")
    parser.add_argument("--train-pairs", type=int, default=None, help="use the first N training pairs (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    parser.add_argument("--sides", nargs="+", default=["hf_trainer", "lightning_ft"], choices=list(SIDES),
                        help="hf_trainer is the peer of every ratio and always runs")
    parser.add_argument("--seed", type=int, default=42, help="both sides' seed: model init, data order, dropout")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--lightning-ft-override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for the lightning_ft side, e.g. dataset.group_by_length=false")
    parser.add_argument("--reuse-hf-run", default=None, metavar="FOLDER",
                        help="the run folder of an earlier run: its data, tokenizer and HF result; only lightning_ft "
                             "trains (the timings of the two sides then come from different runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reused = Path(args.reuse_hf_run) if args.reuse_hf_run else None
    folder = reused or Path(tempfile.mkdtemp(prefix="seq2seq_bench_"))
    print(f"run folder: {folder}", flush=True)
    data_dir = folder / "multi30k"
    runs = {}
    if reused:  # its data, tokenizer and HF result (Unigram training is not deterministic: a new one would differ)
        runs["hf_trainer"] = json.loads((folder / "hf_trainer.json").read_text())
        if "fp32" in runs["hf_trainer"]:  # older runs saved their generation as "fp32"; it ran under bf16 autocast
            runs["hf_trainer"]["bf16-mixed"] = runs["hf_trainer"].pop("fp32")
    else:
        prepare_folder(folder, args.train_pairs)

    precision = PRECISIONS[args.precision]
    for side in ["hf_trainer", *[s for s in args.sides if s != "hf_trainer"]]:
        if side in runs:
            continue
        if side == "hf_trainer":
            runs[side] = hf_seq2seq_trainer(folder / "tokenizer", args.epochs, folder / "hf", args.train_pairs,
                                            args.seed, precision)
        else:
            runs[side] = lightning_ft_translation(folder / "tokenizer", data_dir, args.epochs,
                                                  [*SIDES[side], *args.lightning_ft_override], args.seed, precision)
        (folder / f"{side}.json").write_text(json.dumps(runs[side], indent=1, ensure_ascii=False))
        print(side, json.dumps(runs[side], ensure_ascii=False), flush=True)

    hf = runs["hf_trainer"]
    ours = next(r for side, r in runs.items() if side != "hf_trainer")
    base_rate, base_tokens = hf["samples"] / hf["seconds"], hf["real_tokens"] / hf["seconds"]
    hf_generation = next(hf[p] for p in GENERATIONS if p in hf)
    base_generation = hf_generation["sentences"] / hf_generation["generate_seconds"]
    lines = [
        f"\nMulti30k de->en, {ours['samples'] // args.epochs:,} training pairs, {args.epochs} epochs "
        f"({ours['steps']} / {hf['steps']} steps); test_2016_flickr ({hf_generation['sentences']:,} sentences), beam "
        f"{BEAMS}, at most {MAX_NEW} new tokens:\n",
        "| run | test BLEU | train pairs/s | real tokens/s | ratio | padding | train minutes | "
        "test generation (sentences/s, precision) | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for side, r in runs.items():
        rate, tokens = r["samples"] / r["seconds"], r["real_tokens"] / r["seconds"]
        generations = [(p, r[p]) for p in GENERATIONS if p in r]
        for i, (precision, g) in enumerate(generations):
            speed = g["sentences"] / g["generate_seconds"]
            padding = 1 - r["real_tokens"] / r["tokens"]
            training = (f"{rate:.1f} | {tokens:.0f} | {tokens / base_tokens:.2f} | {padding:.1%} | "
                        f"{r['seconds'] / 60:.1f}") if i == 0 else " | | | |"
            lines.append(f"| {side} | {g['bleu']:.2f} | {training} | {speed:.1f} ({precision}) | "
                         f"{speed / base_generation:.2f} |")
    for side, r in runs.items():
        if side == "hf_trainer":
            continue
        own = [f"{r[p]['own_bleu']:.2f} / {r[p]['bleu']:.2f} ({p})" for p in GENERATIONS if p in r]
        lines.append(f"\n{side}: its own test/bleu metric / sacreBLEU on its predictions: {'; '.join(own)}. Train "
                     f"pairs/s ratio: {r['samples'] / r['seconds'] / base_rate:.2f}. First test sentence: "
                     f"\"{next(r[p] for p in GENERATIONS if p in r)['sample']['prediction']}\".")
    lines.append(f"\nFirst test sentence: HF \"{hf_generation['sample']['prediction']}\"; reference "
                 f"\"{hf_generation['sample']['references'][0]}\".")
    lines.append("")
    pairs = f", {args.train_pairs} pairs" if args.train_pairs else ""
    for side, r in runs.items():  # BLEU of the generation in the training's precision, which every side has
        lines.append(summary_line(
            f"Multi30k de->en, small T5 from scratch{pairs}, {args.epochs} epochs, {args.precision}", side,
            "hf_trainer", r["samples"] / r["seconds"], "pairs/s", r["samples"] / r["seconds"] / base_rate,
            f"test BLEU {next(r[p] for p in GENERATIONS if p in r)['bleu']:.2f} (seed {args.seed})", 1))
    report = "\n".join([
        *report_heading("Translation from scratch (Multi30k de->en, small T5) vs the HF Seq2SeqTrainer", __file__),
        f"{Path(__file__).name} docstring: what each side does. Sides ran one after another in this order: "
        f"{', '.join(runs)}; seed {args.seed}.",
        *lines,
        "",
    ])
    append_report(args.results, report)


if __name__ == "__main__":
    main()
