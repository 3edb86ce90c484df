"""Translation and summarization: metrics against their reference libraries, data reading and bad input, trained
tokenizers, DDP row accounting, generation limits, and a trained model's export through transformers.pipeline."""

import gzip
import json
from pathlib import Path

import pytest
import sacrebleu
import torch
from conftest import compose_config, on_two_ranks
from hydra.utils import instantiate
from torch.utils.data import DistributedSampler

from lightning_ft.backbones import load_model, match_tokenizer
from lightning_ft.errors import UserError
from lightning_ft.metrics.generation import ROUGE_KEYS, RougeScores, split_sentences
from lightning_ft.paths import sample_dir
from lightning_ft.tasks.base import rows_of_rank
from lightning_ft.tasks.seq2seq import Seq2SeqData, SummarizationTask, TranslationTask
from lightning_ft.tokenizer_training import train_tokenizer
from lightning_ft.train import build_task, train

HYPOTHESES = ["The cat sat on the mat.", "A dog runs in the park with a red ball.", "Two men are playing chess.",
              "It is raining today in the big city.", "She reads a very old book."]
REFERENCES = [["The cat is sitting on the mat.", "A cat sat on the mat."],
              ["A dog is running in the park with a ball."],
              ["Two men play chess outside.", "Two people are playing a game of chess."],
              ["Today it rains in the city."],
              ["She is reading an old book."]]
QUICK_T5 = ["backbone=tiny_t5", "debug=limit", "~callbacks.progress_bar", "task.max_new_tokens=8", "task.num_beams=2"]


def _batched_metric(task_class, stage="test"):
    metrics = task_class.make_metrics(None, f"{stage}/")
    for start in (0, 2):  # three batches of different sizes: the score must not depend on them
        metrics.update(HYPOTHESES[start:start + 2], REFERENCES[start:start + 2])
    metrics.update(HYPOTHESES[4:], REFERENCES[4:])
    return {k.split("/")[-1]: float(v) for k, v in metrics.compute().items()}


def test_bleu_and_chrf_are_sacrebleus_corpus_scores_whatever_the_batches():
    values = _batched_metric(TranslationTask)
    streams = [[refs[i] if i < len(refs) else None for refs in REFERENCES] for i in range(2)]
    bleu = sacrebleu.corpus_bleu(HYPOTHESES, streams, tokenize="13a")
    chrf = sacrebleu.corpus_chrf(HYPOTHESES, streams)
    assert values["bleu"] * TranslationTask.metric_scale["bleu"] == pytest.approx(bleu.score, abs=1e-3)
    assert values["chrf"] == pytest.approx(chrf.score, abs=1e-3)
    # The mean of per-batch BLEU is a different (wrong) number: the metric really is corpus level.
    per_batch = [sacrebleu.corpus_bleu(HYPOTHESES[s:e], [[r[0] for r in REFERENCES[s:e]]]).score
                 for s, e in ((0, 2), (2, 4), (4, 5))]
    assert abs(sum(per_batch) / 3 - bleu.score) > 1


def test_rouge_matches_rouge_score_and_torchmetrics():
    from rouge_score import rouge_scorer
    from torchmetrics.text import ROUGEScore

    values = _batched_metric(SummarizationTask)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    expected = {key: 0.0 for key in ROUGE_KEYS}
    for hypothesis, refs in zip(HYPOTHESES, REFERENCES):
        best = scorer.score_multi(["\n".join(split_sentences(r)) for r in refs], "\n".join(split_sentences(hypothesis)))
        for key in ROUGE_KEYS:
            expected[key] += best[key].fmeasure * 100 / len(HYPOTHESES)
    assert values == pytest.approx(expected, abs=1e-4)
    # An independent implementation agrees on ROUGE-1/2/L (torchmetrics needs nltk's data for Lsum only).
    other = ROUGEScore(use_stemmer=True, rouge_keys=("rouge1", "rouge2", "rougeL"), accumulate="best")
    other.update(HYPOTHESES, REFERENCES)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert values[key] == pytest.approx(float(other.compute()[f"{key}_fmeasure"]) * 100, abs=1e-3)


