"""Multiple choice: the OpenBookQA and SWAG layouts, answers by index/label/text, bad input, a tiny-model run."""

import json
from pathlib import Path

import pytest
from conftest import MINILM, QUICK, compose_config

from lightning_ft.backbones import load_tokenizer
from lightning_ft.errors import UserError
from lightning_ft.tasks.multiple_choice import MultipleChoiceData
from lightning_ft.train import train


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def obqa(qid: str, stem: str, choices: list[str], key: str) -> dict:
    return {"id": qid, "question": {"stem": stem, "choices": [{"text": t, "label": "ABCD"[i]}
                                                            for i, t in enumerate(choices)]}, "answerKey": key}


OBQA = {"question_column": "question.stem", "choices_column": "question.choices", "label_column": "answerKey"}


def prepared(tokenizer, root: Path, train_rows: list[dict], validation_rows: list[dict] | None = None, **kwargs):
    write_rows(root / "train.jsonl", train_rows)
    write_rows(root / "validation.jsonl", validation_rows or train_rows)
    dm = MultipleChoiceData(tokenizer=tokenizer, data_dir=str(root), **kwargs)
    dm.prepare_data()
    return dm


def test_openbookqa_layout_encodes_one_pair_per_choice(tokenizer, tmp_path):
    rows = [obqa("1", "Plants need", ["sun", "rocks", "salt", "ice"], "A"),
            obqa("2", "Ice is", ["hot", "cold", "loud", "red"], "B")]
    dm = prepared(tokenizer, tmp_path, rows, **OBQA)
    assert dm.model_kwargs() == {"num_choices": 4}
    first = dm.datasets["train"][1]
    assert first["labels"] == 1 and len(first["input_ids"]) == 4
    assert tokenizer.decode(first["input_ids"][2], skip_special_tokens=True) == "ice is loud"
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[:2] == (2, 4) and batch["labels"].tolist() in ([0, 1], [1, 0])


def test_swag_layout_pairs_the_context_with_question_and_ending(tokenizer, tmp_path):
    rows = [{"id": "s", "sent1": "He opens the door.", "sent2": "He", "ending0": "walks in.", "ending1": "sings.",
             "ending2": "flies.", "ending3": "melts.", "label": 0}]
    dm = prepared(tokenizer, tmp_path, rows, context_column="sent1", question_column="sent2",
                  ending_columns=["ending0", "ending1", "ending2", "ending3"])
    encoded = dm.datasets["train"][0]
    assert tokenizer.decode(encoded["input_ids"][1], skip_special_tokens=True) == "he opens the door. he sings."
    assert encoded["labels"] == 0


def test_the_answer_may_be_a_choice_text_or_index(tokenizer, tmp_path):
    rows = [{"id": "a", "question": "2+2?", "choices": ["3", "4"], "label": "4"},
            {"id": "b", "question": "1+1?", "choices": ["2", "5"], "label": 0}]
    dm = prepared(tokenizer, tmp_path, rows[:1])
    assert dm.datasets["train"][0]["labels"] == 1
    dm = prepared(tokenizer, tmp_path / "by_index", rows[1:])
    assert dm.datasets["train"][0]["labels"] == 0


def test_a_different_number_of_choices_is_an_error_naming_the_example(tokenizer, tmp_path):
    rows = [obqa("1", "Plants need", ["sun", "rocks", "salt", "ice"], "A"),
            obqa("odd-7", "Ice is", ["hot", "cold"], "B")]
    with pytest.raises(UserError, match="example 'odd-7' of the train split has 2 choices where the first"):
        prepared(tokenizer, tmp_path, rows, **OBQA)


def test_an_answer_that_is_no_choice_is_an_error(tokenizer, tmp_path):
    rows = [obqa("1", "Plants need", ["sun", "rocks", "salt", "ice"], "E")]
    with pytest.raises(UserError, match="example '1' of the train split has answer 'E'.*A, B, C, D"):
        prepared(tokenizer, tmp_path, rows, **OBQA)


def test_a_wrong_field_path_is_an_error_naming_the_option(tokenizer, tmp_path):
    rows = [obqa("1", "Plants need", ["sun", "rocks", "salt", "ice"], "A")]
    with pytest.raises(UserError, match="has no field 'stm'"):
        prepared(tokenizer, tmp_path, rows, **{**OBQA, "question_column": "question.stm"})


def test_a_tiny_multiple_choice_run_on_the_embedded_sample(tmp_path):
    cfg = compose_config(["task=multiple_choice", *QUICK], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["validation"]["val/accuracy"] <= 1.0 and "test/accuracy" in metrics["test"]
    assert metrics["data"]["examples"] == {"train": 1000, "validation": 200, "test": 200}
    from transformers import AutoModelForMultipleChoice

    assert AutoModelForMultipleChoice.from_pretrained(tmp_path / "hf_model").config.architectures == [
        "BertForMultipleChoice"]
