"""Extractive QA: windows and labels, post-processing, bad input, a tiny-model run, and the exported pipeline."""

import json
from pathlib import Path

import pytest
import torch
from conftest import MINILM, QUICK, compose_config

from lightning_ft.backbones import load_tokenizer
from lightning_ft.data.squad import read_squad_json
from lightning_ft.errors import UserError
from lightning_ft.metrics.squad import SpanCandidates, normalize_answer, squad_scores
from lightning_ft.paths import sample_dir
from lightning_ft.tasks.qa import QuestionAnsweringData
from lightning_ft.tasks.qa.data import EXAMPLE_INDEX, align_answer
from lightning_ft.tasks.qa.model import best_answers
from lightning_ft.train import train


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


def sample_data(tokenizer, **kwargs) -> QuestionAnsweringData:
    settings = {"max_length": 96, "doc_stride": 32, "max_question_length": 32, **kwargs}
    dm = QuestionAnsweringData(tokenizer=tokenizer, data_dir=str(sample_dir("squad")), **settings)
    dm.prepare_data()
    return dm


def test_the_squad_reader_gives_the_hf_squad_rows(tmp_path):
    rows = read_squad_json(sample_dir("squad") / "validation.json")
    assert len(rows) == 106 and set(rows[0]) == {"id", "title", "context", "question", "answers"}
    assert all(r["context"][s:s + len(t)] == t for r in rows for t, s in zip(*r["answers"].values()))
    v2 = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Bob is here.", "qas": [
        {"id": "x", "question": "Who?", "is_impossible": True, "answers": [],
         "plausible_answers": [{"text": "Bob", "answer_start": 0}]}]}]}]}
    (tmp_path / "v2.json").write_text(json.dumps(v2))
    assert read_squad_json(tmp_path / "v2.json")[0]["answers"] == {"text": [], "answer_start": []}


def test_windows_cover_long_contexts_and_labels_point_at_the_answer(tokenizer):
    dm = sample_data(tokenizer)
    windows, examples = dm.references("train")
    assert len(windows) > 2 * len(examples)  # contexts of ~150 tokens in 96-token windows
    labelled = 0
    for row in windows:
        example = examples[row[EXAMPLE_INDEX]]
        if row["start_positions"] == row["cls_index"]:
            assert row["end_positions"] == row["cls_index"]
            continue
        labelled += 1
        offsets = row["offset_mapping"]
        span = example["context"][offsets[row["start_positions"]][0]:offsets[row["end_positions"]][1]]
        assert normalize_answer(span) == normalize_answer(example["answers"]["text"][0])
    assert labelled >= len(examples)  # every answer lies in at least one window
    # Consecutive windows of one question share doc_stride context tokens.
    first, second = windows[0], windows[1]
    assert first[EXAMPLE_INDEX] == second[EXAMPLE_INDEX] and second["window"] == 1
    tail = first["offset_mapping"][first["context_end"] - 31:first["context_end"] + 1]
    head = second["offset_mapping"][second["context_start"]:second["context_start"] + 32]
    assert tail == head


def test_gold_spans_as_logits_score_100_through_post_processing(tokenizer):
    """Pre- and post-processing agree: logits peaked at each window's labels give back every gold answer."""
    dm = sample_data(tokenizer)
    windows, examples = dm.references("validation")
    collector = SpanCandidates(top_k=20)
    for batch in dm.val_dataloader():
        start = torch.zeros(batch["input_ids"].shape)
        end = torch.zeros(batch["input_ids"].shape)
        rows = torch.arange(len(start))
        start[rows, batch["start_positions"]] = 10.0
        end[rows, batch["end_positions"]] = 10.0
        collector.update(batch[EXAMPLE_INDEX], batch["window"], start, end, batch["context_start"],
                         batch["context_end"], batch["cls_index"])
    answers = best_answers(collector.compute(), windows, examples)
    predictions = {qid: spans[0]["text"] for qid, spans in answers.items()}
    references = {r["id"]: r["answers"]["text"] for r in examples}
    assert len(predictions) == len(references) == 106
    assert squad_scores(predictions, references)["exact_match"] == 100.0


