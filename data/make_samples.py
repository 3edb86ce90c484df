"""Rebuild the embedded samples from the real datasets in ../shared/data (run from the project root).

The samples are fixed random subsets (seed 0) so the default commands run offline in a few minutes.
"""

import csv
import json
import random
from pathlib import Path

SHARED = Path("../shared/data")
OUT = Path(__file__).parent
WNUT_TRAIN = 2000
SQUAD_ARTICLES = {"train": ["Normans", "Southern_California", "Sky_(United_Kingdom)"],
                  "validation": ["1973_oil_crisis"], "test": ["Packet_switching"]}


def read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def main() -> None:
    rng = random.Random(0)
    # SST-2: train and validation are disjoint draws from GLUE train; test is the whole GLUE dev split (872).
    # Labels as words, so the sample's config needs no label_names that would stick to a user's own data_dir.
    names = {"0": "negative", "1": "positive"}
    header, rows = read_tsv(SHARED / "glue_sst2/train.tsv")
    rows = [[r[0].strip(), names[r[1]]] for r in rows]
    picked = rng.sample(rows, 1500)
    write_tsv(OUT / "sst2/train.tsv", header, picked[:1200])
    write_tsv(OUT / "sst2/validation.tsv", header, picked[1200:])
    header, rows = read_tsv(SHARED / "glue_sst2/dev.tsv")
    write_tsv(OUT / "sst2/test.tsv", header, [[r[0].strip(), names[r[1]]] for r in rows])

    # STS-B: sentence pairs with a float score; train from GLUE train, validation/test from GLUE dev.
    header, rows = read_tsv(SHARED / "glue_stsb/train.tsv")
    keep = ["sentence1", "sentence2", "score"]
    idx = [header.index(k) for k in keep]
    train = [[r[i] for i in idx] for r in rng.sample(rows, 800)]
    header, rows = read_tsv(SHARED / "glue_stsb/dev.tsv")
    dev = [[r[i] for i in idx] for r in rng.sample(rows, 400)]
    write_tsv(OUT / "stsb/train.tsv", keep, train)
    write_tsv(OUT / "stsb/validation.tsv", keep, dev[:200])
    write_tsv(OUT / "stsb/test.tsv", keep, dev[200:])

    # WNUT-17 (CC BY 4.0): token<TAB>tag CoNLL files. Train: a random subset of the train split; validation: a
    # random subset of dev; test: the whole official test split (1,287 sentences).
    def sentences(path: Path) -> list[list[str]]:
        blocks, current = [], []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                current.append(line)
            elif current:
                blocks.append(current)
                current = []
        return blocks + ([current] if current else [])

    def write_conll(path: Path, blocks: list[list[str]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join("\n".join(b) + "\n\n" for b in blocks), encoding="utf-8")

    wnut = SHARED / "wnut17"
    write_conll(OUT / "wnut17/train.conll", rng.sample(sentences(wnut / "wnut17train.conll"), WNUT_TRAIN))
    write_conll(OUT / "wnut17/validation.conll", rng.sample(sentences(wnut / "emerging.dev.conll"), 400))
    write_conll(OUT / "wnut17/test.conll", sentences(wnut / "emerging.test.annotated"))

    # SQuAD v1.1 (CC BY-SA 4.0): whole articles of the dev file, in its own JSON format. All are among the first 38
    # articles, which benchmarks/squad_vs_hf.py trains on; it evaluates on the last 10.
    squad = json.loads((SHARED / "squad_v1.1/dev-v1.1.json").read_text(encoding="utf-8"))
    articles = {a["title"]: a for a in squad["data"]}
    for split, titles in SQUAD_ARTICLES.items():
        document = {"version": squad["version"], "data": [articles[t] for t in titles]}
        path = OUT / f"squad/{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")

    # OpenBookQA (Apache-2.0), main JSONL: random draws from its train, dev and test splits.
    for split, source, count in (("train", "train", 1000), ("validation", "dev", 200), ("test", "test", 200)):
        lines = (SHARED / f"openbookqa/main/{source}.jsonl").read_text(encoding="utf-8").splitlines()
        path = OUT / f"openbookqa/{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rng.sample([ln for ln in lines if ln.strip()], count)) + "\n", encoding="utf-8")

    # Multi30k task 1 (no licence stated; research/education use, cited in README.md): German-English parallel text,
    # a sentence a line. Train: a random draw from train; validation from val; test from test_2016_flickr.
    import gzip

    multi30k = SHARED / "multi30k"
    for split, source, count in (("train", "train", 2000), ("validation", "val", 200),
                                 ("test", "test_2016_flickr", 200)):
        texts = {}
        for lang in ("de", "en"):
            with gzip.open(multi30k / f"{source}.{lang}.gz", "rt", encoding="utf-8") as handle:
                texts[lang] = handle.read().splitlines()
        picked = sorted(rng.sample(range(len(texts["de"])), count))
        for lang, lines in texts.items():
            path = OUT / f"multi30k/{split}.{lang}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(lines[i] + "\n" for i in picked), encoding="utf-8")

    # SciTLDR-A (Apache-2.0): abstracts (a list of sentences) and their TLDRs (one in train, several in dev/test).
    for split, source, count in (("train", "train", 300), ("validation", "dev", 60), ("test", "test", 60)):
        rows = [json.loads(ln) for ln in (SHARED / f"scitldr/{source}.jsonl").read_text(encoding="utf-8").splitlines()
                if ln.strip()]
        picked = [rows[i] for i in sorted(rng.sample(range(len(rows)), count))]
        path = OUT / f"scitldr/{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({k: r[k] for k in ("paper_id", "source", "target")}, ensure_ascii=False)
                                + "\n" for r in picked), encoding="utf-8")

    # Tiny Shakespeare (public-domain text): consecutive speeches (blank-line separated) from the start of the
    # corpus, cut at speech boundaries: about 230 KB / 23 KB / 23 KB.
    speeches = (SHARED / "tiny_shakespeare/input.txt").read_text(encoding="utf-8").split("\n\n")
    write_text_splits("tiny_shakespeare", speeches, "\n\n", (230_000, 23_000, 23_000))

    # WikiText-2 (CC BY-SA 3.0), tokenized v1: whole articles (from one " = Title = " line to the next) of its
    # validation split, one paragraph a line: about 230 KB / 30 KB / 30 KB.
    articles, current = [], []
    for line in (SHARED / "wikitext2/wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith(" = ") and not line.startswith(" = = ") and current:
            articles.append("".join(current))
            current = []
        current.append(line)
    articles.append("".join(current))
    write_text_splits("wikitext2", articles, "", (230_000, 30_000, 30_000))
    gsm8k()


def gsm8k() -> None:
    """GSM8K (MIT): 120 training and 40 validation problems, disjoint draws from its train split, and 40 test
    problems from its test split, unchanged (question, answer), with the licence beside them."""
    rng = random.Random(0)
    source = SHARED / "gsm8k"
    train = (source / "train.jsonl").read_text(encoding="utf-8").splitlines()
    test = (source / "test.jsonl").read_text(encoding="utf-8").splitlines()
    picked = rng.sample(range(len(train)), 160)
    out = OUT / "gsm8k"
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", [train[i] for i in sorted(picked[:120])]),
                         ("validation", [train[i] for i in sorted(picked[120:])]),
                         ("test", [test[i] for i in sorted(rng.sample(range(len(test)), 40))])):
        (out / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (out / "LICENSE").write_text((source / "LICENSE").read_text(encoding="utf-8"), encoding="utf-8")


def write_text_splits(folder: str, parts: list[str], joiner: str, sizes: tuple[int, int, int]) -> None:
    """Consecutive ``parts`` into train/validation/test.txt of about ``sizes`` characters each."""
    start = 0
    for split, size in zip(("train", "validation", "test"), sizes):
        taken, length = [], 0
        while length < size and start < len(parts):
            taken.append(parts[start])
            length += len(parts[start]) + len(joiner)
            start += 1
        path = OUT / f"{folder}/{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(joiner.join(taken).strip("\n") + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
