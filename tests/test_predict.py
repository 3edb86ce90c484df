"""``python -m lightning_ft.predict``: every task's model (tiny, random weights) from its exported directory or a
Lightning checkpoint; jsonl, csv, txt and CoNLL in, jsonl, csv, npy and CoNLL out; one clear sentence for bad input
(another encoding than UTF-8, ragged CSV rows, an unclosed quote), and an existing output left as it was unless
overwrite=true, never replaced by its own input, and written whole through a temporary file of each run's own."""

import json
import os
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


def test_a_model_without_a_task_head_is_refused_by_name(tiny_pretrained, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("hello\n")
    assert main([tiny_pretrained, str(source), str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "holds a BertModel, which has no task head predict knows" in err and "token classification" in err


def test_the_command_line_entry_point(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("Barack Obama was born in Hawaii.\n")
    result = run_cli([str(model_dir), str(source), str(tmp_path / "out.conll")], tmp_path,
                     module="lightning_ft.predict")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tagged 1 sentences (7 words)" in result.stderr
    assert [line.split("\t")[0] for line in (tmp_path / "out.conll").read_text().split("\n") if line] == [
        "Barack", "Obama", "was", "born", "in", "Hawaii", "."]


# ---- every task, key=value form ------------------------------------------------------------------------------------
def _export(model, path: Path, tokenizer=None) -> Path:
    from lightning_ft.backbones import load_tokenizer

    model.save_pretrained(path)
    (tokenizer or load_tokenizer(MINILM)).save_pretrained(path)
    return path


def _tiny_bert(auto_class: str, path: Path, **config):
    """A 2-layer, 32-wide BERT head of ``auto_class`` with MiniLM's vocabulary, exported to ``path``."""
    import torch
    import transformers
    from transformers import AutoConfig

    from lightning_ft.backbones import resolve_name

    torch.manual_seed(0)
    model = getattr(transformers, auto_class).from_config(
        AutoConfig.from_pretrained(resolve_name(MINILM), **config, **TINY))
    return model


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _predict(*args: str) -> int:
    return main([str(a) for a in args])


SENTIMENT = {0: "negative", 1: "positive", 2: "neutral"}


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    model = _tiny_bert("AutoModelForSequenceClassification", None, num_labels=3, id2label=SENTIMENT,
                       label2id={v: k for k, v in SENTIMENT.items()})
    return _export(model, tmp_path_factory.mktemp("classifier"))


def test_text_classification_gives_a_label_and_its_probability_and_keeps_the_ids(classifier_dir, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["a gripping, beautifully acted film", "dull", "it rained all day and nobody came", "fine"]
    source = _write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    assert _predict(f"model_dir={classifier_dir}", f"input={source}", f"output={tmp_path / 'out.jsonl'}",
                    "batch_size=3") == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3"] and [r["text"] for r in rows] == texts
    # the model's own softmax, row by row: batching and padding change nothing
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    for row in rows:
        with torch.no_grad():
            probabilities = torch.softmax(model(**tokenizer(row["text"], return_tensors="pt")).logits[0], -1)
        assert row["label"] == SENTIMENT[int(probabilities.argmax())]
        assert row["score"] == pytest.approx(float(probabilities.max()), abs=1e-5) and 1 / 3 <= row["score"] <= 1


def test_csv_in_csv_out_keeps_the_columns_and_a_gold_label_column(classifier_dir, tmp_path):
    import csv

    source = tmp_path / "in.csv"
    source.write_text('id,sentence,label\n7,"good, really good",positive\n8,bad,negative\n')
    assert _predict(f"model_dir={classifier_dir}", f"input={source}", f"output={tmp_path / 'out.csv'}") == 0
    with (tmp_path / "out.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == ["7", "8"] and rows[0]["sentence"] == "good, really good"
    # the gold label stays where it was; the prediction goes beside it
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert all(r["predicted_label"] in SENTIMENT.values() and 0 < float(r["score"]) <= 1 for r in rows)


def test_multi_label_gives_the_labels_above_the_threshold_with_their_probabilities(tmp_path):
    import torch

    labels = {0: "sports", 1: "politics", 2: "science"}
    model = _tiny_bert("AutoModelForSequenceClassification", None, num_labels=3, id2label=labels,
                       label2id={v: k for k, v in labels.items()}, problem_type="multi_label_classification")
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([6.0, -6.0, 6.0]))  # sports and science, never politics
    model_dir = _export(model, tmp_path / "model")
    (tmp_path / "in.txt").write_text("the match ended in a draw\nnew rules for the lab\n")
    assert _predict(model_dir, tmp_path / "in.txt", tmp_path / "out.jsonl") == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["labels"] for r in rows] == [["sports", "science"]] * 2
    assert all(0.5 < s <= 1 for r in rows for s in r["scores"]) and len(rows[0]["scores"]) == 2
    assert _predict(model_dir, tmp_path / "in.txt", tmp_path / "none.jsonl", "--threshold", "0.99999") == 0
    assert [r["labels"] for r in read_jsonl(tmp_path / "none.jsonl")] == [[], []]


def test_regression_on_sentence_pairs_reads_the_pair_column(tmp_path):
    import torch

    model = _tiny_bert("AutoModelForSequenceClassification", None, num_labels=1, problem_type="regression")
    model_dir = _export(model, tmp_path / "model")
    rows = [{"text": "A man plays a guitar.", "text_pair": "Someone makes music."},
            {"text": "A man plays a guitar.", "text_pair": "The stock market fell."}]
    source = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert _predict(f"model_dir={model_dir}", f"input={source}", f"output={tmp_path / 'out.jsonl'}") == 0
    scores = [r["score"] for r in read_jsonl(tmp_path / "out.jsonl")]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        expected = model.eval()(**tokenizer([r["text"] for r in rows], [r["text_pair"] for r in rows],
                                            padding=True, return_tensors="pt")).logits[:, 0]
    assert scores == pytest.approx(expected.tolist(), abs=1e-5) and scores[0] != scores[1]


def test_ner_in_key_value_form_writes_csv_with_json_cells(model_dir, tmp_path):
    import csv

    source = _write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "sentence": "Angela Merkel visited Paris"}])
    assert _predict(f"model_dir={model_dir}", f"input={source}", f"output={tmp_path / 'out.csv'}",
                    "column=sentence") == 0
    with (tmp_path / "out.csv").open(newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["id"] == "1" and json.loads(row["tokens"]) == ["Angela", "Merkel", "visited", "Paris"]
    assert set(json.loads(row["tags"])) <= set(LABELS.values())


def test_question_answering_answers_with_a_span_of_the_context_as_the_pipeline_does(tmp_path):
    import transformers

    import lightning_ft.qa_pipeline  # noqa: F401  (registers the pipeline)

    model_dir = _export(_tiny_bert("AutoModelForQuestionAnswering", None), tmp_path / "qa")
    long_context = " ".join(f"Sentence {i} says the river {i} flows north into lake {i}." for i in range(12))
    rows = [{"id": "q1", "question": "Where is Normandy?", "context": "Normandy is a region in France."},
            {"id": "q2", "question": "Where does river 7 flow?", "context": long_context}]
    source = _write_jsonl(tmp_path / "questions.jsonl", rows)
    # short windows: the long context is read in several overlapping ones
    assert _predict(f"model_dir={model_dir}", f"input={source}", f"output={tmp_path / 'answers.jsonl'}",
                    "max_length=48", "doc_stride=16") == 0
    answers = read_jsonl(tmp_path / "answers.jsonl")
    assert [a["id"] for a in answers] == ["q1", "q2"]
    qa = transformers.pipeline("question-answering", model=str(model_dir))
    for row, answer in zip(rows, answers):
        assert answer["answer"] and row["context"][answer["start"]:answer["end"]] == answer["answer"]
        assert 0 < answer["score"] <= 1
        expected = qa(question=row["question"], context=row["context"], max_seq_len=48, doc_stride=16)
        assert (answer["answer"], answer["start"], answer["end"]) == (expected["answer"], expected["start"],
                                                                      expected["end"])
        assert answer["score"] == pytest.approx(expected["score"], abs=1e-4)


def test_multiple_choice_picks_one_of_each_rows_choices(tmp_path):
    model_dir = _export(_tiny_bert("AutoModelForMultipleChoice", None), tmp_path / "mc")
    rows = [{"id": "a", "question": "What do plants need?", "choices": ["sunlight", "plastic", "noise", "metal"]},
            {"id": "b", "question": "Ice is", "choices": ["frozen water", "hot gas", "a metal"]}]
    source = _write_jsonl(tmp_path / "choices.jsonl", rows)
    assert _predict(f"model_dir={model_dir}", f"input={source}", f"output={tmp_path / 'out.jsonl'}") == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == ["a", "b"]
    for row, given in zip(out, rows):  # rows with 4 and 3 choices in one batch
        assert 0 <= row["choice"] < len(given["choices"]) and len(row["scores"]) == len(given["choices"])
        assert sum(row["scores"]) == pytest.approx(1.0, abs=1e-5) and max(row["scores"]) == row["scores"][row["choice"]]
        assert row["choice_text"] == given["choices"][row["choice"]] and row["choice_label"] in "ABCD"
    # OpenBookQA's own layout: the question's stem and its choices (dicts with text and label)
    source = _write_jsonl(tmp_path / "obqa.jsonl", [{"id": "c", "question": {"stem": "The sun is", "choices": [
        {"text": "a star", "label": "A"}, {"text": "a moon", "label": "B"}]}}])
    assert _predict(f"model_dir={model_dir}", f"input={source}", f"output={tmp_path / 'obqa_out.jsonl'}") == 0
    (row,) = read_jsonl(tmp_path / "obqa_out.jsonl")
    assert (row["choice_label"], row["choice_text"]) in {("A", "a star"), ("B", "a moon")}


TEXTS = ["a dog runs in the park", "two cats sleep on a mat", "the sun is warm today", "a man reads a book"] * 10


def test_translation_generates_what_the_pipeline_generates(tmp_path):
    import torch
    import transformers

    import lightning_ft.seq2seq_pipeline  # noqa: F401  (registers the pipelines)
    from lightning_ft.backbones import load_tokenizer, resolve_name
    from lightning_ft.tasks.seq2seq import TranslationTask

    torch.manual_seed(0)  # a fixed vocabulary (MiniLM's) and fixed weights: the same generations every run
    TranslationTask(backbone={"name": None, "pretrained": False, "model_type": "t5", "tokenizer": resolve_name(MINILM),
                              "config_overrides": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1,
                                                   "num_heads": 2}},
                    num_beams=2, max_new_tokens=6, source_prefix="translate: ").export(tmp_path / "t5",
                                                                                       load_tokenizer(MINILM))
    (tmp_path / "sources.txt").write_text("a dog runs\ntwo cats sleep on a mat today\n")
    assert _predict(f"model_dir={tmp_path / 't5'}", f"input={tmp_path / 'sources.txt'}",
                    f"output={tmp_path / 'out.jsonl'}") == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    translator = transformers.pipeline("translation", model=str(tmp_path / "t5"))
    assert [r["generated_text"] for r in rows] == [translator(r["text"])[0]["translation_text"] for r in rows]
    assert all(r["generated_text"] for r in rows)
    # a generation setting of the call wins over the exported one
    assert _predict(f"model_dir={tmp_path / 't5'}", f"input={tmp_path / 'sources.txt'}",
                    f"output={tmp_path / 'short.jsonl'}", "max_new_tokens=1", "num_beams=1") == 0
    assert [len(r["generated_text"].split()) for r in read_jsonl(tmp_path / "short.jsonl")] == [1, 1]


def test_causal_lm_continues_each_prompt_as_it_would_alone(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from lightning_ft.backbones import match_tokenizer
    from lightning_ft.tokenizer_training import train_tokenizer

    tokenizer = train_tokenizer(TEXTS, algorithm="bpe", vocab_size=300, add_eos=False)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64)
    match_tokenizer(config, tokenizer)
    torch.manual_seed(0)
    model_dir = _export(AutoModelForCausalLM.from_config(config), tmp_path / "gpt2", tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    _write_jsonl(prompts, [{"id": 1, "prompt": "a dog"}, {"id": 2, "prompt": "two cats sleep on a mat"}])
    assert _predict(f"model_dir={model_dir}", f"input={prompts}", f"output={tmp_path / 'out.jsonl'}",
                    "max_new_tokens=5") == 0
    batched = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in batched] == [1, 2] and all(r["continuation"] for r in batched)
    # left padding and position ids: the short prompt, padded in a batch, continues as it does alone
    assert _predict(f"model_dir={model_dir}", f"input={prompts}", f"output={tmp_path / 'alone.jsonl'}",
                    "max_new_tokens=5", "batch_size=1") == 0
    assert [r["continuation"] for r in read_jsonl(tmp_path / "alone.jsonl")] == [r["continuation"] for r in batched]


def test_masked_lm_fills_every_mask_with_probabilities(tmp_path, capsys):
    model_dir = _export(_tiny_bert("AutoModelForMaskedLM", None), tmp_path / "mlm")
    (tmp_path / "in.txt").write_text("paris is the [MASK] of france.\nthe [MASK] sat on the [MASK].\n")
    assert _predict(f"model_dir={model_dir}", f"input={tmp_path / 'in.txt'}", f"output={tmp_path / 'out.jsonl'}",
                    "top_k=3") == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [len(r["fills"]) for r in rows] == [1, 2]
    for row in rows:
        for fills in row["fills"]:
            scores = [f["score"] for f in fills]
            assert len(fills) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
        assert "[MASK]" not in row["sequence"] and row["sequence"].endswith(".")
    (tmp_path / "no_mask.txt").write_text("paris is the capital of france.\n")
    assert _predict(f"model_dir={model_dir}", f"input={tmp_path / 'no_mask.txt'}",
                    f"output={tmp_path / 'no_mask.jsonl'}") == 2
    assert "row 1 of" in capsys.readouterr().err


def test_embeddings_as_jsonl_rows_or_an_npy_matrix(tmp_path):
    import numpy as np

    from lightning_ft.backbones import load_tokenizer
    from lightning_ft.tasks.similarity import SimilarityTask

    tiny = {**TINY, "num_hidden_layers": 1}
    SimilarityTask(backbone={"name": MINILM, "pretrained": False, "config_overrides": tiny}).export(
        tmp_path / "encoder", load_tokenizer(MINILM))
    source = _write_jsonl(tmp_path / "in.jsonl", [{"id": 3, "sentence": "A man plays."}, {"id": 4, "sentence": "Hi"}])
    assert _predict(f"model_dir={tmp_path / 'encoder'}", f"input={source}", f"output={tmp_path / 'out.jsonl'}") == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [3, 4] and all(len(r["embedding"]) == 32 for r in rows)
    assert all(np.linalg.norm(r["embedding"]) == pytest.approx(1.0, abs=1e-5) for r in rows)  # normalised
    assert _predict(f"model_dir={tmp_path / 'encoder'}", f"input={source}", f"output={tmp_path / 'out.npy'}") == 0
    assert np.allclose(np.load(tmp_path / "out.npy"), [r["embedding"] for r in rows], atol=1e-6)


# ---- Lightning checkpoints -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of a tiny text classifier: one training step of pl.Trainer, then save_checkpoint."""
    import pytorch_lightning as pl
    import torch

    from lightning_ft.backbones import load_tokenizer
    from lightning_ft.tasks.text_classification import TextClassificationTask

    torch.manual_seed(0)
    module = TextClassificationTask(backbone={"name": MINILM, "pretrained": False, "config_overrides": TINY},
                                    num_labels=3, id2label=SENTIMENT)
    tokenizer = load_tokenizer(MINILM)
    batch = {**tokenizer(["good film", "bad film"], padding=True, return_tensors="pt"), "labels": torch.tensor([1, 0])}
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([dict(batch)], batch_size=None))
    run = tmp_path_factory.mktemp("run")
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    module.export(run / "hf_model", tokenizer)  # what the run would export from the same weights
    return run / "checkpoints" / "last.ckpt"


