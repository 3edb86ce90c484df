"""Speed machinery: the precision `auto` picks, the throughput callback's counts and FLOPs, and what a run reports."""

import csv
import json

import pytest
import pytorch_lightning as pl
import torch
from conftest import QUICK, compose_config, write_tsv

from lightning_ft.tasks.text_classification import TextClassificationData, TextClassificationTask
from lightning_ft.throughput import ThroughputMonitor, model_shape, resolve_precision, training_flops
from lightning_ft.train import train


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")])
def test_auto_precision_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("16-mixed", "cpu") == "16-mixed", "an explicit precision is kept"


@pytest.mark.parametrize("native", [True, False])
def test_bf16_asked_for_where_it_is_emulated_is_warned_about_before_any_work(native, monkeypatch, tmp_path, caplog):
    from lightning_ft.plan import plan_run

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    plan, _ = plan_run(compose_config([*QUICK, "trainer.precision=bf16-mixed"], tmp_path / "run"))
    assert plan.precision == "bf16-mixed"  # kept: a warning, not a refusal
    warned = "trainer.precision=bf16-mixed: this device has no native bf16" in caplog.text
    assert warned != native and ("trainer.precision=auto" in caplog.text) == warned


def test_auto_precision_on_a_gpu_request_without_a_gpu_is_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "gpu") == "32-true"


def test_training_flops_by_hand():
    # 6 per parameter and token, and 12 * layers * hidden * length per token for attention.
    assert training_flops(10, 2, 4, torch.tensor([3, 5])) == 6 * 10 * 8 + 12 * 2 * 4 * (9 + 25)


def test_model_shape_leaves_out_embeddings(tiny_pretrained):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_pretrained)
    params, layers, hidden = model_shape(model)
    embeddings = sum(p.numel() for p in model.embeddings.word_embeddings.parameters())
    embeddings += sum(p.numel() for p in model.embeddings.position_embeddings.parameters())
    embeddings += sum(p.numel() for p in model.embeddings.token_type_embeddings.parameters())
    assert params == sum(p.numel() for p in model.parameters()) - embeddings
    assert (layers, hidden) == (2, 32)


def test_monitor_counts_real_tokens_padding_and_mfu(tmp_path, tiny_pretrained):
    words = [1, 3, 6, 10, 15, 21]  # one batch holds every row, so the padding does not depend on the order
    rows = [[" ".join(["word"] * n), i % 2] for i, n in enumerate(words)]
    write_tsv(tmp_path / "train.tsv", ["text", "label"], rows)
    write_tsv(tmp_path / "validation.tsv", ["text", "label"], rows)
    dm = TextClassificationData(tokenizer=tiny_pretrained, data_dir=str(tmp_path), batch_size=len(rows))
    dm.prepare_data()
    module = TextClassificationTask(backbone={"name": tiny_pretrained, "pretrained": True}, **dm.model_kwargs())
    peak = 1e9
    monitor = ThroughputMonitor(peak_flops=peak)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, callbacks=[monitor], logger=pl.loggers.CSVLogger(tmp_path),
                         log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, precision="32-true")
    trainer.fit(module, datamodule=dm)

    lengths = torch.tensor([n + 2 for n in words])  # "word" is one token; [CLS] and [SEP]
    summary = monitor.summary
    assert summary["samples"] == 3 * len(words)
    assert summary["padding"] == pytest.approx(1 - lengths.sum().item() / (len(words) * lengths.max().item()))
    assert summary["tokens_per_sec"] == pytest.approx(3 * lengths.sum().item() / summary["train_seconds"])
    flops = 3 * training_flops(*model_shape(module.model), lengths)
    assert summary["mfu"] == pytest.approx(flops / summary["train_seconds"] / peak)
    assert 0 <= summary["data_wait"] < 1 and summary["seconds_to_first_step"] > 0
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("throughput/padding")]
    assert len(logged) == 3, "one log per step with log_every_n_steps=1"
    assert float(logged[0]["throughput/padding"]) == pytest.approx(summary["padding"])


def test_run_reports_throughput_data_cost_and_resolved_precision(tmp_path, capsys):
    quick = [*QUICK, "trainer.max_epochs=1", "test=false", "export=false", f"+dataset.cache_dir={tmp_path / 'cache'}"]
    first = compose_config(quick, tmp_path / "a")
    train(first)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["precision"] in ("bf16-mixed", "32-true")
    assert f"precision: {metrics['precision']}" in (tmp_path / "a" / "config.yaml").read_text()
    speed = metrics["throughput"]
    assert speed["samples"] == 5 * 32, "debug=limit: 5 batches of 32"
    assert 0 <= speed["padding"] < 1 and speed["samples_per_sec"] > 0 and "mfu" not in speed  # no CPU peak known
    assert metrics["data"]["examples_tokenized"] > 0
    assert "Training: 160 samples in" in capsys.readouterr().out

    second = compose_config(quick, tmp_path / "b")
    train(second)
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())["data"]
    assert again["examples_tokenized"] == 0, "an identical second run reads the tokenized cache"
    assert "Data: read the tokenized splits from the cache" in capsys.readouterr().out


def test_loader_uses_no_workers_and_no_pinning_on_cpu(tmp_path):
    rows = [["some text", i % 2] for i in range(8)]
    write_tsv(tmp_path / "train.tsv", ["text", "label"], rows)
    write_tsv(tmp_path / "validation.tsv", ["text", "label"], rows)
    dm = TextClassificationData(tokenizer="sentence-transformers/all-MiniLM-L6-v2", data_dir=str(tmp_path))
    dm.trainer = pl.Trainer(accelerator="cpu", logger=False)
    loader = dm.train_dataloader()
    assert loader.num_workers == 0 and not loader.pin_memory
    explicit = TextClassificationData(tokenizer=dm.tokenizer, data_dir=str(tmp_path), num_workers=1)
    assert explicit.train_dataloader().num_workers == 1