def test_rouge_lsum_scores_sentence_by_sentence():
    metric = RougeScores()
    # Same words, sentences in another order: the longest common subsequence of the whole text is shorter than the
    # union of per-sentence ones.
    metric.update(["The model is small. It trains fast."], [["It trains fast. The model is small."]])
    scores = {k: float(v) for k, v in metric.compute().items()}
    assert scores["rouge1"] == pytest.approx(100) and scores["rougeLsum"] == pytest.approx(100)
    assert scores["rougeL"] < 80


def test_each_rank_counts_only_its_own_rows_of_a_padded_distributed_split():
    for total in (5, 6, 7, 11):
        for world in (2, 3, 4):
            counted = []
            for rank in range(world):
                order = list(DistributedSampler(range(total), num_replicas=world, rank=rank, shuffle=False))
                counted += order[: rows_of_rank(total, world, rank)]
            assert sorted(counted) == list(range(total)), (total, world)


def _metrics_of_rank(rank: int) -> dict:
    results = {}
    for task_class in (TranslationTask, SummarizationTask):
        metrics = task_class.make_metrics(None, "test/")
        metrics.update(HYPOTHESES[rank::2], REFERENCES[rank::2])  # what DistributedSampler gives each rank
        results.update({k: float(v) for k, v in metrics.compute().items()})  # compute() syncs the ranks
    return results


def test_generation_metrics_over_two_ddp_processes_equal_one_process():
    results = on_two_ranks(_metrics_of_rank)
    single = {}
    for task_class in (TranslationTask, SummarizationTask):
        metrics = task_class.make_metrics(None, "test/")
        metrics.update(HYPOTHESES, REFERENCES)
        single.update({k: float(v) for k, v in metrics.compute().items()})
    assert set(single) == {"test/bleu", "test/chrf", *(f"test/{k}" for k in ROUGE_KEYS)}
    assert results[0] == pytest.approx(single, abs=1e-5) and results[1] == pytest.approx(single, abs=1e-5)


def _parallel(tmp_path: Path, lines: dict[str, list[str]], gz: bool = False) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, texts in lines.items():
        path = tmp_path / (name + (".gz" if gz else ""))
        data = "".join(t + "\n" for t in texts).encode()
        path.write_bytes(gzip.compress(data) if gz else data)
    return tmp_path


@pytest.fixture(scope="module")
def tokenizer():
    folder = sample_dir("multi30k")
    texts = [line for name in ("train.de", "train.en") for line in (folder / name).read_text().split("\n")]
    return train_tokenizer(texts, vocab_size=800)