def test_a_checkpoint_predicts_what_its_export_predicts(checkpoint, tmp_path):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(["good", "so bad", "ok"])])
    assert _predict(f"ckpt_path={checkpoint}", f"input={source}", f"output={tmp_path / 'ckpt.jsonl'}") == 0
    assert _predict(f"model_dir={checkpoint.parent.parent}", f"input={source}",
                    f"output={tmp_path / 'export.jsonl'}") == 0
    from_checkpoint, from_export = read_jsonl(tmp_path / "ckpt.jsonl"), read_jsonl(tmp_path / "export.jsonl")
    assert [r["label"] for r in from_checkpoint] == [r["label"] for r in from_export]
    assert [r["score"] for r in from_checkpoint] == pytest.approx([r["score"] for r in from_export], abs=1e-5)
    # the positional form takes a .ckpt as the model too
    assert _predict(checkpoint, source, tmp_path / "positional.jsonl") == 0


# ---- bad input: one sentence, and an existing output left as it was ------------------------------------------------
@pytest.fixture
def existing(tmp_path) -> Path:
    """An output file from an earlier run, which a failed prediction must not touch."""
    path = tmp_path / "out.jsonl"
    path.write_text('{"earlier": "run"}\n')
    return path


def _leftovers(folder: Path) -> list[str]:
    """Temporary files left in ``folder`` (predict's are hidden: ``.<output>.<random>.tmp``)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _fails(capsys, existing: Path, *args, overwrite: bool = True) -> str:
    """Predict with ``args`` (and ``overwrite=true``, unless told not to, so that the refusal met is the one the test is
    about, not the existing output's), which must fail with one line and leave ``existing`` as it was."""
    assert _predict(*args, *(["overwrite=true"] if overwrite else [])) == 2
    assert existing.read_text() == '{"earlier": "run"}\n' and not _leftovers(existing.parent)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def test_a_ckpt_path_that_does_not_exist(existing, tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    err = _fails(capsys, existing, f"ckpt_path={tmp_path / 'run' / 'last.ckpt'}", f"input={source}",
                 f"output={existing}")
    assert "ckpt_path '" in err and "last.ckpt' does not exist" in err


def test_a_file_that_is_no_lightning_ft_checkpoint(existing, tmp_path, capsys):
    import torch

    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    err = _fails(capsys, existing, f"ckpt_path={tmp_path / 'junk.ckpt'}", f"input={source}", f"output={existing}")
    assert "junk.ckpt' cannot be read, it is truncated or not a checkpoint" in err
    torch.save({"state_dict": {}, "epoch": 0}, tmp_path / "other.ckpt")  # a Lightning checkpoint of another program
    err = _fails(capsys, existing, f"ckpt_path={tmp_path / 'other.ckpt'}", f"input={source}", f"output={existing}")
    assert "was not written by a lightning_ft run" in err


def test_a_checkpoint_of_another_task_or_backbone(checkpoint, existing, tmp_path, capsys):
    import torch

    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    err = _fails(capsys, existing, f"ckpt_path={checkpoint}", "task=qa", f"input={source}", f"output={existing}")
    assert "holds a text classification (task=text_classification) model, not task=qa" in err
    # the backbone it names now builds another model (e.g. its directory was replaced): said before any prediction
    saved = torch.load(checkpoint, weights_only=True)
    saved["hyper_parameters"]["backbone"]["config_overrides"]["hidden_size"] = 64
    torch.save(saved, tmp_path / "other_backbone.ckpt")
    err = _fails(capsys, existing, f"ckpt_path={tmp_path / 'other_backbone.ckpt'}", f"input={source}",
                 f"output={existing}")
    assert "does not fit the model its backbone" in err and "weights of another shape" in err


def test_an_input_without_the_text_column(classifier_dir, existing, tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "review": "good"}])
    err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"output={existing}")
    assert "has no text column ('text' or 'sentence' or 'sentence1'; it has: id, review)" in err
    assert "column=<column>" in err
    err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"output={existing}",
                 "column=body")
    assert "has no text column 'body' (it has: id, review)" in err
    _write_jsonl(source, [{"question": "Why?"}])
    err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"output={existing}",
                 "column=question", "pair_column=context")
    assert "has no pair column 'context'" in err


