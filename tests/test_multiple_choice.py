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


@pytest.mark.parametrize("model_type,extra", [("bert", {}), ("roberta", {"pad_token_id": 1})])
def test_packed_choices_score_as_the_padded_batch_does(tokenizer, tmp_path, model_type, extra):
    """dataset.packing=true: every choice a packed example; each question's scores and the loss equal the padded
    batch's, and the packed batch still counts questions."""
    import torch

    from lightning_ft import packing
    from lightning_ft.tasks.multiple_choice import MultipleChoiceTask

    rows = [obqa(f"q{i}", "which one " + "is it " * i, ["a sun", "the moon and stars" * (i % 3 + 1), "rain",
                                                        "one " * (i + 1)], "ABCD"[i % 4]) for i in range(6)]
    dm = prepared(tokenizer, tmp_path, rows, packing=True, max_length=32, **OBQA)
    features = [dm.datasets["train"][i] for i in range(6)]
    padded, packed = dm.collate([dict(f) for f in features]), dm.collate_packed([dict(f) for f in features])
    assert packing.batch_examples(packed) == 6 and len(packed["example_rows"]) == 24
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "vocab_size": tokenizer.vocab_size, **extra}
    module = MultipleChoiceTask(num_choices=4, packing=True, backbone={
        "name": None, "model_type": model_type, "pretrained": False, "config_overrides": config, "init_seed": 0})
    assert module.packs_examples
    module.eval()
    with torch.no_grad():
        alone, together = module(**padded), module(**packed)
    assert together.logits.shape == (6, 4)
    torch.testing.assert_close(together.logits, alone.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.loss, alone.loss, atol=1e-5, rtol=1e-5)


def test_a_packed_multiple_choice_run_on_the_embedded_sample(tmp_path):
    cfg = compose_config(["task=multiple_choice", *QUICK, "dataset.packing=true", "dataset.max_tokens=1024",
                          "test=false", "export=false"], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["validation"]["val/accuracy"] <= 1.0
    assert metrics["throughput"]["packing_efficiency"] > 0.8
