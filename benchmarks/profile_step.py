"""Where a training step's time goes: torch.profiler over lightning_ft's own training steps (shipped config, packed
batches), operators grouped into what they do, and the step's phases (forward, of which the attention modules'
forward; backward; clipping and optimizer), appended to RESULTS.md. Not a comparison: it answers why a speed goal
is out of reach (issue 26 asks for the breakdown).

    python benchmarks/profile_step.py --task conll --steps 20
    python benchmarks/profile_step.py --task multi30k --steps 20   # the small T5 of seq2seq_vs_hf.py, packed pairs
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import ROOT, append_report, lightning_ft_module, report_heading, summary_line  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
# task -> (the model, as the report names it; overrides). multi30k: seq2seq_vs_hf.py's recipe, on the data and
# tokenizer its prepare_folder writes.
TASKS = {"sst2": ("MiniLM", ["dataset=sst2", f"dataset.data_dir={DATA / 'glue_sst2'}"]),
         "conll": ("MiniLM", ["task=ner", "dataset=conll2003", f"dataset.data_dir={DATA / 'conll2003'}"]),
         "multi30k": ("small T5 from scratch", [])}
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


def task_module(task: str, folder: Path):
    """The module and DataModule profiled: the shipped config with packed batches (the shipped null packs where the
    module allows it, which a loader made without a Trainer cannot ask), on the first 4,000 training examples."""
    overrides = [*TASKS[task][1], "dataset.max_train_examples=4000", "dataset.packing=true"]
    if task == "multi30k":
        from seq2seq_vs_hf import lightning_ft_overrides, prepare_folder

        prepare_folder(folder, train_pairs=None)
        overrides = [*lightning_ft_overrides(folder / "tokenizer", folder / "multi30k"), *overrides]
    return lightning_ft_module(overrides, seed=42)


def real_lengths(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each example's real tokens in a batch, packed or padded: its input (an encoder-decoder's source) and, for an
    encoder-decoder, its target (None otherwise)."""
    sources = batch["example_lengths"] if "example_lengths" in batch else batch["attention_mask"].sum(-1)
    if not getattr(model.config, "is_encoder_decoder", False):
        return sources, None
    return sources, batch["decoder_lengths"] if "decoder_lengths" in batch else (batch["labels"] != -100).sum(-1)


def training_flops_of(module, batch: dict) -> float:
    """Forward + backward FLOPs of one batch's real tokens (``lightning_ft.throughput.training_flops``); an
    encoder-decoder counts its encoder on the sources, its decoder and output layer on the targets, and
    cross-attention's scores and values like self-attention's."""
    from lightning_ft.throughput import model_shape, training_flops

    model = module.model
    sources, targets = real_lengths(model, batch)
    if targets is None:
        return training_flops(*model_shape(model), sources)
    _, layers, hidden = model_shape(model)
    encoder = sum(p.numel() for n, p in model.encoder.named_parameters() if "embed" not in n)
    decoder = sum(p.numel() for n, p in model.decoder.named_parameters() if "embed" not in n)
    output = model.get_output_embeddings().weight.numel()
    cross = 12 * layers * hidden * float((sources.double() * targets.double()).sum())
    return (training_flops(encoder, layers, hidden, sources) + training_flops(decoder + output, layers, hidden,
                                                                              targets) + cross)