def test_parallel_gz_files_jsonl_rows_and_hub_translation_rows_read_alike(tmp_path, tokenizer):
    pairs = {"train": (["Ein Hund.", "Zwei Katzen."], ["A dog.", "Two cats."]), "val": (["Ein Mann."], ["A man."]),
             "test_2016_flickr": (["Eine Frau."], ["A woman."])}
    folder = _parallel(tmp_path / "gz", {f"{s}.{lang}": texts[i] for s, texts in pairs.items()
                                          for i, lang in enumerate(("de", "en"))}, gz=True)
    dm = Seq2SeqData(tokenizer=tokenizer, data_dir=str(folder), source_lang="de", target_lang="en")
    dm.prepare_data()
    assert dm.references("train") == [["A dog."], ["Two cats."]] and dm.sources("test") == ["Eine Frau."]
    (tmp_path / "hub").mkdir()
    for split, (de, en) in pairs.items():
        rows = [{"translation": {"de": d, "en": e}} for d, e in zip(de, en)]
        name = {"val": "validation", "test_2016_flickr": "test"}.get(split, split)
        (tmp_path / "hub" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hub = Seq2SeqData(tokenizer=tokenizer, data_dir=str(tmp_path / "hub"), source_lang="de", target_lang="en")
    hub.prepare_data()
    assert hub.datasets["train"]["input_ids"] == dm.datasets["train"]["input_ids"]
    assert hub.datasets["train"]["labels"] == dm.datasets["train"]["labels"]
    french = Seq2SeqData(tokenizer=tokenizer, data_dir=str(tmp_path / "hub"), source_lang="de", target_lang="fr")
    with pytest.raises(UserError, match="'translation' column has languages \\['de', 'en'\\], not dataset.target_lang"):
        french.prepare_data()


def test_bad_parallel_and_column_input_is_named(tmp_path, tokenizer):
    folder = _parallel(tmp_path / "a", {"train.de": ["a", "b", "c"], "train.en": ["a", "b"],
                                        "val.de": ["x"], "val.en": ["x"]})
    with pytest.raises(UserError, match="train.de has 3 lines, .*train.en has 2"):
        Seq2SeqData(tokenizer=tokenizer, data_dir=str(folder), source_lang="de", target_lang="en").prepare_data()
    folder = _parallel(tmp_path / "b", {"train.de": ["a"], "val.de": ["x"], "val.en": ["x"]})
    with pytest.raises(UserError, match="train.de' has no parallel 'train.en"):
        Seq2SeqData(tokenizer=tokenizer, data_dir=str(folder), source_lang="de", target_lang="en").prepare_data()
    with pytest.raises(UserError, match="column 'summary' is missing from the train split .*dataset.target_column"):
        Seq2SeqData(tokenizer=tokenizer, data_dir=str(sample_dir("scitldr")), target_column="summary").prepare_data()
    with pytest.raises(UserError, match="source_lang and dataset.target_lang go together"):
        Seq2SeqData(tokenizer=tokenizer, data_dir=str(folder), source_lang="de")


def test_list_sources_join_list_targets_are_references_and_problems_are_counted(tmp_path, tokenizer, caplog):
    rows = {"train": [{"source": ["One sentence.", "Two."], "target": ["short", "other"]},
                      {"source": ["Drop me."], "target": [""]},
                      {"source": ["Keep."], "target": "kept as longer"}],
            "validation": [{"source": ["A " * 50], "target": ["b " * 30]}]}
    for split, data in rows.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    settings = {"tokenizer": tokenizer, "data_dir": str(tmp_path), "max_source_length": 16, "max_target_length": 8}
    dm = Seq2SeqData(**settings)
    dm.prepare_data()
    assert dm.sources("train") == ["One sentence. Two.", "Keep."]
    assert dm.references("train") == [["short", "other"], ["kept as longer"]]
    assert tokenizer.decode(dm.datasets["train"][0]["labels"], skip_special_tokens=True) == "short"
    batch = dm.collate([dm.datasets["train"][0], dm.datasets["train"][1]])
    shorter = int((batch["labels"][0] != -100).sum())  # label padding is -100, which the loss ignores
    assert shorter == len(dm.datasets["train"][0]["labels"]) < batch["labels"].shape[1]
    assert (batch["labels"][0, shorter:] == -100).all()
    assert set(batch) == {"input_ids", "attention_mask", "labels", "row_index"}
    expected = {"train": {"empty_target": 1}, "validation": {"source_truncated": 1, "target_truncated": 1}}
    problems = dm.preparation["problems"]
    assert problems["train"]["empty_target"] == 1 and problems["validation"] == expected["validation"]
    assert "were longer than dataset.max_source_length=16 tokens" in caplog.text
    again = Seq2SeqData(**settings)  # from the tokenized cache: the same counts
    again.prepare_data()
    assert again.examples_tokenized == 0 and again.preparation["problems"] == problems


def test_trained_tokenizers_and_fresh_models_agree_on_special_tokens(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [0, 1, 2]
    ids = tokenizer("Ein Hund läuft.")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == "Ein Hund läuft."
    bpe = train_tokenizer(["a dog runs", "two cats sleep"] * 20, algorithm="bpe", vocab_size=300, add_bos=True)
    encoded = bpe("a dog")["input_ids"]
    assert encoded[0] == bpe.bos_token_id and encoded[-1] == bpe.eos_token_id
    assert bpe.decode(encoded, skip_special_tokens=True).strip() == "a dog"
    from transformers import AutoConfig

    bart = AutoConfig.for_model("bart")  # pad 1, eos 2, bos 0, decoder start = eos, forced eos = eos
    match_tokenizer(bart, bpe)
    assert (bart.pad_token_id, bart.eos_token_id, bart.bos_token_id) == (0, 1, 3)
    assert bart.decoder_start_token_id == bart.forced_eos_token_id == 1 and bart.vocab_size == len(bpe)
    t5 = AutoConfig.for_model("t5")  # T5 leaves the decoder start unset: it is the pad token
    match_tokenizer(t5, tokenizer)
    assert t5.decoder_start_token_id == tokenizer.pad_token_id and t5.vocab_size == len(tokenizer)
    with pytest.raises(UserError, match="vocab_size=5 leaves no room"):
        train_tokenizer(["a"], vocab_size=5)
    with pytest.raises(UserError, match="no text to train on"):
        train_tokenizer(["", ""], vocab_size=100)


def test_a_decoder_only_or_encoder_only_backbone_is_refused():
    from transformers import AutoModelForSeq2SeqLM

    with pytest.raises(UserError, match="is a gpt2 model, which AutoModelForSeq2SeqLM cannot build.*encoder-decoder"):
        load_model(AutoModelForSeq2SeqLM, name=None, pretrained=False, model_type="gpt2",
                   config_overrides={"n_layer": 1, "n_embd": 16, "n_head": 2})


def test_a_fresh_t5_decoder_follows_num_layers_and_unequal_depths_are_refused():
    tiny_t5 = {"name": None, "pretrained": False, "model_type": "t5",
               "config_overrides": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1, "num_heads": 2}}
    task = TranslationTask(backbone=tiny_t5)  # built through T5Config's constructor: 1 decoder layer, not 6
    assert len(task.model.decoder.block) == 1
    task.model.generate(input_ids=torch.ones(1, 3, dtype=torch.long), decoder_start_token_id=0, max_new_tokens=2)
    tiny_t5["config_overrides"]["num_decoder_layers"] = 2
    with pytest.raises(UserError, match="1 encoder and 2 decoder layers.*num_decoder_layers"):
        TranslationTask(backbone=tiny_t5)


def _built_with_trained_tokenizer(cfg, tmp_path):
    """The DataModule with a tokenizer trained on its training text (saved, and named in ``cfg.backbone``), and the
    task module built on it."""
    from lightning_ft.tokenizer_training import train_tokenizer as train_tok

    datamodule = instantiate(cfg.dataset, _convert_="all")
    datamodule.connect(train_tok(datamodule.training_texts(), **cfg.backbone.train_tokenizer))
    datamodule.tokenizer.save_pretrained(tmp_path / "tok")
    cfg.backbone.tokenizer = str(tmp_path / "tok")
    return datamodule, build_task(cfg, datamodule)


def test_validation_generates_a_subset_while_training_and_everything_after(tmp_path):
    cfg = compose_config(["task=translation", *QUICK_T5, "task.val_generate_limit=5"], tmp_path)
    cfg.trainer.max_epochs = 1
    datamodule, module = _built_with_trained_tokenizer(cfg, tmp_path)
    assert module.model.config.d_model == 32 and module.model.config.vocab_size == len(datamodule.tokenizer)
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, limit_val_batches=None)
    trainer.fit(module, datamodule=datamodule)
    assert sorted(map(int, module.predictions["val"])) == [0, 1, 2, 3, 4]  # the loss still saw every row
    trainer.validate(module, datamodule=datamodule)
    assert len(module.predictions["val"]) == 200


