"""Long inputs read in overlapping windows (dataset.long_inputs=window): text classification scores each document
once from its windows' logits, NER tags each word from its most central window; in training, evaluation and
predict, padded or packed."""

import json
import random

import pytest
import pytorch_lightning as pl
import torch
from conftest import QUICK, compose_config

from lightning_ft.metrics.entity import EntityScores
from lightning_ft.predict import main as predict_main
from lightning_ft.tasks.ner import TokenClassificationData, TokenClassificationTask
from lightning_ft.tasks.ner.data import IGNORE, word_windows
from lightning_ft.tasks.ner.model import tag_sentences
from lightning_ft.tasks.text_classification import TextClassificationData, TextClassificationTask
from lightning_ft.tasks.text_classification.model import pool_windows
from lightning_ft.tasks.text_classification.predict import predict_rows
from lightning_ft.train import train

WORDS = ["good", "bad", "film", "plot", "unbelievably", "overwhelming", "actor", "scene", "the", "a", "screenplay",
         "cinematography", "dull", "nice"]
MAX_LENGTH, STRIDE = 16, 4


def long_texts(folder, sizes: dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    """``<split>.tsv`` of 10-40 word texts whose label is their last word's sentiment: beyond 16 tokens, out of
    sight of a truncated read."""
    rng = random.Random(0)
    out = {}
    for split, n in sizes.items():
        rows = []
        for _ in range(n):
            words = rng.choices(WORDS, k=rng.randint(10, 40))
            rows.append((" ".join(words), "pos" if words[-1] in ("good", "nice") else "neg"))
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
        out[split] = rows
    return out


def validate(module, dm) -> dict:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, datamodule=dm, verbose=False)[0]


def classification_data(folder, tokenizer, **kwargs) -> TextClassificationData:
    dm = TextClassificationData(tokenizer=tokenizer, data_dir=str(folder), batch_size=4, max_length=MAX_LENGTH,
                                text_column="sentence", long_inputs="window", stride=STRIDE, **kwargs)
    dm.prepare_data()
    return dm


def test_windows_cover_each_text_with_stride_tokens_shared(tmp_path, tiny_pretrained):
    rows = long_texts(tmp_path, {"train": 30, "validation": 12})
    dm = classification_data(tmp_path, tiny_pretrained)
    train_rows, validation = dm.datasets["train"], dm.datasets["validation"]
    assert len(train_rows) > 30 and max(map(len, train_rows["input_ids"])) <= MAX_LENGTH  # a row per window
    assert len(validation) == 12  # a row per document, holding its windows
    assert dm.windowed["validation"] > 0
    for (text, label), windows, gold in zip(rows["validation"], validation["window_input_ids"],
                                            validation["labels"]):
        contents = [w[1:-1] for w in windows]  # less [CLS] and [SEP]
        assert all(a[-STRIDE:] == b[:STRIDE] for a, b in zip(contents, contents[1:]))
        whole = contents[0] + [t for c in contents[1:] for t in c[STRIDE:]]
        assert whole == dm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert gold == dm.label2id[label]
    batch = next(iter(dm.val_dataloader()))
    first = validation[:dm.eval_batch_size]
    assert batch["document_labels"].tolist() == first["labels"]
    assert batch["window_document"].tolist() == [d for d, w in enumerate(first["window_input_ids"]) for _ in w]


def test_pool_windows_takes_each_documents_mean_or_max():
    logits = torch.tensor([[1.0, -1.0], [3.0, 0.0], [0.0, 5.0], [2.0, 2.0]])
    owner = torch.tensor([0, 0, 1, 0])
    torch.testing.assert_close(pool_windows(logits, owner, 2, "mean"), torch.tensor([[2.0, 1 / 3], [0.0, 5.0]]))
    torch.testing.assert_close(pool_windows(logits, owner, 2, "max"), torch.tensor([[3.0, 2.0], [0.0, 5.0]]))


