"""Packed batches for the encoder tasks (dataset.packing=true): every example's outputs packed equal its outputs
alone, for BERT-, RoBERTa- and Llama-style backbones; the loss equals the padded batch's; the data packs a random
draw of examples; a backbone that cannot keep examples apart is refused."""

import random

import pytest
import torch

from lightning_ft import packing
from lightning_ft.errors import UserError
from lightning_ft.tasks.ner.model import TokenClassificationTask
from lightning_ft.tasks.text_classification.model import TextClassificationTask

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "vocab_size": 100}
BACKBONES = {
    "bert": {},
    "roberta": {"pad_token_id": 1},  # positions numbered from padding id + 1
    "llama": {"num_key_value_heads": 2, "pad_token_id": 0},  # causal; its head reads the last token
}
HEADS = {
    "classification": (TextClassificationTask, {"num_labels": 3, "id2label": {0: "a", 1: "b", 2: "c"}}),
    "ner": (TokenClassificationTask, {"num_labels": 3, "id2label": {0: "O", 1: "B-X", 2: "I-X"}}),
}


def build(model_type: str, head: str, **kwargs):
    cls, labels = HEADS[head]
    backbone = {"name": None, "model_type": model_type, "pretrained": False,
                "config_overrides": {**SMALL, **BACKBONES[model_type]}, "init_seed": 0}
    return cls(backbone=backbone, **labels, **kwargs)


def padded_batch(lengths: list[int], head: str, pad_id: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.tensor([rng.randrange(3, 100) for _ in range(n)])
        mask[i, :n] = 1
        labels[i, 1:n - 1] = torch.tensor([rng.randrange(3) for _ in range(n - 2)])
    per_example = torch.tensor([rng.randrange(3) for _ in lengths])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels if head == "ner" else per_example}


def test_first_fit_fills_rows_within_capacity():
    lengths = [7, 3, 5, 2, 8, 1, 4]
    rows = packing.first_fit(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 30 tokens in rows of 10: as few as possible


def test_layout_picks_narrow_rows_of_the_least_work():
    lengths = [30, 25, 20, 18, 15, 10, 8, 5]  # 131 tokens

    def work(rows: list[list[int]]) -> float:
        width = max(sum(lengths[i] for i in row) for row in rows)
        return len(rows) * width * (1 + width / packing.ROW_ATTENTION_WIDTH)

    rows = packing.layout(lengths, capacity=128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    # three rows of 45 (135 positions), not the two of 66 that hold the fewest (132): attention works on each row's
    # square, so the narrower rows cost less
    assert (len(rows), max(sum(lengths[i] for i in row) for row in rows)) == (3, 45)
    assert all(work(rows) <= work(packing.first_fit(lengths, width)) for width in range(30, 129))
    rounded = packing.layout(lengths, capacity=128, multiple_of=8)
    assert all(sum(lengths[i] for i in row) <= 48 for row in rounded) and len(packing.layout([128, 128], 128)) == 2


def test_pack_batch_lays_examples_out_with_restarting_positions():
    batch = padded_batch([4, 2, 3], "ner", pad_id=0)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    batch["word_index"] = torch.arange(12).view(3, 4)  # per example: stays one row per example
    rows = packing.pack_batch(batch, capacity=6, token_keys=("input_ids", "token_type_ids", "labels"), pad_id=0)
    assert rows["input_ids"].shape == (2, 5) and "attention_mask" not in rows  # [4] and [3, 2]: narrowest rows
    assert torch.equal(rows["word_index"], batch["word_index"])
    for i, n in enumerate([4, 2, 3]):
        r, s = rows["example_rows"][i], rows["example_starts"][i]
        assert torch.equal(rows["input_ids"][r, s:s + n], batch["input_ids"][i, :n])
        assert torch.equal(rows["labels"][r, s:s + n], batch["labels"][i, :n])
        assert rows["position_ids"][r, s:s + n].tolist() == list(range(n))
        assert len(set(rows["segment_ids"][r, s:s + n].tolist())) == 1 and rows["segment_ids"][r, s] > 0
    assert int((rows["segment_ids"] == 0).sum()) == 10 - 9  # the padding left
    unpacked = packing.unpack(rows["input_ids"], rows)
    assert torch.equal(unpacked, batch["input_ids"] * batch["attention_mask"])


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("model_type", BACKBONES)
def test_packed_outputs_equal_each_example_alone(model_type, head):
    module = build(model_type, head, packing=True).eval()
    assert module.packing_causal == (model_type == "llama")
    lengths = [9, 4, 13, 6, 3, 11, 7]
    pad = module.model.config.pad_token_id or 0
    batch = padded_batch(lengths, head, pad)
    rows = packing.pack_batch(batch, capacity=20, token_keys=("input_ids", "labels") if head == "ner" else
                              ("input_ids",), pad_id=pad)
    assert len(rows["input_ids"]) < len(lengths)  # several examples share a row
    with torch.no_grad():
        together = module(**rows)
        for i, n in enumerate(lengths):
            alone = module.model(input_ids=batch["input_ids"][i:i + 1, :n]).logits[0]
            mine = together.logits[i][:n] if head == "ner" else together.logits[i]
            assert torch.allclose(mine, alone, atol=1e-5), (model_type, head, i)
        # The loss over the same examples (classification) or labelled tokens (NER) as the padded batch's.
        assert torch.allclose(together.loss, module.model(**batch).loss, atol=1e-5)


def test_training_gradients_do_not_depend_on_the_row_layout(monkeypatch):
    # Without dropout, a packed batch's gradients equal the padded batch's, whether the rows are the narrow ones
    # `layout` picks or the fewest, widest ones: a layout changes only the random draws of dropout.
    module = build("bert", "classification", packing=True).eval()
    batch = padded_batch([5, 8, 3, 6, 2, 7], "classification", 0)

    def gradients(**inputs) -> dict[str, torch.Tensor]:
        module.zero_grad()
        loss = module(**inputs).loss
        loss.backward()
        assert torch.isfinite(loss)
        return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}

    narrow = packing.pack_batch(batch, capacity=16, token_keys=("input_ids",), pad_id=0)
    monkeypatch.setattr(packing, "layout", lambda lengths, capacity, multiple_of=None:
                        packing.first_fit(lengths, capacity))
    wide = packing.pack_batch(batch, capacity=16, token_keys=("input_ids",), pad_id=0)
    assert (len(narrow["input_ids"]), narrow["input_ids"].shape[1]) != (len(wide["input_ids"]),
                                                                          wide["input_ids"].shape[1])
    reference = gradients(**batch)
    for rows in (narrow, wide):
        grads = gradients(**rows)
        assert grads.keys() == reference.keys() and module.model.classifier.weight.grad.abs().sum() > 0
        for name, grad in grads.items():
            assert torch.allclose(grad, reference[name], atol=1e-5), name


@pytest.mark.parametrize("model_type,config", [
    ("distilbert", {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "vocab_size": 100}),
    ("electra", SMALL), ("albert", {**SMALL, "embedding_size": 16}), ("mpnet", SMALL),
    ("xlm-roberta", {**SMALL, "pad_token_id": 1}), ("qwen2", {**SMALL, "num_key_value_heads": 2, "pad_token_id": 0}),
    ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "pad_token_id": 0}),
])
def test_more_backbones_keep_packed_examples_apart(model_type, config):
    # The check the module runs when built (two examples packed and alone) passes for each, with both heads.
    backbone = {"name": None, "model_type": model_type, "pretrained": False, "config_overrides": config}
    for cls, labels in HEADS.values():
        assert cls(backbone=backbone, **labels, packing=True).packs_examples


