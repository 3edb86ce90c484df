"""The base DataModule: local formats, tokenized-data caching, shuffling, and a clear error for each bad input."""

import json
import logging
import random

import pytest
import torch
from conftest import MINILM, TINY, write_tsv

from lightning_ft.backbones import load_model
from lightning_ft.errors import UserError
from lightning_ft.paths import sample_dir
from lightning_ft.tasks.text_classification import TextClassificationData


def make_dm(**kwargs) -> TextClassificationData:
    kwargs.setdefault("tokenizer", MINILM)
    return TextClassificationData(**kwargs)


def split_files(tmp_path, train_rows, val_rows, header=("text", "label")):
    write_tsv(tmp_path / "train.tsv", list(header), train_rows)
    write_tsv(tmp_path / "validation.tsv", list(header), val_rows)
    return tmp_path


def test_second_identical_run_reads_tokenized_cache(tmp_path):
    settings = {"data_dir": str(sample_dir("sst2")), "text_column": "sentence", "cache_dir": str(tmp_path)}
    first = make_dm(**settings)
    first.prepare_data()
    assert first.examples_tokenized == 1200 + 300 + 872

    second = make_dm(**settings)  # a new process would build a new tokenizer object too
    second.prepare_data()
    assert second.examples_tokenized == 0, "an identical second run must not tokenize again"
    assert second.datasets["train"][5] == first.datasets["train"][5]

    changed = make_dm(**settings, max_length=16)  # a different setting is a different cache entry
    changed.prepare_data()
    assert changed.examples_tokenized == 1200 + 300 + 872
    assert max(len(ids) for ids in changed.datasets["train"]["input_ids"]) == 16


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "jsonl.gz"])
def test_local_formats(tmp_path, fmt):
    import gzip

    import pandas as pd

    rows = {"train": [("nice film", "pos"), ("awful", "neg"), ("great", "pos")], "validation": [("bad", "neg")]}
    files = {}
    for split, data in rows.items():
        frame = pd.DataFrame(data, columns=["review", "stars"])
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "parquet":
            frame.to_parquet(path)
        else:
            text = frame.to_json(orient="records", lines=True)
            path.write_bytes(gzip.compress(text.encode()) if fmt.endswith(".gz") else text.encode())
        files[split] = path.name
    dm = make_dm(data_dir=str(tmp_path), data_files=files, text_column="review", label_column="stars")
    dm.prepare_data()
    assert len(dm.datasets["train"]) == 3 and dm.id2label == {0: "neg", 1: "pos"}
    assert dm.datasets["validation"][0]["labels"] == 0


def test_val_fraction_holds_out_part_of_train(tmp_path):
    write_tsv(tmp_path / "train.tsv", ["text", "label"], [[f"text {i}", i % 2] for i in range(50)])
    dm = make_dm(data_dir=str(tmp_path), val_fraction=0.2)
    dm.prepare_data()
    assert len(dm.datasets["train"]) == 40 and len(dm.datasets["validation"]) == 10


def test_training_batches_are_shuffled_and_padded_dynamically(tmp_path):
    rows = [[" ".join(["word"] * (1 + i % 30)), i % 2] for i in range(64)]
    dm = make_dm(data_dir=str(split_files(tmp_path, rows, rows[:8])), batch_size=8)
    dm.prepare_data()
    loader = dm.train_dataloader()
    first_epoch = [b["labels"].tolist() for b in loader]
    loader.sampler.set_epoch(1)  # as Lightning does before each epoch
    second_epoch = [b["labels"].tolist() for b in loader]
    assert first_epoch != second_epoch
    # the order depends on (seed, epoch) only, not on the global random state: a resumed run replays it
    torch.manual_seed(123)
    again = dm.train_dataloader()
    again.sampler.set_epoch(1)
    assert [b["labels"].tolist() for b in again] == second_epoch
    lengths = {b["input_ids"].shape[1] for b in dm.train_dataloader()}
    assert len(lengths) > 1 and max(lengths) <= 32, "each batch is padded to its own longest row"


def test_truncation_is_counted_and_reported(tmp_path, caplog):
    rows = [["long " * 40, 0], ["short", 1], ["long " * 50, 1]]
    dm = make_dm(data_dir=str(split_files(tmp_path, rows, rows[:1])), max_length=16)
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
    assert dm.truncated == {"train": 2, "validation": 1}
    assert "2 of 3 train examples were longer than max_length=16" in caplog.text


# ---- bad input: one clear sentence naming the thing and the fix -------------------------------------------------
def test_missing_column(tmp_path):
    dm = make_dm(data_dir=str(sample_dir("sst2")), text_column="review")
    with pytest.raises(UserError, match=r"column 'review' is missing from the train split \(it has: sentence, label\)"):
        dm.prepare_data()


def test_label_in_validation_never_seen_in_training(tmp_path):
    dm = make_dm(data_dir=str(split_files(tmp_path, [["a", "pos"], ["b", "neg"]], [["c", "pos"], ["d", "neutral"]])))
    with pytest.raises(UserError, match=r"label 'neutral' in row 1 of the validation split never appears in the train"):
        dm.prepare_data()