@pytest.mark.parametrize("reduce,packing", [("mean", False), ("max", False), ("mean", True)])
def test_each_document_is_scored_once_from_its_windows(tmp_path, tiny_pretrained, reduce, packing):
    long_texts(tmp_path, {"train": 30, "validation": 13})
    dm = classification_data(tmp_path, tiny_pretrained, window_reduce=reduce, packing=packing)
    module = TextClassificationTask(backbone={"name": tiny_pretrained, "pretrained": True}, **dm.model_kwargs())
    assert module.window_reduce == reduce and module.packs_examples == packing
    metrics = validate(module, dm)
    module.eval()
    pooled, labels = [], []
    with torch.no_grad():  # each window alone through the model, then the document's mean or max
        for row in dm.datasets["validation"]:
            windows = torch.stack([module.model(input_ids=torch.tensor([ids])).logits[0]
                                   for ids in row["window_input_ids"]])
            pooled.append(windows.mean(0) if reduce == "mean" else windows.max(0).values)
            labels.append(row["labels"])
    pooled, labels = torch.stack(pooled), torch.tensor(labels)
    assert metrics["val/accuracy"] == pytest.approx((pooled.argmax(-1) == labels).float().mean().item(), abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(torch.nn.functional.cross_entropy(pooled, labels).item(), abs=1e-4)

    texts = [{"sentence": line.split("\t")[0]} for line in (tmp_path / "validation.tsv").read_text().splitlines()[1:]]
    predicted = predict_rows(module.model, dm.tokenizer, texts, column="sentence", pair_column=None, threshold=0.5,
                             max_length=MAX_LENGTH, long_inputs="window", stride=STRIDE, window_reduce=reduce)
    id2label = module.model.config.id2label
    assert [p["label"] for p in predicted] == [id2label[int(i)] for i in pooled.argmax(-1)]
    assert [p["score"] for p in predicted] == pytest.approx(torch.softmax(pooled, -1).max(-1).values.tolist(),
                                                             abs=1e-5)


def test_a_windowed_run_exports_its_windows_and_predict_reads_the_same_way(tmp_path):
    long_texts(tmp_path, {"train": 40, "validation": 12, "test": 12})
    run = tmp_path / "run"
    train(compose_config([*QUICK, f"dataset.data_dir={tmp_path}", "dataset.long_inputs=window",
                          f"dataset.max_length={MAX_LENGTH}", f"dataset.stride={STRIDE}"], run))
    saved = json.loads((run / "hf_model" / "lightning_ft.json").read_text())["columns"]
    assert saved["long_inputs"] == "window" and saved["stride"] == STRIDE and saved["max_length"] == MAX_LENGTH
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test/accuracy" in metrics["test"]

    source = tmp_path / "in.jsonl"
    texts = [line.split("\t")[0] for line in (tmp_path / "test.tsv").read_text().splitlines()[1:]]
    source.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
    assert predict_main([f"model_dir={run / 'hf_model'}", f"input={source}", f"output={tmp_path / 'out.jsonl'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run / "hf_model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "hf_model")
    windowed = predict_rows(model, tokenizer, [{"sentence": t} for t in texts], column="sentence", pair_column=None,
                            threshold=0.5, max_length=MAX_LENGTH, long_inputs="window", stride=STRIDE)
    assert [r["score"] for r in rows] == pytest.approx([w["score"] for w in windowed], abs=1e-5)


@pytest.mark.parametrize("settings,words", [
    ({"long_inputs": "chunks"}, "dataset.long_inputs='chunks' is not one of truncate, window"),
    ({"stride": 14}, "dataset.stride=14 leaves no new tokens in a window of dataset.max_length=16 (14 after the "
                     "special tokens): set dataset.stride below 14"),
    ({"window_reduce": "median"}, "dataset.window_reduce='median' is not one of mean, max"),
])
def test_window_settings_that_cannot_work_are_refused_before_any_data_is_read(tmp_path, tiny_pretrained, settings,
                                                                                words):
    from lightning_ft.errors import UserError

    arguments = {"long_inputs": "window", "stride": STRIDE, **settings}
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TextClassificationData(tokenizer=tiny_pretrained, data_dir=str(tmp_path / "none"), max_length=MAX_LENGTH,
                               **arguments)


# ---- NER ----------------------------------------------------------------------------------------------------------
TAGGED = [("Paris", "B-LOC"), ("unbelievably", "O"), ("overwhelming", "O"), ("Anna", "B-PER"), ("Karenina", "I-PER"),
          ("the", "O"), ("cinematography", "O"), ("of", "O"), ("Berlin", "B-LOC"), ("screenplay", "O")]


def long_sentences(count: int, seed: int) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    return [[rng.choice(TAGGED) for _ in range(rng.randint(4, 30))] for _ in range(count)]


def conll(folder, splits: dict[str, list[list[tuple[str, str]]]]):
    folder.mkdir(parents=True, exist_ok=True)
    for split, sentences in splits.items():
        (folder / f"{split}.txt").write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sentences)
                                             + "\n")
    return folder


def test_word_windows_name_every_word_once_at_its_first_sub_token_in_its_most_central_window(tiny_pretrained):
    from lightning_ft.backbones import load_tokenizer

    tokenizer = load_tokenizer(tiny_pretrained)
    sentences = [[w for w, _ in s] for s in long_sentences(20, 0)]
    starts_inside = 0
    for words, windows in zip(sentences, word_windows(tokenizer, sentences, 12, 3)):
        pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
        chosen = sorted(w for window in windows for w in window["chosen"] if w >= 0)
        assert chosen == [i for i, p in enumerate(pieces) if p]  # every word with a sub-token, exactly once
        for window in windows:
            assert len(window["input_ids"]) <= 12
            content = [p for p, w in enumerate(window["word_ids"]) if w is not None]
            for position, word in enumerate(window["first"]):  # a word's first sub-token, never a later one
                if word >= 0:
                    assert window["input_ids"][position] == pieces[word][0]
                    assert position == content[0] or window["word_ids"][position - 1] != word
            head = window["word_ids"][content[0]]
            starts_inside += window["first"][content[0]] == IGNORE and head is not None
            room = {w: min(p - content[0], content[-1] - p) for p, w in enumerate(window["first"]) if w >= 0}
            for word in (w for w in window["chosen"] if w >= 0):  # no other window gives the word more context
                for other in windows:
                    spots = [p for p, w in enumerate(other["first"]) if w == word]
                    other_content = [p for p, w in enumerate(other["word_ids"]) if w is not None]
                    assert all(min(p - other_content[0], other_content[-1] - p) <= room[word] for p in spots)
    assert starts_inside > 0, "no window began inside a word: the case is untested"


