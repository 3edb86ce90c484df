"""``python -m lightning_ft.predict``: raw text, CoNLL and jsonl in; jsonl and CoNLL out; clear errors."""

import json
from pathlib import Path

import pytest
from cli import run_cli
from conftest import MINILM, TINY

from lightning_ft.predict import main

LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An exported token-classification directory (tiny, random weights, biased to predict entities)."""
    import torch
    from transformers import AutoConfig, AutoModelForTokenClassification

    from lightning_ft.backbones import load_tokenizer, resolve_name

    path = tmp_path_factory.mktemp("run") / "hf_model"
    config = AutoConfig.from_pretrained(resolve_name(MINILM), num_labels=5, id2label=LABELS,
                                        label2id={v: k for k, v in LABELS.items()}, **TINY)
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(config)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, 1.0, 0.9, 0.8, 0.7]))  # some entities in every sentence
    model.save_pretrained(path)
    load_tokenizer(MINILM).save_pretrained(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_raw_text_gives_words_tags_and_entities_with_character_offsets(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("Angela Merkel visited Paris, France.\n\nHello world\n")
    assert main([str(model_dir), str(source), str(tmp_path / "out.jsonl")]) == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["text"] for r in rows] == ["Angela Merkel visited Paris, France.", "Hello world"]
    assert rows[0]["tokens"] == ["Angela", "Merkel", "visited", "Paris", ",", "France", "."]
    assert len(rows[0]["tags"]) == 7 and set(rows[0]["tags"]) <= set(LABELS.values())
    assert rows[0]["entities"]  # the biased head predicts some
    for row in rows:
        for entity in row["entities"]:
            assert row["text"][entity["start"]:entity["end"]] == entity["text"]


def test_conll_input_keeps_its_columns_and_appends_the_prediction(model_dir, tmp_path):
    source = tmp_path / "in.conll"
    source.write_text("-DOCSTART- O\n\nJohn\tB-PER\nsmiled\tO\n\nBerlin\tB-LOC\n")
    # the run directory works as well as its hf_model/
    assert main([str(model_dir.parent), str(source), str(tmp_path / "out.conll")]) == 0
    blocks = (tmp_path / "out.conll").read_text().strip().split("\n\n")
    lines = [[line.split("\t") for line in block.splitlines()] for block in blocks]
    assert [[fields[:2] for fields in block] for block in lines] == [[["John", "B-PER"], ["smiled", "O"]],
                                                                       [["Berlin", "B-LOC"]]]
    assert all(len(fields) == 3 and fields[2] in LABELS.values() for block in lines for fields in block)


def test_jsonl_input_with_tokens_or_text_keeps_other_keys(model_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": 7, "tokens": ["New", "York"]}) + "\n" + json.dumps({"text": "Hi Bob"}) + "\n")
    assert main([str(model_dir), str(source), str(tmp_path / "out.jsonl")]) == 0
    first, second = read_jsonl(tmp_path / "out.jsonl")
    assert first["id"] == 7 and first["tokens"] == ["New", "York"] and len(first["tags"]) == 2
    for entity in first["entities"]:  # word indices for pre-split input
        assert 0 <= entity["start"] < entity["end"] <= 2
    assert second["tokens"] == ["Hi", "Bob"]


def test_words_beyond_max_length_are_tagged_o_and_reported(model_dir, tmp_path, caplog):
    source = tmp_path / "long.txt"
    source.write_text(" ".join(["word"] * 40) + "\n")
    assert main([str(model_dir), str(source), str(tmp_path / "out.jsonl"), "--max-length", "12"]) == 0
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    assert len(row["tags"]) == 40 and row["tags"][10:] == ["O"] * 30
    assert "30 words were beyond --max-length=12" in caplog.text


def test_bad_inputs_fail_with_a_message_that_names_them(model_dir, tmp_path, capsys):
    assert main([str(model_dir), str(tmp_path / "missing.txt"), str(tmp_path / "o.jsonl")]) == 2
    assert "input '" in capsys.readouterr().err
    source = tmp_path / "in.txt"
    source.write_text("hello\n")
    assert main([str(tmp_path), str(source), str(tmp_path / "o.jsonl")]) == 2
    assert "is not an exported model" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": ["a"]}\n{oops\n')
    assert main([str(model_dir), str(bad), str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:2 is not JSON" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main([str(model_dir), str(empty), str(tmp_path / "o.jsonl")]) == 2
    assert "has no sentences to tag" in capsys.readouterr().err


def test_a_sequence_classification_model_is_refused_by_name(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lightning_ft.backbones import resolve_name

    config = AutoConfig.from_pretrained(resolve_name(MINILM), num_labels=2, **TINY)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "clf")
    source = tmp_path / "in.txt"
    source.write_text("hello\n")
    assert main([str(tmp_path / "clf"), str(source), str(tmp_path / "o.jsonl")]) == 2
    assert "BertForSequenceClassification; predict handles token classification" in capsys.readouterr().err


def test_the_command_line_entry_point(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("Barack Obama was born in Hawaii.\n")
    result = run_cli([str(model_dir), str(source), str(tmp_path / "out.conll")], tmp_path,
                     module="lightning_ft.predict")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tagged 1 sentences (7 words)" in result.stderr
    assert [line.split("\t")[0] for line in (tmp_path / "out.conll").read_text().split("\n") if line] == [
        "Barack", "Obama", "was", "born", "in", "Hawaii", "."]
