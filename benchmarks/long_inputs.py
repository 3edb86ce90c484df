"""Long inputs: CoNLL-2003 NER at a short max_length, sentences truncated (the default) vs read in windows.

MiniLM fine-tuned on CoNLL-2003 train for one epoch with ``dataset.max_length`` (32 by default, so a sizeable share
of sentences is longer), once with ``dataset.long_inputs=truncate`` and once with ``window`` (``dataset.stride``),
the same seed, the task's shipped settings otherwise (packed batches, lr 1e-4). Both are scored on the CoNLL-2003
test file: entity F1 over all sentences, and over the sentences longer than max_length alone, where the two
differ (a truncated run tags the words past the limit ``O``; a windowed one reads them in a second window). The
windowed model is also scored truncated, and the truncated one windowed, to separate what the reading at test time
does from what training on windows does.

    python benchmarks/long_inputs.py --max-length 32 --stride 8
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    append_report,
    lightning_ft_module,
    lightning_timer,
    metric_words,
    report_heading,
    summary_line,
    timed_trainer,
)

DATA = ROOT.parent / "shared" / "data" / "conll2003"


def scores(model, tokenizer, sentences, gold, labels, max_length: int, stride: int | None) -> float:
    from lightning_ft.metrics.entity import EntityScores
    from lightning_ft.tasks.ner.model import tag_sentences

    tags, _ = tag_sentences(model, tokenizer, sentences, batch_size=64, max_length=max_length, stride=stride)
    metric = EntityScores(labels)
    metric.update(tags, gold)
    return float(metric.compute()["f1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lightning_ft.data.conll import read_conll

    test = read_conll(DATA / "test.txt")
    sentences, gold = test["tokens"], test["ner_tags"]
    rows = []
    for seed in args.seeds:
        for mode in ("truncate", "window"):
            module, datamodule = lightning_ft_module(
                ["task=ner", "dataset=conll2003", f"dataset.data_dir={DATA}", f"dataset.max_length={args.max_length}",
                 f"dataset.long_inputs={mode}", f"dataset.stride={args.stride}"], seed)
            timer = lightning_timer()
            trainer = timed_trainer(timer, max_epochs=args.epochs, precision="bf16-mixed")
            trainer.fit(module, datamodule=datamodule)
            tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
            tokenizer = datamodule.tokenizer
            long = [i for i, words in enumerate(sentences)
                    if len(tokenizer(words, is_split_into_words=True)["input_ids"]) > args.max_length]
            labels = list(module.id2label.values())
            model = module.model.eval()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                read = {name: scores(model, tokenizer, [sentences[i] for i in long], [gold[i] for i in long], labels,
                                     args.max_length, stride)
                        for name, stride in (("truncated", None), ("windowed", args.stride))}
            rows.append({"seed": seed, "mode": mode, "f1": tested["test/f1"], "long": len(long),
                         "long_truncated": read["truncated"], "long_windowed": read["windowed"],
                         "seconds": timer.seconds, "samples": timer.samples})
            print(rows[-1], flush=True)
    total = len(sentences)
    lines = [*report_heading("Long inputs: CoNLL-2003 NER at a short max_length, truncated vs windowed", __file__),
             "",
             f"Work: MiniLM, {args.epochs} epoch(s) on CoNLL-2003 train (14,041 sentences) at dataset.max_length="
             f"{args.max_length}, shipped NER settings otherwise (packed batches, lr 1e-4), bf16; "
             f"dataset.long_inputs=truncate vs window (stride {args.stride}), the same seed a pair. Test: the "
             f"CoNLL-2003 test file ({total} sentences, of which {rows[0]['long']} are longer than "
             f"{args.max_length} sub-tokens with [CLS] and [SEP]).",
             "",
             "| seed | trained with | test F1, as trained (all sentences) | long sentences: F1 read truncated | "
             "long sentences: F1 read in windows | train examples/s | train minutes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['mode']} | {r['f1']:.4f} | {r['long_truncated']:.4f} | "
                     f"{r['long_windowed']:.4f} | {r['samples'] / r['seconds']:.1f} | {r['seconds'] / 60:.1f} |")
    lines.append("\nTrain examples are windows for the windowed run (a long sentence gives two or more).\n")
    by_mode = {mode: [r for r in rows if r["mode"] == mode] for mode in ("truncate", "window")}
    base = statistics.median(r["samples"] / r["seconds"] for r in by_mode["truncate"])
    for mode, results in by_mode.items():
        rate = statistics.median(r["samples"] / r["seconds"] for r in results)
        reference = None if mode == "truncate" else [r["f1"] for r in by_mode["truncate"]]
        lines.append(summary_line(
            f"Long inputs, CoNLL-2003 NER, MiniLM at max_length {args.max_length}, {args.epochs} epoch(s), bf16",
            f"long_inputs={mode}", "long_inputs=truncate", rate, "examples/s", rate / base,
            metric_words("test F1", [r["f1"] for r in results], reference)
            + f"; long sentences read in windows {statistics.fmean(r['long_windowed'] for r in results):.4f}",
            len(results)))
    lines.append("")
    append_report(args.results, "\n".join(lines))


if __name__ == "__main__":
    main()
