"""Where a training step's time goes: torch.profiler over lightning_ft's own training steps (shipped config, packed
batches), operators grouped into what they do, appended to RESULTS.md. Not a comparison: it answers why a speed
goal is out of reach (issue 26 asks for the breakdown).

    python benchmarks/profile_step.py --task conll --steps 20
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import ROOT, append_report, lightning_ft_module, report_heading, summary_line  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TASKS = {"sst2": ["dataset=sst2", f"dataset.data_dir={DATA / 'glue_sst2'}"],
         "conll": ["task=ner", "dataset=conll2003", f"dataset.data_dir={DATA / 'conll2003'}"]}
# Operator name fragments -> what the time is spent on (first match wins).
KINDS = [("matrix products (linear layers)", ("addmm", "mm", "matmul", "linear", "bmm", "dot")),
         ("attention (SDPA)", ("scaled_dot_product", "attention", "_softmax", "softmax")),
         ("optimizer (fused AdamW)", ("adam", "_foreach")),
         ("normalisation, GELU, dropout", ("layer_norm", "gelu", "dropout", "native_layer_norm", "bernoulli")),
         ("casts and copies (bf16 autocast)", ("to", "copy_", "_to_copy", "clone", "contiguous")),
         ("embeddings, gathers, indexing", ("embedding", "index", "gather", "scatter", "masked")),
         ("loss", ("cross_entropy", "nll_loss", "log_softmax"))]


def kind_of(name: str) -> str:
    short = name.split("::")[-1].lower()
    for kind, parts in KINDS:
        if any(short == p or short.startswith(p + "_") or (len(p) > 3 and p in short) for p in parts):
            return kind
    return "other operators"


def matmul_peak(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """The best bf16 matrix-product rate this CPU reaches with ``threads`` threads (FLOP/s): the practical peak
    that the MFU below is measured against (the vendor's figure for these cores is not on record here)."""
    import time

    a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="conll", choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # packing=true: the shipped null packs where the module allows it, which a loader made without a Trainer cannot ask
    module, data = lightning_ft_module([*TASKS[args.task], "dataset.max_train_examples=4000", "dataset.packing=true"],
                                       seed=42)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-5, fused=True)
    batches = iter(data._loader("train"))

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):  # warm-up: oneDNN kernels
        step(next(batches))
    import time

    from lightning_ft.throughput import model_shape, training_flops

    shape = model_shape(module.model)
    examples = tokens = positions = 0
    flops, seconds = 0.0, 0.0
    for _ in range(5):  # timed without the profiler: the model FLOPs utilisation
        batch = next(batches)
        lengths = batch["example_lengths"] if "example_lengths" in batch else batch["attention_mask"].sum(-1)
        flops += training_flops(*shape, lengths)
        start = time.perf_counter()
        step(batch)
        seconds += time.perf_counter() - start
    peak = matmul_peak(args.threads)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            with torch.profiler.record_function("collate"):
                batch = next(batches)
            examples += len(batch["example_lengths"]) if "example_lengths" in batch else len(batch["input_ids"])
            tokens += int(batch["example_lengths"].sum()) if "example_lengths" in batch else int(
                batch["attention_mask"].sum())
            positions += batch["input_ids"].numel()
            step(batch)
    spent: dict[str, float] = defaultdict(float)
    others: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key == "collate":
            spent["collating batches"] += event.cpu_time_total
        elif not event.key.startswith("ProfilerStep"):
            spent[kind_of(event.key)] += event.self_cpu_time_total
            if kind_of(event.key) == "other operators":
                others[event.key] += event.self_cpu_time_total
    largest = ", ".join(f"`{k}` {v / 1e3 / args.steps:.1f} ms" for k, v in
                        sorted(others.items(), key=lambda kv: -kv[1])[:8])
    total = sum(spent.values())
    rows = [f"| {kind} | {us / 1e3 / args.steps:.1f} | {us / total:.1%} |"
            for kind, us in sorted(spent.items(), key=lambda kv: -kv[1])]
    report = "\n".join([
        *report_heading(f"Where a training step's time goes: MiniLM, {args.task}, packed, bf16", __file__),
        f"Work: {args.steps} profiled training steps of the shipped config (batch 32, packed rows) after 3 warm-up "
        f"steps: {examples / args.steps:.1f} examples, {tokens / args.steps:.0f} real tokens in "
        f"{positions / args.steps:.0f} row positions a step. Self CPU time of torch.profiler's operators, grouped by "
        "what they do (the collate row is the loader's whole call).\n",
        f"Model FLOPs utilisation (5 unprofiled steps, 6 FLOPs per parameter and real token plus attention): "
        f"{flops / seconds / 1e9:.1f} GFLOP/s against this CPU's best bf16 matrix product, {peak / 1e9:.1f} GFLOP/s "
        f"({args.threads} threads, 2048x2048): **MFU {flops / seconds / peak:.1%}**.\n",
        "| spent on | ms a step | share |", "|---|---|---|", *rows, "",
        f"The largest of the other operators: {largest}.", "",
        summary_line(f"Step profile, MiniLM, {args.task}, packed, bf16", "lightning_ft", "", None, "", None,
                     f"MFU {flops / seconds / peak:.1%} of this CPU's best bf16 matrix product", 1), ""])
    append_report(args.results, report)


if __name__ == "__main__":
    main()