def test_an_output_that_cannot_be_written(classifier_dir, existing, tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}",
                 f"output={tmp_path / 'missing' / 'out.jsonl'}")
    assert "cannot be written: its directory" in err and "does not exist" in err
    err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}",
                 f"output={existing / 'out.jsonl'}")  # under a file
    assert "is not a directory" in err
    err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"output={tmp_path}")
    assert "is a directory" in err


def test_a_failure_while_predicting_leaves_the_existing_output(classifier_dir, existing, tmp_path, monkeypatch):
    import dataclasses

    from lightning_ft.tasks import text_classification

    calls = []
    original = text_classification.SPEC.prediction.rows

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    spec = dataclasses.replace(text_classification.SPEC,
                               prediction=dataclasses.replace(text_classification.SPEC.prediction, rows=failing))
    monkeypatch.setattr("lightning_ft.tasks.of_export", lambda config, path, wanted=None: spec)
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}, {"text": "bad"}])
    with pytest.raises(RuntimeError):
        _predict(f"model_dir={classifier_dir}", f"input={source}", f"output={existing}", "batch_size=1",
                 "overwrite=true")
    assert existing.read_text() == '{"earlier": "run"}\n' and not _leftovers(tmp_path)


def test_a_mistyped_or_foreign_option_names_the_known_ones(classifier_dir, existing, tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"ouput={existing}")
    assert "unknown option 'ouput' (did you mean output?)" in err and "model_dir, ckpt_path, input, output" in err
    err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"output={existing}",
                 "max_new_tokens=5")
    assert "max_new_tokens is not an option of a text classification" in err and "pair_column" in err
    err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"output={existing}",
                 "threshold=high")
    assert "threshold='high' is not a number" in err