def test_max_answer_length_and_the_v2_null_threshold():
    import datasets

    context = "one two three four five"
    offsets = [[0, 0], [0, 3], [4, 7], [8, 13], [14, 18], [19, 23], [0, 0]]
    windows = datasets.Dataset.from_list([{EXAMPLE_INDEX: 0, "window": 0, "offset_mapping": offsets,
                                           "context_start": 1, "context_end": 5}])
    examples = datasets.Dataset.from_list([{"id": "q", "context": context}])
    candidates = {EXAMPLE_INDEX: torch.tensor([0]), "window": torch.tensor([0]),
                  "start_index": torch.tensor([[1, 3]]), "start_logit": torch.tensor([[5.0, 2.0]]),
                  "end_index": torch.tensor([[5, 3]]), "end_logit": torch.tensor([[5.0, 1.0]]),
                  "null_score": torch.tensor([4.0])}
    assert best_answers(candidates, windows, examples)["q"][0]["text"] == "one two three four five"
    short = best_answers(candidates, windows, examples, max_answer_length=3)["q"]
    # 1..5 (score 10) is 5 tokens: too long; then 3..5 (7) beats 1..3 (6) and 3..3 (3)
    assert [(s["text"], s["score"]) for s in short] == [("three four five", 7.0), ("one two three", 6.0),
                                                        ("three", 3.0)]
    # v2: the null score 4 vs the best span 7: answer nothing only when null - best > threshold
    assert best_answers(candidates, windows, examples, max_answer_length=3, version_2=True,
                        null_score_diff_threshold=-4.0)["q"][0]["text"] == ""
    assert best_answers(candidates, windows, examples, max_answer_length=3, version_2=True,
                        null_score_diff_threshold=0.0)["q"][0]["text"] == "three four five"


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_row(qid: str, context: str, question: str, text: str, start: int) -> dict:
    return {"id": qid, "context": context, "question": question,
            "answers": {"text": [text], "answer_start": [start]}}


def test_misplaced_missing_and_overlong_input_is_counted_by_id(tokenizer, tmp_path, caplog):
    context = "Paris is the capital of France. Berlin is the capital of Germany."
    rows = [
        qa_row("good", context, "Capital of France?", "Paris", 0),
        qa_row("moved", context, "Capital of Germany?", "Berlin", 3),
        qa_row("absent", context, "Capital of Spain?", "Madrid", 0),
        qa_row("long", context, "What " + "very " * 40 + "capital?", "Paris", 0),
    ]
    write_rows(tmp_path / "train.jsonl", rows)
    write_rows(tmp_path / "validation.jsonl", rows[:2])
    dm = QuestionAnsweringData(tokenizer=tokenizer, data_dir=str(tmp_path), max_length=64, doc_stride=16,
                               max_question_length=16)
    dm.prepare_data()
    assert dm.preparation["problems"]["train"] == {"answer_moved": 1, "answer_not_in_context": 1, "question_cut": 1}
    assert "absent" in caplog.text and "moved" in caplog.text and "long" in caplog.text
    windows, examples = dm.references("train")
    trained = {examples[i]["id"] for i in windows[EXAMPLE_INDEX]}
    assert trained == {"good", "moved", "long"}  # "absent" cannot be labelled: left out, and said so
    moved = next(w for w in windows if examples[w[EXAMPLE_INDEX]]["id"] == "moved")
    offsets = moved["offset_mapping"]
    assert context[offsets[moved["start_positions"]][0]:offsets[moved["end_positions"]][1]] == "Berlin"
    assert align_answer(context, "Berlin", 3) == context.index("Berlin")