@pytest.mark.parametrize("packing", [False, True])
def test_windowed_ner_scores_every_word_and_agrees_with_predict(tmp_path, tiny_pretrained, packing):
    data = conll(tmp_path / "ner", {"train": long_sentences(30, 1), "validation": long_sentences(11, 2)})
    dm = TokenClassificationData(tokenizer=tiny_pretrained, data_dir=str(data), max_length=12, batch_size=4,
                                 long_inputs="window", stride=3, packing=packing)
    dm.prepare_data()
    assert len(dm.datasets["validation"]) == 11 and len(dm.datasets["train"]) > 30 and dm.windowed["validation"]
    module = TokenClassificationTask(backbone={"name": tiny_pretrained, "pretrained": True}, **dm.model_kwargs())
    torch.manual_seed(0)
    with torch.no_grad():  # a random head predicts all sorts of tags: the comparison below then means something
        module.model.classifier.weight.normal_(0, 1.0)
    metrics = validate(module, dm)

    sentences = [[w for w, _ in s] for s in long_sentences(11, 2)]
    gold = [[t for _, t in s] for s in long_sentences(11, 2)]
    tags, lost = tag_sentences(module.model, dm.tokenizer, sentences, batch_size=3, max_length=12, stride=3)
    assert lost == 0 and [len(t) for t in tags] == [len(s) for s in sentences]
    expected = EntityScores(list(module.id2label.values()))
    expected.update(tags, gold)
    scores = expected.compute()
    assert metrics["val/f1"] == pytest.approx(float(scores["f1"]), abs=1e-6)
    assert metrics["val/accuracy"] == pytest.approx(float(scores["accuracy"]), abs=1e-6)
    # each word's tag is the model's on the window that names it, run alone
    windows = word_windows(dm.tokenizer, sentences[:3], 12, 3)
    module.eval()  # (Lightning's validate leaves it in training mode, dropout on)
    for s, these in enumerate(windows):
        for window in these:
            with torch.no_grad():
                row = module.model(input_ids=torch.tensor([window["input_ids"]])).logits[0].argmax(-1).tolist()
            for position, word in enumerate(window["chosen"]):
                if word >= 0:
                    assert tags[s][word] == module.id2label[row[position]]


def test_truncated_ner_tags_words_past_max_length_o_and_windowed_ner_does_not(tmp_path, tiny_pretrained):
    sentences = [[w for w, _ in s] for s in long_sentences(6, 3)]
    module = TokenClassificationTask(backbone={"name": tiny_pretrained, "pretrained": True}, num_labels=5,
                                     id2label={0: "O", 1: "B-LOC", 2: "B-PER", 3: "I-PER", 4: "I-LOC"})
    with torch.no_grad():
        module.model.classifier.bias.copy_(torch.tensor([-9.0, 9.0, 0.0, 0.0, 0.0]))  # every word B-LOC
    from lightning_ft.backbones import load_tokenizer

    tokenizer = load_tokenizer(tiny_pretrained)
    truncated, lost = tag_sentences(module.model, tokenizer, sentences, max_length=12)
    windowed, none_lost = tag_sentences(module.model, tokenizer, sentences, max_length=12, stride=3)
    assert lost > 0 and none_lost == 0
    assert sum(t.count("O") for t in truncated) == lost
    assert all(t == ["B-LOC"] * len(t) for t in windowed)


def test_windowed_ner_runs_end_to_end_and_predict_reads_in_windows(tmp_path):
    data = conll(tmp_path / "ner", {"train": long_sentences(40, 4), "validation": long_sentences(10, 5),
                                    "test": long_sentences(10, 6)})
    run = tmp_path / "run"
    train(compose_config([*QUICK, "task=ner", f"dataset.data_dir={data}", "dataset.long_inputs=window",
                          "dataset.max_length=12", "dataset.stride=3"], run))
    saved = json.loads((run / "hf_model" / "lightning_ft.json").read_text())["columns"]
    assert saved["long_inputs"] == "window" and saved["max_length"] == 12
    source = tmp_path / "in.jsonl"
    sentences = [[w for w, _ in s] for s in long_sentences(10, 6)]
    source.write_text("".join(json.dumps({"tokens": s}) + "\n" for s in sentences))
    assert predict_main([f"model_dir={run / 'hf_model'}", f"input={source}", f"output={tmp_path / 'out.jsonl'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(run / "hf_model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "hf_model")
    tags, lost = tag_sentences(model, tokenizer, sentences, max_length=12, stride=3)
    assert [r["tags"] for r in rows] == tags and lost == 0