# ---- the output: never lost, never the input, written whole -------------------------------------------------------
def test_an_existing_output_is_refused_before_any_model_loads_unless_overwrite(classifier_dir, existing, tmp_path,
                                                                              monkeypatch, capsys):
    import lightning_ft.predict

    source = _write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "good"}])
    with monkeypatch.context() as patched:
        patched.setattr(lightning_ft.predict, "load_exported", lambda *args: pytest.fail("the model was loaded"))
        err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"output={existing}",
                     overwrite=False)
        assert err == f"error: output '{existing}' exists: give another output path, or overwrite=true to replace it.\n"
        err = _fails(capsys, existing, classifier_dir, source, existing, "--batch-size", "2", overwrite=False)
        assert err == f"error: output '{existing}' exists: give another output path, or --overwrite to replace it.\n"
        err = _fails(capsys, existing, classifier_dir, source, existing, "--overwrite", "false", overwrite=False)
        assert "--overwrite to replace it" in err
        err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"output={existing}",
                     "overwrite=maybe", overwrite=False)
        assert "overwrite='maybe' is not true or false" in err
        # a bad input is said first: fixing it does not then meet this refusal as a surprise
        err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"output={existing}",
                     "column=body", overwrite=False)
        assert "has no text column 'body'" in err
    # told to: replaced, in either form; a bare --overwrite is true, wherever it stands
    for args in ([f"model_dir={classifier_dir}", f"input={source}", f"output={existing}", "overwrite=true"],
                 [classifier_dir, source, existing, "--overwrite"],
                 ["--overwrite", classifier_dir, source, existing],
                 [classifier_dir, source, existing, "--overwrite", "true", "--batch-size", "1"]):
        existing.write_text('{"earlier": "run"}\n')
        assert _predict(*args) == 0, args
        assert [r["id"] for r in read_jsonl(existing)] == [1] and not _leftovers(tmp_path)


