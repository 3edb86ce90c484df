"""Causal-LM pretraining from scratch: lightning_ft against the HF ``run_clm.py`` recipe on the ``Trainer``, in one run.

Two corpora from ../shared/data: Tiny Shakespeare (the first 90% of its speeches train, the last 10% evaluate) and
WikiText-2 (only its valid and test files are here: train on valid, evaluate on test). For each, one byte-level BPE
tokenizer of 8,000 tokens is trained on the training text by ``lightning_ft.tokenizer_training`` and both sides use
it, with the same small GPT-2 from a config (``conf/backbone/gpt2_small_scratch.yaml``: 4 layers, 256 wide) and seed
42 (--seed), the same blocks of 128 tokens, batch 32, steps, AdamW (lr 1e-3, weight decay 0.01, none on biases
and norms), linear schedule with 5% warmup, clipping at 1.0 and bf16 autocast,
and no evaluation inside the timed training.

- HF side: ``run_clm.py`` written out: ``load_dataset("text")``, its ``tokenize_function`` and ``group_texts`` (labels
  a copy of the inputs), ``default_data_collator``, ``Trainer(max_steps=...)``, then ``trainer.evaluate()``: perplexity
  = exp(eval_loss). One change so both sides train on identical blocks: each document gets the tokenizer's eos token
  appended, as lightning_ft does (run_clm relies on GPT-2's tokenizer for document ends; a trained tokenizer has none).
- lightning_ft side: ``task=clm`` with ``dataset=tiny_shakespeare`` or ``dataset=wikitext2``, a Lightning Trainer with
  ``max_steps``, then ``trainer.validate``: corpus perplexity from summed token losses.

Both trained models are then scored by one shared loop (exp of the summed token loss over every evaluation block), so
the perplexities compare like for like. Throughput: training tokens/s (steps x 32 x 128: every block is full) over the
timed training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    append_report,
    hf_timer,
    lightning_ft_module,
    lightning_timer,
    report_heading,
    summary_line,
    timed_trainer,  # noqa: E402
)

SHARED = ROOT.parent / "shared" / "data"
BLOCK, BATCH, LR, DECAY, WARMUP, VOCAB = 128, 32, 1e-3, 0.01, 0.05, 8000


def corpus(name: str, folder: Path) -> tuple[Path, str]:
    """Write the corpus as train.txt / validation.txt in ``folder``; return it and what a document is."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "tiny_shakespeare":
        speeches = (SHARED / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8").split("\n\n")
        cut = int(len(speeches) * 0.9)
        (folder / "train.txt").write_text("\n\n".join(speeches[:cut]) + "\n", encoding="utf-8")
        (folder / "validation.txt").write_text("\n\n".join(speeches[cut:]), encoding="utf-8")
        return folder, "paragraph"
    for split, source in (("train", "wiki.valid.tokens"), ("validation", "wiki.test.tokens")):
        (folder / f"{split}.txt").write_text((SHARED / "wikitext2" / source).read_text(encoding="utf-8"),
                                             encoding="utf-8")
    return folder, "line"


def gpt2_config(tokenizer):
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    overrides = dict(OmegaConf.load(ROOT / "conf" / "backbone" / "gpt2_small_scratch.yaml").config_overrides)
    config = AutoConfig.for_model("gpt2", **overrides)
    # What a user writes for a fresh model and its own tokenizer (lightning_ft.backbones.match_tokenizer does this).
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def shared_perplexity(model, blocks: list[list[int]]) -> float:
    """exp(summed token loss / predicted tokens) over every block: the one yardstick for both sides."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), 64):
            ids = torch.tensor(blocks[start:start + 64])
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def lightning_ft_clm(name: str, data_dir: Path, documents: str, tokenizer_dir: Path, steps: int, seed: int) -> dict:
    overrides = ["task=clm", f"dataset={name}", f"dataset.data_dir={data_dir}", f"dataset.documents={documents}",
                 f"backbone.tokenizer={tokenizer_dir}", "~backbone.train_tokenizer", f"dataset.block_size={BLOCK}",
                 f"dataset.batch_size={BATCH}", f"optim.lr={LR}", f"optim.weight_decay={DECAY}",
                 f"scheduler.warmup_ratio={WARMUP}"]
    module, datamodule = lightning_ft_module(overrides, seed=seed)
    timer = lightning_timer()
    timed_trainer(timer, precision="bf16-mixed", max_steps=steps).fit(module, datamodule=datamodule)
    import pytorch_lightning as pl

    evaluator = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                           enable_progress_bar=False, enable_model_summary=False)
    module.show_examples = 0
    own = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]["val/perplexity"]
    blocks = datamodule.datasets["validation"]["input_ids"]
    return {"seconds": timer.seconds, "tokens": timer.tokens, "steps": steps, "own_perplexity": own,
            "perplexity": shared_perplexity(module.model, blocks), "train_blocks": len(datamodule.datasets["train"]),
            "eval_blocks": len(blocks), "blocks": blocks}


def hf_run_clm(data_dir: Path, documents: str, tokenizer_dir: Path, steps: int, out: Path, seed: int) -> dict:
    from itertools import chain

    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    set_seed(seed)
    model = AutoModelForCausalLM.from_config(gpt2_config(tokenizer))
    raw = datasets.load_dataset("text", data_files={"train": str(data_dir / "train.txt"),
                                                    "validation": str(data_dir / "validation.txt")},
                                sample_by=documents)

    def tokenize_function(examples):  # run_clm's, plus the eos both sides put after each document
        output = tokenizer(examples["text"], return_attention_mask=False)
        # A blank line is no document (lightning_ft skips it); kept as an empty row so that group_texts packs the
        # same 1,000-line batches as lightning_ft does.
        return {"input_ids": [ids + [tokenizer.eos_token_id] if text.strip() else []
                              for text, ids in zip(examples["text"], output["input_ids"])]}

    def group_texts(examples):  # run_clm's
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated["input_ids"]) // BLOCK * BLOCK
        result = {k: [t[i:i + BLOCK] for i in range(0, total_length, BLOCK)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
    lm = tokenized.map(group_texts, batched=True)
    timer = hf_timer()
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=2 * BATCH,
        learning_rate=LR, weight_decay=DECAY, max_grad_norm=1.0, max_steps=steps, lr_scheduler_type="linear",
        warmup_steps=WARMUP, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, seed=seed, dataloader_num_workers=0, disable_tqdm=True, bf16=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=lm["train"], eval_dataset=lm["validation"],
                      data_collator=default_data_collator, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    own = math.exp(trainer.evaluate()["eval_loss"])
    blocks = lm["validation"]["input_ids"]
    steps_done = trainer.state.global_step
    return {"seconds": timer.seconds, "tokens": steps_done * BATCH * BLOCK, "steps": steps_done,
            "own_perplexity": own, "perplexity": shared_perplexity(model, blocks), "train_blocks": len(lm["train"]),
            "eval_blocks": len(blocks), "blocks": blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", default="tiny_shakespeare,wikitext2")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per side and corpus")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42, help="both sides: weights, order, dropout")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lightning_ft.tokenizer_training import train_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="clm_bench_"))
    print(f"run folder: {folder}", flush=True)
    lines = ["| corpus | run | perplexity (shared loop) | perplexity (its own metric) | train tokens/s | ratio | "
             "train minutes | steps | train / eval blocks |", "|---|---|---|---|---|---|---|---|---|"]
    summaries = []
    for name in args.corpora.split(","):
        data_dir, documents = corpus(name, folder / name)
        text = (data_dir / "train.txt").read_text(encoding="utf-8")
        texts = text.split("\n\n") if documents == "paragraph" else text.splitlines()
        tokenizer = train_tokenizer(texts, algorithm="bpe", vocab_size=VOCAB, add_eos=False)
        tokenizer_dir = folder / name / "tokenizer"
        tokenizer.save_pretrained(tokenizer_dir)
        runs = {"hf_trainer": hf_run_clm(data_dir, documents, tokenizer_dir, args.steps, folder / name / "hf",
                                         args.seed),
                "lightning_ft": lightning_ft_clm(name, data_dir, documents, tokenizer_dir, args.steps, args.seed)}
        same = runs["hf_trainer"].pop("blocks") == runs["lightning_ft"].pop("blocks")
        print(name, json.dumps(runs), "identical evaluation blocks:", same, flush=True)
        base = runs["hf_trainer"]["tokens"] / runs["hf_trainer"]["seconds"]
        for side, r in runs.items():
            rate = r["tokens"] / r["seconds"]
            lines.append(f"| {name} | {side} | {r['perplexity']:.2f} | {r['own_perplexity']:.2f} | {rate:.0f} | "
                         f"{rate / base:.2f} | {r['seconds'] / 60:.1f} | {r['steps']} | "
                         f"{r['train_blocks']:,} / {r['eval_blocks']:,} |")
            summaries.append(summary_line(f"CLM pretraining, small GPT-2 from scratch, {name}, {args.steps} steps",
                                          side, "hf_trainer", rate, "tokens/s", rate / base,
                                          f"perplexity {r['perplexity']:.2f} (seed {args.seed})", 1))
        lines.append(f"| {name} | | identical evaluation blocks on both sides: {same} | | | | | | |")
    report = "\n".join([
        *report_heading("Causal-LM pretraining from scratch (small GPT-2) vs HF run_clm on the Trainer", __file__),
        f"{Path(__file__).name} docstring: what each side does. Per corpus HF ran first, then lightning_ft, "
        f"seed {args.seed}.",
        "",
        *lines,
        "",
        *summaries,
        "",
    ])
    append_report(args.results, report)


if __name__ == "__main__":
    main()
