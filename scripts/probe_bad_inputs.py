"""Probe lightning_ft with bad or awkward inputs, as a new user would, and print a verdict for each.

    python scripts/probe_bad_inputs.py [--out probe.md]

Each case runs the real command line (``python -m lightning_ft.train`` or ``lightning_ft.predict``) in a scratch
folder with a tiny model. Verdicts: ``clear error`` (exit 2, one ``error:`` line, no traceback), ``ran`` (exit 0:
the input was handled), ``traceback`` or ``other``. Takes a few minutes on 2 cores (one process at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

QUICK = ["backbone=tiny_bert", "debug=fast_dev_run", "~callbacks.progress_bar"]


def run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)


def verdict(done: subprocess.CompletedProcess) -> tuple[str, str]:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    if "Traceback (most recent call last)" in done.stderr:
        return "traceback", done.stderr.strip().splitlines()[-1][:160]
    if done.returncode == 0:
        return "ran", ""
    if errors:
        return "clear error", errors[-1][7:220]
    return "other", f"exit {done.returncode}: " + (done.stderr.strip().splitlines() or [""])[-1][:160]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cases(root: Path) -> list[tuple[str, str, list[str], str]]:
    """(what, module, arguments, expected verdict)."""
    tsv = "sentence\tlabel\n" + "".join(f"{w} film\t{i % 2}\n" for i, w in enumerate(["good", "bad"] * 8))
    good = root / "good"
    write(good / "train.tsv", tsv)
    write(good / "validation.tsv", tsv)
    no_label = root / "no_label"
    write(no_label / "train.tsv", "sentence\n" + "a film\n" * 8)
    write(no_label / "validation.tsv", "sentence\n" + "a film\n" * 4)
    unseen = root / "unseen"
    write(unseen / "train.tsv", tsv)
    write(unseen / "validation.tsv", "sentence\tlabel\nodd film\t7\n")
    empty = root / "empty"
    write(empty / "train.tsv", "")
    write(empty / "validation.tsv", tsv)
    nothing = root / "nothing"
    nothing.mkdir()
    write(nothing / "notes.txt", "no data here\n")
    no_val = root / "no_val"
    write(no_val / "train.tsv", tsv + tsv.split("\n", 1)[1])
    two_train = root / "two_train"
    write(two_train / "train.tsv", tsv)
    write(two_train / "train.csv", tsv.replace("\t", ","))
    write(two_train / "validation.tsv", tsv)
    bak = root / "bak"
    write(bak / "train.tsv", tsv)
    write(bak / "train.bak.tsv", "sentence\tlabel\nold\t0\n")
    write(bak / "validation.tsv", tsv)
    bad_json = root / "bad_json"
    write(bad_json / "train.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n')
    write(bad_json / "validation.jsonl", '{"text": "good", "label": 1}\n')
    headerless = root / "headerless"
    write(headerless / "train.csv", "".join(f'"{i % 2}","title {i}","a description"\n' for i in range(16)))
    write(headerless / "validation.csv", "".join(f'"{i % 2}","title {i}","a description"\n' for i in range(4)))
    conll = root / "conll"
    write(conll / "train.conll", "EU\tB-ORG\nrejects\tO\n\nPeter\tB-PER\tEXTRA\n")
    write(conll / "validation.conll", "EU\tB-ORG\n")
    file_dir = write(root / "a_file", "mine\n")
    truncated = write(root / "truncated.ckpt", "PK\x03\x04 not really")
    not_ckpt = root / "tensor.ckpt"
    import torch

    torch.save({"weights": torch.zeros(2)}, not_ckpt)

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {root / 'PWNED'}",)

    crafted = root / "crafted.ckpt"
    torch.save({"state_dict": {}, "x": RunsCode()}, crafted)
    rows = write(root / "in.jsonl", '{"text": "a good film"}\n')
    latin = root / "latin.csv"
    latin.write_bytes("text\ncaf\xe9 cr\xe8me\n".encode("latin-1"))
    bom = root / "bom.csv"
    bom.write_bytes("\ufefftext\na good film\n".encode())
    ragged = write(root / "ragged.csv", "text\na good film,extra\n")
    existing = write(root / "existing.jsonl", '{"mine": 1}\n')
    unknown_ext = write(root / "in.xyz", "a good film\n")

    data = [f"dataset.data_dir={good}"]
    train, predict = "lightning_ft.train", "lightning_ft.predict"
    return [
        ("data_dir that does not exist", train, [*QUICK, "dataset.data_dir=/nonexistent/data"], "clear error"),
        ("data_dir with no split files", train, [*QUICK, f"dataset.data_dir={nothing}"], "clear error"),
        ("label column missing", train, [*QUICK, f"dataset.data_dir={no_label}"], "clear error"),
        ("validation label unseen in training", train, [*QUICK, f"dataset.data_dir={unseen}"], "clear error"),
        ("empty train file", train, [*QUICK, f"dataset.data_dir={empty}"], "clear error"),
        ("no validation split", train, [*QUICK, f"dataset.data_dir={no_val}"], "clear error"),
        ("no validation split, val_fraction given", train, [*QUICK, f"dataset.data_dir={no_val}",
                                                             "dataset.val_fraction=0.25"], "ran"),
        ("two train files", train, [*QUICK, f"dataset.data_dir={two_train}"], "clear error"),
        ("a stale train.bak.tsv beside train.tsv", train, [*QUICK, f"dataset.data_dir={bak}"], "ran"),
        ("malformed jsonl line", train, [*QUICK, f"dataset.data_dir={bad_json}"], "clear error"),
        ("header-less csv", train, [*QUICK, f"dataset.data_dir={headerless}", "dataset.text_column=title"],
         "clear error"),
        ("header-less csv with column_names", train, [*QUICK, f"dataset.data_dir={headerless}",
                                                       "dataset.column_names=[label,title,description]",
                                                       "dataset.text_column=[title,description]"], "ran"),
        ("CoNLL line with an extra column", train, [*QUICK, "task=ner", f"dataset.data_dir={conll}"],
         "clear error"),
        ("text_pair_column on the default dataset", train, [*QUICK, "dataset.text_pair_column=sentence"], "ran"),
        ("unknown task", train, [*QUICK, "task=nosuch"], "clear error"),
        ("unknown backbone config", train, ["backbone=nosuch", "debug=fast_dev_run"], "clear error"),
        ("backbone directory that does not exist", train, [*QUICK, "backbone.name=/nonexistent/model"],
         "clear error"),
        ("mistyped top-level key", train, [*QUICK, *data, "+monitr=val/accuracy"], "clear error"),
        ("mistyped dataset key", train, [*QUICK, *data, "dataset.val_fractio=0.1"], "clear error"),
        ("max_epochs not a number", train, [*QUICK, *data, "trainer.max_epochs=abc"], "clear error"),
        ("negative learning rate", train, [*QUICK, *data, "optim.lr=-1"], "clear error"),
        ("learning rate not a number", train, [*QUICK, *data, "optim.lr=fast"], "clear error"),
        ("batch size 0", train, [*QUICK, *data, "dataset.batch_size=0"], "clear error"),
        ("seed not a number", train, [*QUICK, *data, "seed=abc"], "clear error"),
        ("max_length -1", train, [*QUICK, *data, "dataset.max_length=-1"], "clear error"),
        ("max_length 100000 (beyond the positions)", train, [*QUICK, *data, "dataset.max_length=100000"],
         "clear error"),
        ("monitor the task does not log", train, [*QUICK, *data, "debug=limit", "monitor=val/acc",
                                                  "monitor_mode=max"], "clear error"),
        ("monitor_mode not min or max", train, [*QUICK, *data, "monitor_mode=sideways"], "clear error"),
        ("max_epochs 0", train, [*QUICK, *data, "trainer.max_epochs=0", "~debug"], "clear error"),
        ("unknown tag scheme option", train, [*QUICK, "task=ner", "dataset.unseen_tags=maybe"], "clear error"),
        ("unknown problem type", train, [*QUICK, *data, "dataset.problem_type=wrong"], "clear error"),
        ("ckpt_path that does not exist", train, [*QUICK, *data, "ckpt_path=/nonexistent.ckpt"], "clear error"),
        ("ckpt_path that is a directory", train, [*QUICK, *data, f"ckpt_path={root}"], "clear error"),
        ("truncated checkpoint", train, [*QUICK, *data, f"ckpt_path={truncated}"], "clear error"),
        ("a torch file that is not a checkpoint", train, [*QUICK, *data, f"ckpt_path={not_ckpt}"], "clear error"),
        ("a checkpoint that would run code", train, [*QUICK, *data, f"ckpt_path={crafted}"], "clear error"),
        ("resume not a choice", train, [*QUICK, *data, "resume=maybe"], "clear error"),
        ("run_dir that is a file", train, [*QUICK, *data, f"run_dir={file_dir}"], "clear error"),
        ("hydra.run.dir apart from run_dir", train, [*QUICK, *data, f"run_dir={root / 'r1'}",
                                                    f"hydra.run.dir={root / 'r2'}"], "clear error"),
        ("GPU trainer on a CPU machine", train, [*QUICK, *data, "trainer=gpu"], "clear error"),
        ("unknown logger", train, [*QUICK, *data, "logger=nosuch"], "clear error"),
        ("predict: no model", predict, [f"input={rows}", f"output={root / 'o1.jsonl'}"], "clear error"),
        ("predict: model_dir that does not exist", predict, ["model_dir=/nonexistent", f"input={rows}",
                                                             f"output={root / 'o2.jsonl'}"], "clear error"),
        ("predict: a sentence-transformers model (no head: embeds)", predict,
         ["model_dir=sentence-transformers/all-MiniLM-L6-v2", f"input={rows}", f"output={root / 'o3.jsonl'}"], "ran"),
        ("predict: a bare backbone with no task head", predict, ["model_dir=BARE", f"input={rows}",
                                                                 f"output={root / 'o3b.jsonl'}"], "clear error"),
        ("predict: a checkpoint that would run code", predict, [f"ckpt_path={crafted}", f"input={rows}",
                                                                f"output={root / 'o4.jsonl'}"], "clear error"),
        ("predict: input that does not exist", predict, ["model_dir=/nonexistent", "input=/nonexistent.jsonl",
                                                         f"output={root / 'o5.jsonl'}"], "clear error"),
        ("predict: output exists", predict, ["model_dir=MODEL", f"input={rows}", f"output={existing}"],
         "clear error"),
        ("predict: output is the input", predict, ["model_dir=MODEL", f"input={rows}", f"output={rows}",
                                                   "overwrite=true"], "clear error"),
        ("predict: input not UTF-8", predict, ["model_dir=MODEL", f"input={latin}", f"output={root / 'o6.jsonl'}"],
         "clear error"),
        ("predict: a CSV with a byte-order mark", predict, ["model_dir=MODEL", f"input={bom}",
                                                            f"output={root / 'o7.jsonl'}"], "ran"),
        ("predict: a ragged CSV row", predict, ["model_dir=MODEL", f"input={ragged}", f"output={root / 'o8.jsonl'}"],
         "clear error"),
        ("predict: unknown option", predict, ["model_dir=MODEL", f"input={rows}", f"output={root / 'o9.jsonl'}",
                                              "colum=text"], "clear error"),
        ("predict: a model of another task", predict, ["model_dir=MODEL", f"input={rows}",
                                                       f"output={root / 'o10.jsonl'}", "task=qa"], "clear error"),
        ("predict: batch_size 0", predict, ["model_dir=MODEL", f"input={rows}", f"output={root / 'o11.jsonl'}",
                                            "batch_size=0"], "clear error"),
        ("predict: device cuda without a GPU", predict, ["model_dir=MODEL", f"input={rows}",
                                                         f"output={root / 'o12.jsonl'}", "device=cuda"],
         "clear error"),
        ("predict: input of an unknown extension", predict, ["model_dir=MODEL", f"input={unknown_ext}",
                                                             f"output={root / 'o13.jsonl'}"], "clear error"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lft-probe-"))
    model_run = root / "model"
    trained = run("lightning_ft.train", [*QUICK, "debug=limit", "trainer.max_epochs=1", f"run_dir={model_run}"], root)
    if trained.returncode != 0:
        print(trained.stderr[-2000:], file=sys.stderr)
        return 1
    bare = root / "bare"  # a backbone saved without a task head (no modules.json either)
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from lightning_ft.backbones import resolve_name

    name = resolve_name("sentence-transformers/all-MiniLM-L6-v2")
    AutoModel.from_config(AutoConfig.from_pretrained(name, num_hidden_layers=1)).save_pretrained(bare)
    AutoTokenizer.from_pretrained(name).save_pretrained(bare)
    lines = ["| # | input | expected | verdict | what the user saw |", "|---|---|---|---|---|"]
    misses = 0
    for number, (what, module, arguments, expected) in enumerate(cases(root), start=1):
        arguments = [a.replace("model_dir=MODEL", f"model_dir={model_run}").replace("model_dir=BARE",
                                                                                  f"model_dir={bare}")
                     for a in arguments]
        found, said = verdict(run(module, arguments, root))
        misses += found != expected
        lines.append(f"| {number} | {what} | {expected} | {found}{'' if found == expected else ' (!)'} | "
                     f"{said.replace('|', '/')} |")
        print(lines[-1], flush=True)
    pwned = (root / "PWNED").exists()
    lines.append(f"\n{len(lines) - 2} inputs; {misses} differ from what was expected; code ran from a checkpoint: "
                 f"{'YES' if pwned else 'no'}.")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    print(json.dumps({"root": str(root)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