def test_empty_split(tmp_path):
    dm = make_dm(data_dir=str(split_files(tmp_path, [["a", "pos"], ["b", "neg"]], [])))
    empty = r"the validation split of the dataset is empty \(.*validation.tsv\): give it at least one row"
    with pytest.raises(UserError, match=empty):
        dm.prepare_data()


def test_data_dir_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match=r"dataset.data_dir '.*/nowhere' does not exist .*fix the path"):
        make_dm(data_dir=str(tmp_path / "nowhere")).prepare_data()


def test_data_file_that_does_not_exist(tmp_path):
    dm = make_dm(data_dir=str(tmp_path), data_files={"train": "train.csv", "validation": "dev.csv"})
    with pytest.raises(UserError, match=r"dataset.data_files.train '.*train.csv' does not exist"):
        dm.prepare_data()


def test_no_validation_split_says_how_to_get_one(tmp_path):
    write_tsv(tmp_path / "train.tsv", ["text", "label"], [["a", 0], ["b", 1]])
    with pytest.raises(UserError, match="no validation split.*dataset.val_fraction"):
        make_dm(data_dir=str(tmp_path)).prepare_data()


def test_single_label_column_is_rejected(tmp_path):
    dm = make_dm(data_dir=str(split_files(tmp_path, [["a", "x"], ["b", "x"]], [["c", "x"]])))
    with pytest.raises(UserError, match="a single label .* check dataset.label_column"):
        dm.prepare_data()


def test_unknown_problem_type():
    with pytest.raises(UserError, match="dataset.problem_type 'binary' is not one of"):
        make_dm(data_dir=".", problem_type="binary")


def test_unreadable_file_names_the_file(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 1}\n{not json\n')
    (tmp_path / "validation.jsonl").write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(UserError, match=r"dataset.data_files.train .*train.jsonl.* could not be read as json"):
        make_dm(data_dir=str(tmp_path)).prepare_data()


def test_unknown_backbone_offline_names_the_fix():
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(UserError, match="backbone.name 'no-such-org/no-such-model' is neither a local directory"):
        load_model(AutoModelForSequenceClassification, name="no-such-org/no-such-model")


def test_backbone_path_that_does_not_exist(tmp_path):
    from lightning_ft.backbones import load_tokenizer

    with pytest.raises(UserError, match=r"backbone tokenizer '.*/missing_model' is not a directory"):
        load_tokenizer(name=str(tmp_path / "missing_model"))


def test_config_override_that_is_not_a_field():
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(UserError, match="backbone.config_overrides.hiden_size is not a field of BertConfig"):
        load_model(AutoModelForSequenceClassification, name=MINILM, pretrained=False,
                   config_overrides={"hiden_size": 8})


def test_fresh_model_from_config_overrides():
    from transformers import AutoModelForSequenceClassification

    model = load_model(AutoModelForSequenceClassification, name=MINILM, pretrained=False,
                       config_overrides={**TINY, "vocab_size": 1000}, num_labels=3)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.get_input_embeddings().weight.shape == (1000, 32) and model.config.num_labels == 3
    bare = load_model(AutoModelForSequenceClassification, name=None, model_type="roberta",
                      config_overrides={**TINY, "vocab_size": 500})
    assert type(bare).__name__ == "RobertaForSequenceClassification"


def test_label_names_order_is_saved(tmp_path):
    dm = make_dm(data_dir=str(split_files(tmp_path, [["a", 1], ["b", 0]], [["c", 1]])), label_names=["neg", "pos"])
    dm.prepare_data()
    assert dm.model_kwargs()["id2label"] == {0: "neg", 1: "pos"}
    assert json.dumps(dm.preprocessing_settings())  # the cache key must be serialisable


def test_group_by_length_sees_every_example_once_with_less_padding(tmp_path):
    rng = random.Random(0)
    # 3,200 rows: enough for the sampler's full mega-batches (50 batches; fewer on tiny sets).
    rows = [[" ".join(["word"] * rng.randint(1, 60)) + f" id{i}", i % 2] for i in range(3200)]
    data_dir = str(split_files(tmp_path, rows, rows[:10]))

    def padding_and_ids(dm, epoch=0):
        padded = real = 0
        ids = []
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            padded += batch["input_ids"].numel()
            real += int(batch["attention_mask"].sum())
            ids += [dm.tokenizer.decode(row[mask.bool()], skip_special_tokens=True).split()[-1]
                    for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        return 1 - real / padded, ids

    plain = make_dm(data_dir=data_dir, batch_size=16, group_by_length=False)
    plain.prepare_data()
    grouped = make_dm(data_dir=data_dir, batch_size=16, group_by_length=True)
    grouped.prepare_data()
    torch.manual_seed(0)
    plain_padding, _ = padding_and_ids(plain)
    grouped_padding, first = padding_and_ids(grouped)
    _, second = padding_and_ids(grouped, epoch=1)
    assert sorted(first) == sorted(f"id{i}" for i in range(3200)), "every example exactly once per epoch"
    assert first != second, "a new order every epoch"
    assert plain_padding > 0.3 and grouped_padding < 0.1 * plain_padding