def test_a_translation_run_exports_a_model_the_pipeline_reproduces(tmp_path):
    from transformers import pipeline

    import lightning_ft.seq2seq_pipeline  # noqa: F401  (registers the pipelines transformers 5 removed)

    cfg = compose_config(["task=translation", *QUICK_T5, "trainer.precision=32-true",
                          "dataset.max_eval_examples=24", "trainer.limit_test_batches=null"], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"test/bleu", "test/chrf", "test/gen_len", "test/loss"} <= set(metrics["test"])
    assert metrics["examples"]["test"][0]["references"] and (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    predictions = json.loads((tmp_path / "predictions_test.json").read_text())
    assert len(predictions) == 24
    translator = pipeline("translation", model=str(tmp_path / "hf_model"))
    assert translator.model.generation_config.num_beams == 2
    outputs = translator([row["source"] for row in predictions.values()], batch_size=8)
    assert [o["translation_text"] for o in outputs] == [row["prediction"] for row in predictions.values()]
    # The metric is the corpus BLEU of exactly these predictions.
    bleu = sacrebleu.corpus_bleu([row["prediction"] for row in predictions.values()],
                                 [[row["references"][0] for row in predictions.values()]])
    assert metrics["test"]["test/bleu"] == pytest.approx(bleu.score, abs=1e-2)


def test_summarization_runs_on_its_sample_and_the_pipeline_summarizes(tmp_path):
    from transformers import pipeline

    import lightning_ft.seq2seq_pipeline  # noqa: F401

    cfg = compose_config(["task=summarization", *QUICK_T5, "dataset.source_prefix=summarize: "], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {f"test/{k}" for k in ROUGE_KEYS} <= set(metrics["test"])
    summarizer = pipeline("summarization", model=str(tmp_path / "hf_model"))
    assert summarizer.model.config.prefix == "summarize: "
    assert set(summarizer("A long abstract about models.")[0]) == {"summary_text"}


def test_a_bert_backbone_for_translation_fails_before_training(tmp_path):
    cfg = compose_config(["task=translation", "backbone=tiny_bert"], tmp_path)
    with pytest.raises(UserError, match="is a bert model, which AutoModelForSeq2SeqLM cannot build"):
        train(cfg)


def test_a_checkpoint_is_tested_with_the_tokenizer_its_model_was_trained_with(tmp_path):
    # Unigram training is not deterministic: a new run must not train a new tokenizer for an old model.
    settings = ["task=translation", *QUICK_T5, "dataset.max_eval_examples=16"]
    first, second = tmp_path / "first", tmp_path / "second"
    train(compose_config(settings, first))
    metrics = json.loads((first / "metrics.json").read_text())
    train(compose_config([*settings, "train=false", f"ckpt_path={metrics['best_model_path']}"], second))
    assert (second / "tokenizer" / "tokenizer.json").read_text() == (first / "tokenizer" / "tokenizer.json").read_text()
    assert json.loads((second / "metrics.json").read_text())["test"] == pytest.approx(metrics["test"], abs=1e-4)
    (first / "tokenizer").rename(tmp_path / "moved")
    with pytest.raises(UserError, match="built for the tokenizer in '.*first/tokenizer', which no longer exists"):
        train(compose_config([*settings, "train=false", f"ckpt_path={metrics['best_model_path']}"], tmp_path / "3"))
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="broken.ckpt' cannot be read, it is truncated or not a checkpoint"):
        train(compose_config([*settings, "train=false", f"ckpt_path={tmp_path / 'broken.ckpt'}"], tmp_path / "4"))


# ---- packed rows (dataset.packing=true): sources packed, each target in its source's row ------------------------
TWO_LAYER_T5 = {"name": None, "pretrained": False, "model_type": "t5", "init_seed": 0,
                "config_overrides": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
                                     "num_heads": 2, "vocab_size": 100, "dropout_rate": 0.0}}


