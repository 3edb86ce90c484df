"""Token-budget batches (`dataset.max_tokens`): each training batch holds at most N tokens, an epoch has the same
number of batches whatever its shuffle, every row is trained once an epoch, and a resumed loader continues exactly."""

import json
import random

import pytest
import torch
from conftest import MINILM, QUICK, compose_config, random_sentences

from lightning_ft.data.base import EpochShuffle
from lightning_ft.data.token_budget import TokenBudgetBatches, example_tokens
from lightning_ft.errors import UserError
from lightning_ft.train import train


@pytest.mark.parametrize("seed", range(5))
def test_an_epoch_is_cut_into_the_same_number_of_batches_within_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(rng.randint(50, 400))]
    budget = rng.randint(3 * 64, 1000)
    order = EpochShuffle(len(lengths), seed=seed)
    batches = TokenBudgetBatches(order, lengths, budget)
    counts = set()
    for epoch in range(3):
        batches.set_epoch(epoch)
        epoch_batches = list(batches)
        counts.add(len(epoch_batches))
        assert all(epoch_batches) and len(epoch_batches) == len(batches)
        assert max(sum(lengths[i] for i in batch) for batch in epoch_batches) <= budget
        # the batches are the shuffled order, cut: every row once, in the sampler's order
        assert [i for batch in epoch_batches for i in batch] == list(iter(order))
    assert len(counts) == 1
    # the budget is used: on average a batch holds more than half of it
    assert sum(lengths) / len(batches) > budget / 2


def test_tokens_are_counted_over_every_choice_and_every_budget_column():
    from datasets import Dataset

    flat = Dataset.from_dict({"input_ids": [[1, 2, 3], [4]], "labels": [[5, 6], [7, 8, 9]]})
    assert example_tokens(flat, ("input_ids",)) == [3, 1]
    assert example_tokens(flat, ("input_ids", "labels")) == [5, 4]
    choices = Dataset.from_dict({"input_ids": [[[1, 2], [3, 4, 5]], [[6], [7], [8, 9]]]})
    assert example_tokens(choices, ("input_ids",)) == [5, 4]


@pytest.mark.parametrize("value,message", [
    (100, r"dataset.max_tokens=100 is less than 3 examples of dataset.max_length=64 tokens: give "
          r"dataset.max_tokens=192 or more"),
    ("lots", r"dataset.max_tokens='lots' is not a whole number"),
])
def test_a_budget_too_small_or_not_a_number_is_refused_before_any_data_is_read(tmp_path, value, message):
    from lightning_ft.tasks.text_classification.data import TextClassificationData

    with pytest.raises(UserError, match=message):
        TextClassificationData(data_dir=str(tmp_path / "nothing here"), max_length=64, max_tokens=value)


def test_a_budget_below_three_of_the_longest_examples_is_refused_naming_the_minimum():
    with pytest.raises(UserError, match=r"fewer than 3 of the longest training example \(300 tokens\): give "
                                        r"dataset.max_tokens=900 or more"):
        TokenBudgetBatches(EpochShuffle(3, seed=0), [10, 300, 20], 500)


def _data(data_dir, **kwargs):
    from lightning_ft.tasks.text_classification.data import TextClassificationData

    data = TextClassificationData(data_dir=str(data_dir), tokenizer=MINILM, max_length=32, seed=3,
                                 text_column="sentence", **kwargs)
    data.model_kwargs()  # prepared: read, checked, tokenized
    return data


@pytest.mark.parametrize("packing", [False, True])
def test_the_training_loader_serves_budgeted_batches_and_resumes_where_it_stopped(tmp_path, packing):
    data_dir = random_sentences(tmp_path, {"train": 200, "validation": 8}, longest=20)
    data = _data(data_dir, max_tokens=160, packing=packing)
    loader = data.train_dataloader()
    tokens = example_tokens(data.datasets["train"], ("input_ids",))
    assert len(loader) == -(-sum(tokens) // (160 - max(tokens)))
    served, sizes = [], []
    for batch in loader:
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int((batch["input_ids"] != 0).sum())
        assert real <= 160
        served.append(batch["input_ids"].tolist())
        sizes.append(len(batch["labels"]))
    assert len(served) == len(loader) and sum(sizes) == 200  # every row once
    assert len(set(sizes)) > 1  # the number of examples varies with their lengths
    if packing:  # rows of up to max_length, several examples each
        assert all(len(row) <= 32 for rows in served for row in rows)

    # Stopped after 3 batches and resumed from the loader's state: the rest of the epoch, exactly.
    first = _data(data_dir, max_tokens=160, packing=packing).train_dataloader()
    seen = iter(first)
    for _ in range(3):
        next(seen)
    state = first.state_dict()
    resumed = _data(data_dir, max_tokens=160, packing=packing).train_dataloader()
    resumed.load_state_dict(state)
    assert [b["input_ids"].tolist() for b in resumed] == served[3:]


def test_a_run_with_a_token_budget_trains_each_epoch_s_batches_and_names_the_setting_in_its_report(tmp_path):
    (tmp_path / "data").mkdir()
    data_dir = random_sentences(tmp_path / "data", {"train": 120, "validation": 16}, longest=20)
    run_dir = tmp_path / "run"
    cfg = compose_config([*[a for a in QUICK if a != "debug=limit"], f"dataset.data_dir={data_dir}",
                          "dataset.max_tokens=256", "dataset.max_length=32", "trainer.max_epochs=2", "test=false",
                          "export=false"], run_dir)
    train(cfg)
    steps = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    batches = len(_data(data_dir, max_tokens=256).train_dataloader())
    assert steps == 2 * batches and batches > 1
    assert "val/accuracy" in json.loads((run_dir / "metrics.json").read_text())["validation"]
    assert "| batch size | up to 256 tokens |" in (run_dir / "report.md").read_text()


def test_a_streamed_dataset_refuses_a_token_budget():
    from lightning_ft.tasks.language_modeling.data import LanguageModelingData

    with pytest.raises(UserError, match="dataset.max_tokens needs the epoch's rows up front"):
        LanguageModelingData(streaming=True, max_tokens=4096, block_size=128)