def test_a_backbone_that_cannot_keep_packed_examples_apart_is_refused():
    backbone = {"name": None, "model_type": "deberta-v2", "pretrained": False, "config_overrides": SMALL}
    with pytest.raises(UserError, match=r"does not keep packed examples apart .*set dataset\.packing=false"):
        TextClassificationTask(backbone=backbone, num_labels=2, id2label={0: "a", 1: "b"}, packing=True)
    # packing=null (the shipped default): padded batches instead, without an error
    assert not TextClassificationTask(backbone=backbone, num_labels=2, id2label={0: "a", 1: "b"},
                                      packing=None).packs_examples


def test_the_packing_check_leaves_the_model_in_training_mode_even_when_it_fails():
    module = build("bert", "classification", packing=True)
    assert module.model.training and module.packs_examples
    backbone = {"name": None, "model_type": "deberta-v2", "pretrained": False, "config_overrides": SMALL}
    module = TextClassificationTask(backbone=backbone, num_labels=2, id2label={0: "a", 1: "b"}, packing=None)
    assert module.model.training and not module.packs_examples
    module.model.eval()  # a model in eval mode stays there
    with pytest.raises(UserError):
        module._check_packing()
    assert not module.model.training


def test_packing_is_refused_for_a_task_that_does_not_pack(tmp_path):
    from lightning_ft.tasks.qa.data import QuestionAnsweringData

    with pytest.raises(UserError, match=r"dataset\.packing=true is not available for QuestionAnsweringData"):
        QuestionAnsweringData(data_dir=str(tmp_path), packing=True)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_packed_similarity_embeddings_equal_padded_ones(pooling):
    from conftest import MINILM, TINY

    from lightning_ft.backbones import load_tokenizer
    from lightning_ft.tasks.similarity.data import SimilarityData
    from lightning_ft.tasks.similarity.model import SimilarityTask

    tokenizer = load_tokenizer(MINILM)
    data = SimilarityData(tokenizer=tokenizer, packing=True, max_length=32)
    rng = random.Random(1)
    features = [{"input_ids": [101] + [rng.randrange(1000, 2000) for _ in range(rng.randint(2, 12))] + [102],
                 "pair_input_ids": [101] + [rng.randrange(1000, 2000) for _ in range(rng.randint(2, 12))] + [102],
                 "labels": rng.random(), "row_index": i} for i in range(6)]
    backbone = {"name": MINILM, "pretrained": False, "config_overrides": TINY, "init_seed": 0}
    module = SimilarityTask(backbone=backbone, pooling=pooling, packing=True).eval()
    padded = data.collate([dict(f) for f in features])
    packed = data.collate_packed([dict(f) for f in features])
    assert len(packed["input_ids"]) < 12 and "pair_input_ids" not in packed
    with torch.no_grad():
        alone, together = module(**padded), module(**packed)
    for mine, reference in zip(together.embeddings, alone.embeddings):
        assert torch.allclose(mine, reference, atol=1e-5)
    assert torch.allclose(together.loss, alone.loss, atol=1e-5)
