"""Token classification: the CoNLL reader, word/sub-token alignment, label handling, bad input, a tiny-model run,
POS tagging and the exported model."""

import gzip
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import MINILM, QUICK, SHARED, TINY, compose_config

from lightning_ft.backbones import load_tokenizer
from lightning_ft.data.conll import read_conll
from lightning_ft.errors import UserError
from lightning_ft.tasks.ner import TokenClassificationData
from lightning_ft.tasks.ner.data import IGNORE, order_labels
from lightning_ft.tasks.ner.model import tag_sentences
from lightning_ft.tasks.ner.predict import split_words
from lightning_ft.train import train

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
.  . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
"""


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def conll_dir(root: Path, train: str = CONLL, validation: str = CONLL, test: str | None = None) -> Path:
    write(root / "train.txt", train)
    write(root / "valid.txt", validation)
    if test is not None:
        write(root / "test.txt", test)
    return root


def datamodule(tokenizer, **kwargs) -> TokenClassificationData:
    dm = TokenClassificationData(tokenizer=tokenizer, **kwargs)
    dm.prepare_data()
    return dm


# ---- reader ------------------------------------------------------------------------------------------------------
def test_reader_skips_docstart_and_splits_sentences_on_blank_lines(tmp_path):
    rows = read_conll(write(tmp_path / "a.txt", CONLL))
    assert rows["tokens"] == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert rows["ner_tags"][1] == ["B-PER", "I-PER"] and rows["pos_tags"][0][0] == "NNP"
    assert rows["chunk_tags"][0][:2] == ["B-NP", "B-VP"]
    assert rows["location"] == [f"{tmp_path / 'a.txt'}:3", f"{tmp_path / 'a.txt'}:9", f"{tmp_path / 'a.txt'}:14"]


def test_reader_takes_tab_separated_files_with_whitespace_only_breaks_and_gzip(tmp_path):
    text = "@user\tO\nEmpire\tB-location\nState\tI-location\n\t\nhi\tO\n"  # WNUT-17 breaks with a lone tab
    path = tmp_path / "wnut.conll.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    rows = read_conll(path)
    assert rows["tokens"] == [["@user", "Empire", "State"], ["hi"]]
    assert rows["ner_tags"] == [["O", "B-location", "I-location"], ["O"]]


def test_reader_names_file_and_line_of_a_row_with_the_wrong_column_count(tmp_path):
    path = write(tmp_path / "bad.txt", CONLL.replace("Blackburn NNP I-NP I-PER", "Blackburn I-PER"))
    with pytest.raises(UserError, match=r"bad.txt:10 has 2 columns .* has 4 \(tokens pos_tags chunk_tags ner_tags\)"):
        read_conll(path)


def test_reader_rejects_an_empty_file_and_a_one_column_file(tmp_path):
    with pytest.raises(UserError, match="empty.txt has no sentences"):
        read_conll(write(tmp_path / "empty.txt", "\n-DOCSTART- -X- -X- O\n\n"))
    with pytest.raises(UserError, match="one.txt:1 has one column"):
        read_conll(write(tmp_path / "one.txt", "word\n"))


@pytest.mark.needs_shared("conll2003", "wnut17")
def test_the_real_conll2003_and_wnut17_files_read_with_their_published_counts():
    shared = SHARED
    train = read_conll(shared / "conll2003" / "train.txt")
    assert len(train["tokens"]) == 14041 and sum(map(len, train["tokens"])) == 203621
    assert sum(tag.startswith("B-") for row in train["ner_tags"] for tag in row) == 7140 + 3438 + 6321 + 6600
    wnut = read_conll(shared / "wnut17" / "wnut17train.conll")
    assert len(wnut["tokens"]) == 3394 and sum(map(len, wnut["tokens"])) == 62730


# ---- labels and alignment ----------------------------------------------------------------------------------------
def test_label_order_is_stable_o_first_then_by_type():
    assert order_labels({"I-PER", "B-LOC", "O", "B-PER", "I-LOC", "S-PER", "E-PER"}) == [
        "O", "B-LOC", "I-LOC", "B-PER", "I-PER", "E-PER", "S-PER"]
    assert order_labels({"VB", "NN", "DT"}) == ["DT", "NN", "VB"]


@pytest.mark.parametrize("label_all_tokens", [False, True])
def test_first_sub_token_carries_the_tag_and_label_all_tokens_tags_the_rest(tmp_path, tokenizer, label_all_tokens):
    text = "Schwarzenegger B-PER\nvisited O\nTegucigalpa B-LOC\n\nhello O\n"
    dm = datamodule(tokenizer, data_dir=str(conll_dir(tmp_path, text, text)), label_all_tokens=label_all_tokens)
    assert dm.label2id == {"O": 0, "B-LOC": 1, "B-PER": 2}
    row = dm.datasets["train"][0]
    word_ids = tokenizer(["Schwarzenegger", "visited", "Tegucigalpa"], is_split_into_words=True).word_ids()
    assert word_ids.count(0) > 1 and word_ids.count(2) > 1  # both names are split into several sub-tokens
    expected, previous = [], None
    for word in word_ids:
        tag = [2, 0, 1][word] if word is not None else IGNORE
        if word is not None and word == previous and not label_all_tokens:
            tag = IGNORE
        expected.append(tag)
        previous = word
    assert row["labels"] == expected
    assert row["word_labels"] == [2, 0, 1]
    assert [w for w in row["word_index"] if w != IGNORE] == [0, 1, 2]


def test_label_all_tokens_turns_b_into_i_on_later_sub_tokens(tmp_path, tokenizer):
    text = "Schwarzenegger B-PER\nvisited O\n\nJohn B-PER\nSmith I-PER\n"
    dm = datamodule(tokenizer, data_dir=str(conll_dir(tmp_path, text, text)), label_all_tokens=True)
    labels = [dm.id2label.get(i) for i in dm.datasets["train"][0]["labels"]]
    first_word = [label for label, word in zip(labels, dm.datasets["train"][0]["word_index"]) if label]
    assert first_word[0] == "B-PER" and set(first_word[1:-1]) == {"I-PER"} and first_word[-1] == "O"


def test_sentences_beyond_max_length_warn_with_the_number_of_words_cut_and_count_at_evaluation(tmp_path, tokenizer,
                                                                                                caplog):
    long = "".join(f"w{i} O\n" for i in range(30)) + "Paris B-LOC\n"
    text = f"{long}\nshort O\nParis B-LOC\n"
    with caplog.at_level(logging.WARNING):
        dm = datamodule(tokenizer, data_dir=str(conll_dir(tmp_path, text, text)), max_length=16)
    assert "validation split: 1 of 2 sentences are longer than max_length=16" in caplog.text
    cut = dm.lost_words["validation"][1]
    assert cut > 0 and f"{cut} of their words were cut off" in caplog.text
    batch = dm.collate([dict(dm.datasets["validation"][0])])
    assert batch["input_ids"].shape[1] == 16 and (batch["word_labels"] != IGNORE).sum() == 31  # all gold words kept


def test_conll_files_are_tokenized_once_and_read_from_the_cache_after(tmp_path, tokenizer):
    # The task reads CoNLL files itself (an in-memory dataset, which datasets would never cache on its own).
    data = conll_dir(tmp_path / "data", CONLL, CONLL)
    settings = {"data_dir": str(data), "cache_dir": str(tmp_path / "cache")}
    first = datamodule(tokenizer, **settings)
    assert first.examples_tokenized == 2 * 3  # 3 sentences in each of train and validation
    second = datamodule(load_tokenizer(MINILM), **settings)  # as a new process would build it
    assert second.examples_tokenized == 0, "an identical second run reads the tokenized cache"
    assert second.datasets["train"]["input_ids"] == first.datasets["train"]["input_ids"]
    write(data / "train.txt", CONLL.replace("Peter", "Paul"))
    assert datamodule(tokenizer, **settings).examples_tokenized == 3, "a changed file is tokenized again"


def test_integer_tags_take_their_names_from_label_names(tmp_path, tokenizer):
    rows = [{"tokens": ["John", "lives", "here"], "tags": [1, 0, 0]}, {"tokens": ["Mary"], "tags": [1]}]
    for split in ("train", "validation"):
        write(tmp_path / f"{split}.jsonl", "\n".join(json.dumps(r) for r in rows))
    dm = datamodule(tokenizer, data_dir=str(tmp_path), label_column="tags", label_names=["O", "B-PER"])
    assert dm.id2label == {0: "O", 1: "B-PER"} and dm.datasets["train"][0]["word_labels"] == [1, 0, 0]
    with pytest.raises(UserError, match="integer tag ids: name them in dataset.label_names"):
        datamodule(tokenizer, data_dir=str(tmp_path), label_column="tags")


def test_a_hub_dataset_with_classlabel_tags_is_read_by_name(monkeypatch, tokenizer):
    import datasets

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))})
    rows = {"tokens": [["John", "Smith", "ran"], ["Ann", "sat"]], "ner_tags": [[1, 2, 0], [1, 0]]}
    splits = ("train", "validation")
    hub = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features) for s in splits})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hub)
    dm = datamodule(tokenizer, hub_name="someone/ner")
    assert dm.id2label == {0: "O", 1: "B-PER", 2: "I-PER"}  # the hub's own order, not a re-sorted one
    assert dm.datasets["train"][0]["word_labels"] == [1, 2, 0]


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_a_validation_tag_unseen_in_training_names_the_file_and_line(tmp_path, tokenizer):
    bad = CONLL.replace("BRUSSELS NNP B-NP B-LOC", "BRUSSELS NNP B-NP B-CITY")
    with pytest.raises(UserError, match=r"tag 'B-CITY' at .*valid.txt:14 \(validation split\) never appears"):
        datamodule(tokenizer, data_dir=str(conll_dir(tmp_path, CONLL, bad)))


def test_unseen_tags_add_takes_evaluation_only_tags_into_the_label_set(tmp_path, tokenizer, caplog):
    bad = CONLL.replace("BRUSSELS NNP B-NP B-LOC", "BRUSSELS NNP B-NP B-CITY")
    with caplog.at_level(logging.WARNING):
        dm = datamodule(tokenizer, data_dir=str(conll_dir(tmp_path, CONLL, bad)), unseen_tags="add")
    assert list(dm.label2id)[-1] == "B-CITY" and dm.model_kwargs()["num_labels"] == len(dm.label2id)
    assert "tag 'B-CITY' first seen at" in caplog.text and "valid.txt:14" in caplog.text
    assert dm.datasets["validation"][2]["word_labels"] == [dm.label2id["B-CITY"]]


def test_rows_with_a_tag_count_unlike_the_token_count_are_named(tmp_path, tokenizer):
    rows = [{"tokens": ["a", "b"], "ner_tags": ["O", "B-X"]}, {"tokens": ["c", "d"], "ner_tags": ["O"]}]
    for split in ("train", "validation"):
        write(tmp_path / f"{split}.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError, match="row 1 of the train split has 2 tokens but 1 tags"):
        datamodule(tokenizer, data_dir=str(tmp_path))


def test_a_slow_tokenizer_is_refused_with_the_fix(tokenizer, tmp_path):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy  # a pure-Python tokenizer

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    write(tmp_path / "vocab.txt", "\n".join(token for token, _ in vocab) + "\n")
    slow = BertTokenizerLegacy(vocab_file=str(tmp_path / "vocab.txt"))
    assert not slow.is_fast
    with pytest.raises(UserError, match="needs a fast tokenizer .* tokenizer.json"):
        TokenClassificationData(tokenizer=slow, data_dir=str(tmp_path))


def test_a_wrong_label_column_names_the_columns_there_are(tmp_path, tokenizer):
    with pytest.raises(UserError, match="column 'pos' is missing from the train split .*tokens, pos_tags"):
        datamodule(tokenizer, data_dir=str(conll_dir(tmp_path)), label_column="pos")


def test_an_empty_split_file_is_named(tmp_path, tokenizer):
    with pytest.raises(UserError, match="valid.txt has no sentences"):
        datamodule(tokenizer, data_dir=str(conll_dir(tmp_path, CONLL, "\n\n")))


# ---- training runs -----------------------------------------------------------------------------------------------
def test_ner_on_the_embedded_sample_reports_entity_scores_per_type_and_exports(tmp_path, capsys):
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    cfg = compose_config(["task=ner", *QUICK], tmp_path)
    assert cfg.dataset.label_column == "ner_tags" and cfg.dataset.data_dir.endswith("wnut17")
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["monitor"] == "val/f1"
    printed = capsys.readouterr().out
    assert "test per type" in printed and "creative-work" in printed and "precision" in printed
    for name in ("f1", "precision", "recall", "accuracy", "person/f1", "creative-work/support"):
        assert f"test/{name}" in metrics["test"]
    # debug=limit tests 2 batches of 64 sentences: every gold person entity in them counts, none is lost.
    first = read_conll(Path(cfg.dataset.data_dir) / "test.conll")["ner_tags"][:2 * 64]
    assert metrics["test"]["test/person/support"] == sum(row.count("B-person") for row in first) > 0

    # The exported directory tags exactly like the module: same sub-token predictions through the pipeline.
    export = tmp_path / "hf_model"
    model = AutoModelForTokenClassification.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert list(model.config.id2label.values())[:3] == ["O", "B-corporation", "I-corporation"]
    text = "Empire State Building is in New York"
    tokens = pipeline("token-classification", model=str(export), aggregation_strategy="none")(text)
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0, 1:-1]
    predicted = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    assert [t["entity"] for t in tokens] == [p for p in predicted if p != "O"]


def test_pos_tagging_on_the_same_files_uses_word_accuracy(tmp_path):
    data = conll_dir(tmp_path / "data", CONLL * 3, CONLL)
    cfg = compose_config(["task=ner", *QUICK, "dataset=conll2003", f"dataset.data_dir={data}",
                          "task.label_column=pos_tags"], tmp_path / "run")
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["monitor"] == "val/accuracy" and "test/f1" not in metrics.get("test", {})
    labels = json.loads((tmp_path / "run" / "hf_model" / "config.json").read_text())["id2label"]
    assert sorted(labels.values()) == [".", "JJ", "NN", "NNP", "VBZ"]


def test_tag_sentences_maps_predictions_back_to_words(tokenizer):
    from transformers import AutoConfig, AutoModelForTokenClassification

    from lightning_ft.backbones import resolve_name

    config = AutoConfig.from_pretrained(resolve_name(MINILM), num_labels=3, id2label={0: "O", 1: "B-X", 2: "I-X"},
                                        **TINY)
    model = AutoModelForTokenClassification.from_config(config)
    sentences = [["Schwarzenegger", "visited", "Tegucigalpa"], ["hi"], ["a"] * 20]
    tags, lost = tag_sentences(model, tokenizer, sentences, batch_size=2, max_length=12)
    assert [len(t) for t in tags] == [3, 1, 20] and lost == 10  # 10 tokens fit after [CLS] and before [SEP]
    assert tags[2][10:] == ["O"] * 10
    words = split_words(tokenizer, "Hello, New-York!")
    assert words == [("Hello", (0, 5)), (",", (5, 6)), ("New", (7, 10)), ("-", (10, 11)), ("York", (11, 15)),
                     ("!", (15, 16))]


def test_a_byte_level_bpe_tokenizer_gets_add_prefix_space_for_pre_split_words(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world John Smith lives in New York"] * 10, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    merges = [tuple(line.split()) for line in (tmp_path / "merges.txt").read_text().splitlines()[1:] if line]
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    RobertaTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path / "roberta")
    plain = AutoTokenizer.from_pretrained(tmp_path / "roberta")
    # Without a prefix space, a pre-split word is tokenized as if it were glued to the previous one.
    assert plain(["John"], is_split_into_words=True).tokens()[1] != "\u0120John"
    text = "John B-PER\nSmith I-PER\n\nhello O\n"
    dm = datamodule(plain, data_dir=str(conll_dir(tmp_path / "data", text, text)))
    assert dm.tokenizer.add_prefix_space
    ids = dm.datasets["train"][0]["input_ids"]
    assert dm.tokenizer.convert_ids_to_tokens(ids)[1:3] == ["\u0120John", "\u0120Smith"]