def attention_scopes(model: torch.nn.Module) -> int:
    """Marks the forward of every attention module (self- and cross-attention: each module whose class name ends in
    Attention and that holds no other such module, its query/key/value/output projections included) as the profiler
    range ``attention forward``; returns how many it marked."""
    marked = 0
    for child in model.modules():
        inner = [m for m in child.modules() if m is not child and type(m).__name__.endswith("Attention")]
        if type(child).__name__.endswith("Attention") and not inner:
            scope = torch.profiler.record_function("attention forward")

            def enter(*_, scope=scope) -> None:  # a pre-hook's return value would replace the module's inputs
                scope.__enter__()

            def leave(*_, scope=scope) -> None:
                scope.__exit__(None, None, None)

            child.register_forward_pre_hook(enter)
            child.register_forward_hook(leave)
            marked += 1
    return marked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="conll", choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        module, data = task_module(args.task, Path(folder))
        module.train()
        optimizer = torch.optim.AdamW(module.parameters(), lr=5e-5, fused=True)
        batches = iter(data._loader("train"))

        def step(batch: dict) -> None:
            with torch.profiler.record_function("forward"), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = module(**batch).loss
            with torch.profiler.record_function("backward"):
                loss.backward()
            with torch.profiler.record_function("clipping and optimizer"):
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()

        for _ in range(3):  # warm-up: oneDNN kernels
            step(next(batches))
        import time

        examples = tokens = positions = 0
        flops, seconds = 0.0, 0.0
        for _ in range(5):  # timed without the profiler: the model FLOPs utilisation
            batch = next(batches)
            flops += training_flops_of(module, batch)
            start = time.perf_counter()
            step(batch)
            seconds += time.perf_counter() - start
        peak = matmul_peak(args.threads)
        marked = attention_scopes(module.model)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                with torch.profiler.record_function("collate"):
                    batch = next(batches)
                sources, targets = real_lengths(module.model, batch)
                examples += len(sources)
                tokens += int(sources.sum()) + (0 if targets is None else int(targets.sum()))
                positions += batch["input_ids"].numel() + (0 if targets is None else batch["labels"].numel())
                step(batch)
    phases = ("collate", "forward", "attention forward", "backward", "clipping and optimizer")
    spent: dict[str, float] = defaultdict(float)
    others: dict[str, float] = defaultdict(float)
    inclusive: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key in phases:
            inclusive[event.key] += event.cpu_time_total
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
    step_us = sum(inclusive[p] for p in phases if p != "attention forward")
    phase_rows = [f"| {p}{' (within forward)' if p == 'attention forward' else ''} | "
                  f"{inclusive[p] / 1e3 / args.steps:.1f} | {inclusive[p] / step_us:.1%} |" for p in phases]
    model_name = TASKS[args.task][0]
    batch_size = data.batch_size
    report = "\n".join([
        *report_heading(f"Where a training step's time goes: {model_name}, {args.task}, packed, bf16", __file__),
        f"Work: {args.steps} profiled training steps of the shipped config (batch {batch_size}, packed rows) after 3 "
        f"warm-up steps: {examples / args.steps:.1f} examples, {tokens / args.steps:.0f} real tokens in "
        f"{positions / args.steps:.0f} row positions a step (sources and targets for an encoder-decoder). Self CPU "
        "time of torch.profiler's operators, grouped by what they do (the collate row is the loader's whole call); "
        "an attention computed by SDPA's math path (dropout, a mask) shows up as its matrix products, softmax and "
        "dropout, so the phases below time it as a whole.\n",
        f"Model FLOPs utilisation (5 unprofiled steps, 6 FLOPs per parameter and real token plus attention): "
        f"{flops / seconds / 1e9:.1f} GFLOP/s against this CPU's best bf16 matrix product, {peak / 1e9:.1f} GFLOP/s "
        f"({args.threads} threads, 2048x2048): **MFU {flops / seconds / peak:.1%}**.\n",
        "| spent on | ms a step | share |", "|---|---|---|", *rows, "",
        f"The largest of the other operators: {largest}.", "",
        f"The step's phases (inclusive CPU time of each profiler range; the attention forward is the {marked} "
        "attention modules' forward calls, inside the forward; the backward of the attention is not separated):\n",
        "| phase | ms a step | share of the step |", "|---|---|---|", *phase_rows, "",
        summary_line(f"Step profile, {model_name}, {args.task}, packed, bf16", "lightning_ft", "", None, "", None,
                     f"MFU {flops / seconds / peak:.1%} of this CPU's best bf16 matrix product", 1), ""])
    append_report(args.results, report)


if __name__ == "__main__":
    main()