def _pairs_batch(source_lengths, target_lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width, target_width = max(source_lengths), max(target_lengths)
    ids = torch.zeros(len(source_lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(source_lengths), target_width), -100)
    for i, (n, m) in enumerate(zip(source_lengths, target_lengths)):
        ids[i, :n] = torch.randint(3, 100, (n,), generator=generator)
        mask[i, :n] = 1
        labels[i, :m] = torch.randint(3, 100, (m,), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_packed_source_target_pairs_give_each_example_its_padded_logits_loss_and_gradients():
    from lightning_ft.packing import pack_batch
    from lightning_ft.tasks.seq2seq.data import pack_targets

    module = TranslationTask(backbone=TWO_LAYER_T5, packing=True)  # the packing check passes for T5
    assert module.packs_examples
    padded = _pairs_batch([7, 3, 12, 5, 9, 4], [2, 9, 4, 6, 3, 8])
    rows = pack_targets(pack_batch(padded, 16, ("input_ids",), pad_id=0))
    assert len(rows["input_ids"]) < 6 and rows["labels"].shape[0] == rows["input_ids"].shape[0]
    alone = module.model(**padded)
    together = module(**rows)
    for i, n in enumerate(rows["decoder_lengths"].tolist()):
        start, row = int(rows["decoder_starts"][i]), int(rows["example_rows"][i])
        torch.testing.assert_close(together.logits[row, start:start + n], alone.logits[i, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.loss, alone.loss, atol=1e-6, rtol=1e-6)  # the same mean over target tokens
    grads = []
    for loss in (alone.loss, together.loss):
        module.zero_grad()
        loss.backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4)


def test_pack_targets_lays_each_target_after_the_earlier_sources_targets_of_its_row():
    from lightning_ft.packing import pack_batch
    from lightning_ft.tasks.seq2seq.data import pack_targets

    generator = torch.Generator().manual_seed(0)
    for trial in range(5):
        sources = torch.randint(1, 15, (9,), generator=generator).tolist()
        targets = torch.randint(0, 10, (9,), generator=generator).tolist()  # an empty target too
        padded = _pairs_batch(sources, targets, seed=trial)
        rows = pack_targets(pack_batch(padded, 16, ("input_ids",), pad_id=0), multiple_of=8)
        assert rows["labels"].shape[1] % 8 == 0
        # The reference, one row at a time: the row's examples in the order of their sources, targets end to end.
        expected = torch.full_like(rows["labels"], -100)
        segments = torch.zeros_like(rows["labels"])
        for r in range(len(rows["input_ids"])):
            members = [i for i in range(9) if int(rows["example_rows"][i]) == r]
            column = 0
            for i in sorted(members, key=lambda i: int(rows["example_starts"][i])):
                assert int(rows["decoder_starts"][i]) == column and int(rows["decoder_lengths"][i]) == targets[i]
                expected[r, column:column + targets[i]] = padded["labels"][i, :targets[i]]
                segments[r, column:column + targets[i]] = rows["segment_ids"][r, rows["example_starts"][i]]
                column += targets[i]
        assert torch.equal(rows["labels"], expected)
        assert torch.equal(rows["decoder_segment_ids"], segments)


def test_a_seq2seq_backbone_with_absolute_positions_is_refused_for_packing():
    bart = {"name": None, "pretrained": False, "model_type": "bart",
            "config_overrides": {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                                 "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                                 "vocab_size": 100}}
    refusal = r"bart with the TranslationTask head does not keep packed examples apart.*dataset\.packing=false"
    with pytest.raises(UserError, match=refusal):
        TranslationTask(backbone=bart, packing=True)
    assert not TranslationTask(backbone=bart, packing=None).packs_examples  # null: padded batches, no error


def test_a_packed_translation_trains_and_evaluates_exactly_as_padded_batches_do(tmp_path):
    # translation's shipped default (dataset.packing=null): packed wherever the module's check passes, as T5 does
    cfg = compose_config(["task=translation", *QUICK_T5, "dataset.max_eval_examples=24", "trainer.precision=32-true"],
                         tmp_path)
    cfg.trainer.max_epochs = 1
    datamodule, module = _built_with_trained_tokenizer(cfg, tmp_path)
    assert cfg.dataset.packing is None and module.packs_examples
    trainer_settings = dict(callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer = instantiate(cfg.trainer, **trainer_settings)
    trainer.fit(module, datamodule=datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    assert "decoder_segment_ids" in batch and batch["example_lengths"].sum() == (batch["segment_ids"] > 0).sum()
    packed_scores = trainer.validate(module, datamodule=datamodule)[0]
    packed_predictions = module.predictions["val"]
    cfg.dataset.packing = False
    padded_data = instantiate(cfg.dataset, _convert_="all")
    padded_data.connect(datamodule.tokenizer)
    assert "decoder_segment_ids" not in next(iter(padded_data.val_dataloader()))
    padded_scores = instantiate(cfg.trainer, **trainer_settings).validate(module, datamodule=padded_data)[0]
    assert packed_scores == pytest.approx(padded_scores, abs=1e-5) and "val/bleu" in packed_scores
    assert module.predictions["val"] == packed_predictions  # generation read the packed sources as padded ones