def test_overwrite_is_a_known_option_shown_by_help(classifier_dir, existing, tmp_path, capsys):
    assert _predict("--help") == 0
    assert "``overwrite`` (false; a bare ``--overwrite`` is true)" in capsys.readouterr().out
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    err = _fails(capsys, existing, f"model_dir={classifier_dir}", f"input={source}", f"output={existing}",
                 "overwrit=true", overwrite=False)
    assert "unknown option 'overwrit' (did you mean overwrite?)" in err and "output, overwrite, batch_size" in err


def test_the_output_is_never_the_input_not_even_with_overwrite(classifier_dir, tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    (tmp_path / "link.jsonl").symlink_to(source)
    os.link(source, tmp_path / "hard.jsonl")
    (tmp_path / "sub").mkdir()
    for output in (source, tmp_path / "sub" / ".." / "in.jsonl", tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        assert _predict(f"model_dir={classifier_dir}", f"input={source}", f"output={output}", "overwrite=true") == 2
        err = capsys.readouterr().err
        assert err == (f"error: output '{output}' is the input file '{source}': give another output path (predict "
                       "never writes over its input, not even with overwrite).\n")
    # the other way round too: the input named through the link, the output the file itself
    assert _predict(f"model_dir={classifier_dir}", f"input={tmp_path / 'link.jsonl'}", f"output={source}",
                    "--overwrite") == 2
    assert "is the input file" in capsys.readouterr().err
    assert source.read_text() == '{"text": "good"}\n' and not _leftovers(tmp_path)


def test_each_run_writes_a_temporary_file_of_its_own_in_the_outputs_folder(classifier_dir, tmp_path, monkeypatch):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    target = tmp_path / "out.jsonl"
    stale = tmp_path / "out.jsonl.tmp"  # another program's file, or one of an older version's killed run
    stale.write_text("not ours\n")
    moved = []
    real = os.replace

    def replace(src, dst):
        moved.append(Path(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    for _ in range(2):
        assert _predict(f"model_dir={classifier_dir}", f"input={source}", f"output={target}", "overwrite=true") == 0
    assert len(moved) == 2 and moved[0] != moved[1]
    for temporary in moved:
        assert temporary.parent == tmp_path and temporary.name.startswith(".out.jsonl.") and temporary.suffix == ".tmp"
    assert stale.read_text() == "not ours\n" and _leftovers(tmp_path) == ["out.jsonl.tmp"]
    assert [r["text"] for r in read_jsonl(target)] == ["good"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as a plain open() makes it, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_of_two_runs_writing_one_output_the_later_to_finish_wins_whole(classifier_dir, existing, tmp_path,
                                                                       monkeypatch):
    first = _write_jsonl(tmp_path / "first.jsonl", [{"id": i, "text": "good"} for i in range(3)])
    second = _write_jsonl(tmp_path / "second.jsonl", [{"id": 10 + i, "text": "bad"} for i in range(5)])
    real = os.replace

    def replace(src, dst):  # the first run has written its rows; the second one runs now and finishes first
        monkeypatch.setattr(os, "replace", real)
        assert _predict(f"model_dir={classifier_dir}", f"input={second}", f"output={existing}", "overwrite=true") == 0
        assert [r["id"] for r in read_jsonl(existing)] == [10, 11, 12, 13, 14]
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert _predict(f"model_dir={classifier_dir}", f"input={first}", f"output={existing}", "overwrite=true") == 0
    assert [r["id"] for r in read_jsonl(existing)] == [0, 1, 2] and not _leftovers(tmp_path)


def _rows_calling(monkeypatch, before) -> None:
    """Text classification's rows function, calling ``before(call number)`` first."""
    import dataclasses

    from lightning_ft.tasks import text_classification

    calls = []
    original = text_classification.SPEC.prediction.rows

    def rows(*args, **kwargs):
        calls.append(1)
        before(len(calls))
        return original(*args, **kwargs)

    spec = dataclasses.replace(text_classification.SPEC,
                               prediction=dataclasses.replace(text_classification.SPEC.prediction, rows=rows))
    monkeypatch.setattr("lightning_ft.tasks.of_export", lambda config, path, wanted=None: spec)


def test_an_output_another_program_writes_while_predicting_is_kept(classifier_dir, tmp_path, monkeypatch, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    target = tmp_path / "out.jsonl"
    _rows_calling(monkeypatch, lambda call: target.write_text("theirs\n"))
    assert _predict(f"model_dir={classifier_dir}", f"input={source}", f"output={target}") == 2
    assert capsys.readouterr().err.endswith(f"\nerror: output '{target}' was created by another program while "
                                            "predicting, and is left as it is: give another output path, or "
                                            "overwrite=true to replace it.\n")  # after the progress bars
    assert target.read_text() == "theirs\n" and not _leftovers(tmp_path)


# ---- input encodings and CSV/TSV shapes: one sentence naming the row, before any model loads ----------------------
def _refuses_input(capsys, existing: Path, model: Path, source: Path) -> str:
    """Predict ``source`` into a new file, which must be refused: one line, nothing written, ``existing`` untouched."""
    fresh = existing.parent / "predictions.jsonl"
    err = _fails(capsys, existing, f"model_dir={model}", f"input={source}", f"output={fresh}", overwrite=False)
    assert not fresh.exists()
    return err


def test_an_input_that_is_not_utf8_names_its_line(classifier_dir, existing, tmp_path, capsys):
    for name, text in [("in.csv", "id,text\n1,good\n2,café au lait\n"), ("in.txt", "good\nfine\ncafé au lait\n"),
                       ("in.jsonl", '{"text": "good"}\n\n{"text": "café"}\n')]:
        source = tmp_path / name
        source.write_bytes(text.encode("latin-1"))  # what a spreadsheet saving as "Western" writes
        offset = text.index("é")
        err = _refuses_input(capsys, existing, classifier_dir, source)
        assert err == (f"error: input '{source}' is not UTF-8 (line 3, byte offset {offset}: 0xe9): save it as UTF-8 "
                       "(in a spreadsheet or editor: Save As, encoding UTF-8).\n")


def test_a_utf8_byte_order_mark_is_accepted(classifier_dir, tmp_path):
    import csv

    files = {"in.csv": "text,id\ngood,1\n", "in.tsv": "text\tid\ngood\t1\n", "in.txt": "good\n",
             "in.jsonl": '{"text": "good", "id": "1"}\n', "in.json": '[{"text": "good", "id": "1"}]'}
    for name, text in files.items():
        source = tmp_path / name
        source.write_bytes("\ufeff".encode() + text.encode())  # what Excel's "CSV UTF-8" writes
        output = tmp_path / f"out_{source.suffix[1:]}.csv"
        assert _predict(f"model_dir={classifier_dir}", f"input={source}", f"output={output}") == 0, name
        with output.open(encoding="utf-8", newline="") as handle:
            (row,) = list(csv.DictReader(handle))
        assert row["text"] == "good" and row.get("id", "1") == "1" and row["label"] in SENTIMENT.values(), name


def test_a_csv_or_tsv_row_with_more_or_fewer_fields_than_the_header(classifier_dir, existing, tmp_path, capsys):
    source = tmp_path / "in.csv"
    source.write_text('id,text,label\n1,"good, really",positive\n\n2,bad,negative,extra\n')
    err = _refuses_input(capsys, existing, classifier_dir, source)
    assert err == (f"error: row 2 of {source} (line 4) has 4 fields but the header has 3: quote a value that holds a "
                   'comma ("a, b"), or remove the extra commas.\n')
    source.write_text("id,text,label\n1,good,positive\n2,bad\n")
    err = _refuses_input(capsys, existing, classifier_dir, source)
    assert err == (f"error: row 2 of {source} (line 3) has 2 fields but the header has 3: add the missing ones (an "
                   "empty value is still a comma), or drop the row.\n")
    tsv = tmp_path / "in.tsv"
    tsv.write_text("id\ttext\n1\tgood\textra\n")
    err = _refuses_input(capsys, existing, classifier_dir, tsv)
    assert "row 1 of" in err and "(line 2) has 3 fields but the header has 2: remove the extra tabs." in err
    tsv.write_text("id\ttext\tlabel\n1\tgood\n")
    err = _refuses_input(capsys, existing, classifier_dir, tsv)
    assert "has 2 fields but the header has 3: add the missing ones (an empty value is still a tab)" in err


def test_an_unclosed_quote_in_a_csv_is_refused_and_quoted_line_breaks_are_kept(classifier_dir, existing, tmp_path,
                                                                               capsys):
    source = tmp_path / "in.csv"
    source.write_text('id,text\n1,good\n2,"bad\n3,fine\n4,ok\n')  # the quote swallows the rest of the file
    err = _refuses_input(capsys, existing, classifier_dir, source)
    assert err.startswith(f"error: row 2 of {source} (from line 3) has an unclosed or stray quote (")
    assert err.endswith('close the quoted value, and write a quote inside one as "".\n')
    source.write_text('id,text\n1,"bad\n2,fine"x\n')  # closed by another row's stray quote
    err = _refuses_input(capsys, existing, classifier_dir, source)
    assert f"row 1 of {source} (from line 2) has an unclosed or stray quote" in err
    source.write_text('id,text,label\n1,"bad,negative\n2,fine",positive,x\n')  # closed where a field ends
    err = _refuses_input(capsys, existing, classifier_dir, source)
    assert err == (f"error: row 1 of {source} (lines 2-3) has an unclosed quote that runs over line breaks into the "
                   'next rows: close the quoted value (write a quote inside one as "").\n')
    # a well-formed file: quoted commas, doubled quotes and line breaks inside quotes are values like any other
    source.write_text('id,text\n1,"line one\nline two, with a comma"\n2,"say ""hi"""\n')
    assert _predict(f"model_dir={classifier_dir}", f"input={source}", f"output={tmp_path / 'new.jsonl'}") == 0
    assert [r["text"] for r in read_jsonl(tmp_path / "new.jsonl")] == ["line one\nline two, with a comma", 'say "hi"']


def test_a_file_laid_out_like_the_training_data_needs_no_column_options(tmp_path):
    """The columns the model trained on travel with its checkpoint and its export."""
    from conftest import QUICK, compose_config, write_tsv

    from lightning_ft.train import train

    data = tmp_path / "data"
    rows = [["#1", f"a {'good' if i % 2 else 'bad'} film", f"it was {i}", i % 2] for i in range(16)]
    for split in ("train", "validation"):
        write_tsv(data / f"{split}.tsv", ["id", "#1 String", "#2 String", "Quality"], rows)
    run = tmp_path / "run"
    train(compose_config([*QUICK, f"dataset.data_dir={data}", "dataset.text_column='#1 String'",
                          "dataset.text_pair_column='#2 String'", "dataset.label_column=Quality", "test=false"], run))
    source = _write_jsonl(tmp_path / "in.jsonl", [{"#1 String": "a good film", "#2 String": "it was 1"}])
    from_export, from_checkpoint = tmp_path / "export.jsonl", tmp_path / "checkpoint.jsonl"
    assert _predict(f"model_dir={run}", f"input={source}", f"output={from_export}") == 0
    assert _predict(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={source}",
                    f"output={from_checkpoint}") == 0
    for output in (from_export, from_checkpoint):
        (row,) = [json.loads(line) for line in output.read_text().splitlines()]
        assert row["label"] in ("0", "1") and 0 < row["score"] <= 1