def test_an_answer_wider_than_any_window_is_reported(tokenizer, tmp_path, caplog):
    context = " ".join(f"word{i}" for i in range(80))
    answer = context[: context.index("word60")].strip()
    write_rows(tmp_path / "train.jsonl", [qa_row("wide", context, "What?", answer, 0)])
    write_rows(tmp_path / "validation.jsonl", [qa_row("wide", context, "What?", answer, 0)])
    dm = QuestionAnsweringData(tokenizer=tokenizer, data_dir=str(tmp_path), max_length=48, doc_stride=8,
                               max_question_length=8)
    dm.prepare_data()
    assert dm.preparation["problems"]["train"] == {"answer_outside_every_window": 1}
    assert "wide" in caplog.text


@pytest.mark.parametrize("bad,message", [
    ({"context": "  "}, "example 'x' of the train split has an empty context"),
    ({"answers": "Paris"}, "example 'x' of the train split has answers 'Paris'"),
])
def test_unusable_rows_are_errors_that_name_the_example(tokenizer, tmp_path, bad, message):
    row = {**qa_row("x", "Paris is nice.", "Where?", "Paris", 0), **bad}
    write_rows(tmp_path / "train.jsonl", [row])
    write_rows(tmp_path / "validation.jsonl", [qa_row("y", "Paris is nice.", "Where?", "Paris", 0)])
    with pytest.raises(UserError, match=message):
        QuestionAnsweringData(tokenizer=tokenizer, data_dir=str(tmp_path)).prepare_data()


def test_a_stride_that_leaves_no_new_context_is_refused(tokenizer):
    with pytest.raises(UserError, match="doc_stride=320"):
        QuestionAnsweringData(tokenizer=tokenizer, data_dir=".", max_length=384, doc_stride=320)


def test_a_tiny_qa_run_scores_saves_answers_and_exports_a_pipeline_that_agrees(tmp_path):
    import transformers

    import lightning_ft.qa_pipeline  # noqa: F401  (registers pipeline("question-answering"))

    cfg = compose_config(["task=qa", *QUICK, "trainer.precision=32-true"], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("val/exact_match", "val/f1", "test/f1"):
        assert 0.0 <= metrics["validation" if key.startswith("val") else "test"][key] <= 100.0
    answers = json.loads((tmp_path / "predictions_val.json").read_text())
    assert len(answers) == metrics["validation"]["val/total"] > 0

    qa = transformers.pipeline("question-answering", model=str(tmp_path / "hf_model"))
    examples = {r["id"]: r for r in read_squad_json(sample_dir("squad") / "validation.json")}
    asked = [examples[qid] for qid in answers]
    got = qa([{"question": r["question"], "context": r["context"]} for r in asked])
    assert [g["answer"] for g in got] == [answers[r["id"]] for r in asked]


def test_a_squad_v2_run_scores_answerable_and_unanswerable_questions(tmp_path):
    data = tmp_path / "squad_v2"
    data.mkdir()
    for split in ("train", "validation"):
        document = json.loads((sample_dir("squad") / f"{split}.json").read_text())
        questions = [qa for article in document["data"] for p in article["paragraphs"] for qa in p["qas"]]
        for qa in questions[::3]:
            qa.update(is_impossible=True, answers=[])
        (data / f"{split}.json").write_text(json.dumps(document))
    run = tmp_path / "run"
    train(compose_config(["task=qa", *QUICK, f"dataset.data_dir={data}", "task.version_2_with_negative=true",
                          "test=false"], run))
    validation = json.loads((run / "metrics.json").read_text())["validation"]
    assert validation["val/HasAns_total"] + validation["val/NoAns_total"] == validation["val/total"]
    assert validation["val/NoAns_total"] > 0 and 0.0 <= validation["val/NoAns_exact"] <= 100.0
    answers = json.loads((run / "predictions_val.json").read_text())
    assert len(answers) == validation["val/total"]
