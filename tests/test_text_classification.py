"""Text classification end to end on tiny models: problem types, label maps, corpus-level metrics, export."""

import json
import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import MINILM, QUICK, compose_config, write_tsv
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import PreTrainedTokenizerBase

from lightning_ft.tasks.text_classification import TextClassificationData, TextClassificationTask
from lightning_ft.tasks.text_classification.data import MULTI, REGRESSION, SINGLE
from lightning_ft.train import train

WORDS = ["good", "bad", "great", "awful", "fine", "poor", "nice", "dull", "superb", "weak"]


def walk(obj):
    """Every object inside nested dicts, lists and tuples."""
    yield obj
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for child in children:
        yield from walk(child)


def make_rows(n: int, seed: int, labeller) -> list[list]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        rows.append([text, labeller(text, rng)])
    return rows


def datamodule(data_dir, tokenizer=MINILM, **kwargs) -> TextClassificationData:
    dm = TextClassificationData(tokenizer=tokenizer, data_dir=str(data_dir), batch_size=16, **kwargs)
    dm.prepare_data()
    return dm


def task_for(dm: TextClassificationData, backbone: dict) -> TextClassificationTask:
    return TextClassificationTask(backbone=backbone, **dm.model_kwargs())


def tiny_backbone(tiny_pretrained: str) -> dict:
    return {"name": tiny_pretrained, "pretrained": True}


def collect_outputs(module, loader):
    module.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            logits.append(module(**batch).logits.float())
            labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def validate(module, dm) -> dict:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, datamodule=dm, verbose=False)[0]


def test_single_label_strings_metrics_are_corpus_level(tmp_path, tiny_pretrained):
    label = lambda text, rng: rng.choice(["neg", "pos", "neutral"])  # noqa: E731
    write_tsv(tmp_path / "train.tsv", ["text", "label"], make_rows(120, 0, label))
    write_tsv(tmp_path / "validation.tsv", ["text", "label"], make_rows(101, 1, label))  # 101: ragged last batch
    dm = datamodule(tmp_path)
    assert dm.problem_type == SINGLE
    assert dm.id2label == {0: "neg", 1: "neutral", 2: "pos"}  # sorted, from the training split
    module = task_for(dm, tiny_backbone(tiny_pretrained))
    assert module.model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}

    metrics = validate(module, dm)
    logits, labels = collect_outputs(module, dm.val_dataloader())
    preds = logits.argmax(-1).numpy()
    assert metrics["val/accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-6)
    assert metrics["val/f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro"), abs=1e-5)
    assert metrics["val/mcc"] == pytest.approx(matthews_corrcoef(labels, preds), abs=1e-5)


def test_sentence_pairs_regression_reports_pearson_spearman(tmp_path, tiny_pretrained):
    def rows(n, seed):
        rng = random.Random(seed)
        return [[" ".join(rng.choices(WORDS, k=4)), " ".join(rng.choices(WORDS, k=5)), round(rng.uniform(0, 5), 3)]
                for _ in range(n)]

    header = ["sentence1", "sentence2", "score"]
    write_tsv(tmp_path / "train.tsv", header, rows(80, 0))
    write_tsv(tmp_path / "validation.tsv", header, rows(70, 1))
    dm = datamodule(tmp_path, text_column="sentence1", text_pair_column="sentence2", label_column="score")
    assert dm.problem_type == REGRESSION and dm.num_labels == 1
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].dtype == torch.float32
    assert (batch["token_type_ids"] == 1).any(), "the second sentence must be encoded as segment B"

    module = task_for(dm, tiny_backbone(tiny_pretrained))
    metrics = validate(module, dm)
    logits, labels = collect_outputs(module, dm.val_dataloader())
    assert metrics["val/pearson"] == pytest.approx(pearsonr(logits.squeeze(-1), labels)[0], abs=1e-4)
    assert metrics["val/spearman"] == pytest.approx(spearmanr(logits.squeeze(-1), labels)[0], abs=1e-4)
    assert module.monitor == ("val/spearman", "max")


def test_multi_label_from_jsonl_lists(tmp_path, tiny_pretrained):
    rng = random.Random(0)

    def rows(n):
        return [{"text": " ".join(rng.choices(WORDS, k=6)), "tags": rng.sample(["a", "b", "c", "d"], rng.randint(1, 3))}
                for _ in range(n)]

    for split, n in (("train", 60), ("validation", 45)):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows(n)))
    dm = datamodule(tmp_path, label_column="tags")
    assert dm.problem_type == MULTI and dm.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].shape[1] == 4 and batch["labels"].dtype == torch.float32

    module = task_for(dm, tiny_backbone(tiny_pretrained))
    assert module.model.config.problem_type == MULTI  # so the HF head uses BCE-with-logits
    metrics = validate(module, dm)
    logits, labels = collect_outputs(module, dm.val_dataloader())
    preds = (torch.sigmoid(logits) > 0.5).int().numpy()
    assert metrics["val/f1_micro"] == pytest.approx(f1_score(labels, preds, average="micro", zero_division=0), abs=1e-5)
    exact = float((preds == labels.numpy()).all(axis=1).mean())
    assert metrics["val/exact_match"] == pytest.approx(exact, abs=1e-6)


def test_label_separator_turns_csv_strings_into_multi_label(tmp_path):
    write_tsv(tmp_path / "train.tsv", ["text", "label"], [["a b", "x,y"], ["c", "y"], ["d e", "z"]])
    write_tsv(tmp_path / "validation.tsv", ["text", "label"], [["a", "z,x"]])
    dm = datamodule(tmp_path, label_separator=",")
    assert dm.problem_type == MULTI
    assert dm.datasets["validation"][0]["labels"] == [1.0, 0.0, 1.0]


def test_dropout_is_active_during_training(tmp_path, tiny_pretrained):
    """from_pretrained returns eval mode; Lightning keeps a submodule's mode: the task must switch it back."""
    label = lambda text, rng: rng.choice(["x", "y"])  # noqa: E731
    write_tsv(tmp_path / "train.tsv", ["text", "label"], make_rows(40, 0, label))
    write_tsv(tmp_path / "validation.tsv", ["text", "label"], make_rows(20, 1, label))
    dm = datamodule(tmp_path)
    module = task_for(dm, tiny_backbone(tiny_pretrained))
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([m.training for m in pl_module.model.modules() if isinstance(m, torch.nn.Dropout)])

    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[Probe()])
    trainer.fit(module, datamodule=dm)
    assert len(seen) == 4 and all(seen[0]) and all(all(flags) for flags in seen), "dropout was off while training"


def test_export_loads_in_pipeline_and_matches_module(tmp_path, tiny_pretrained):
    from transformers import pipeline

    label = lambda text, rng: "pos" if text.count("good") > text.count("bad") else "neg"  # noqa: E731
    write_tsv(tmp_path / "train.tsv", ["text", "label"], make_rows(60, 0, label))
    write_tsv(tmp_path / "validation.tsv", ["text", "label"], make_rows(30, 1, label))
    dm = datamodule(tmp_path)
    module = task_for(dm, tiny_backbone(tiny_pretrained))
    out = module.export(tmp_path / "hf", dm.tokenizer)
    texts = [" ".join(random.Random(i).choices(WORDS, k=7)) for i in range(12)]

    classifier = pipeline("text-classification", model=str(out), device="cpu")
    predicted = classifier(texts)
    module.eval()
    with torch.no_grad():
        probs = torch.softmax(module(**dm.tokenizer(texts, padding=True, return_tensors="pt")).logits, -1)
    for row, p in zip(predicted, probs):
        assert row["label"] == module.model.config.id2label[int(p.argmax())]
        assert row["score"] == pytest.approx(float(p.max()), abs=1e-5)


def test_export_regression_pipeline_returns_raw_score(tmp_path, tiny_pretrained):
    from transformers import pipeline

    rows = [[" ".join(random.Random(i).choices(WORDS, k=5)), round(random.Random(i).uniform(0, 5), 2)]
            for i in range(40)]
    write_tsv(tmp_path / "train.tsv", ["text", "score"], rows[:30])
    write_tsv(tmp_path / "validation.tsv", ["text", "score"], rows[30:])
    dm = datamodule(tmp_path, label_column="score")
    module = task_for(dm, tiny_backbone(tiny_pretrained))
    out = module.export(tmp_path / "hf", dm.tokenizer)
    texts = [r[0] for r in rows[:5]]
    scores = [r["score"] for r in pipeline("text-classification", model=str(out), function_to_apply="none")(texts)]
    module.eval()
    with torch.no_grad():
        expected = module(**dm.tokenizer(texts, padding=True, return_tensors="pt")).logits.squeeze(-1)
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)


def test_train_run_dir_holds_config_checkpoints_metrics_and_export(tmp_path):
    cfg = compose_config([*QUICK], tmp_path / "run")
    best = train(cfg)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["monitor"] == "val/accuracy" and metrics["best_score"] == pytest.approx(best)
    # What is tested and exported is the best checkpoint: validating it again gives the best score.
    assert metrics["validation"]["val/accuracy"] == pytest.approx(metrics["best_score"])
    assert {"test/accuracy", "test/f1_macro", "test/mcc"} <= set(metrics["test"])
    assert (run / "hf_model" / "config.json").is_file()
    exported = json.loads((run / "hf_model" / "config.json").read_text())
    assert exported["id2label"] == {"0": "negative", "1": "positive"}

    # The checkpoint holds no tokenizer: it is rebuilt from the backbone, never pickled.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(isinstance(obj, PreTrainedTokenizerBase) for obj in walk(ckpt))
    assert "datamodule_hyper_parameters" not in ckpt
    # And the module can be rebuilt from the checkpoint alone.
    restored = TextClassificationTask.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert restored.model.config.id2label == {0: "negative", 1: "positive"}


def test_ckpt_path_resumes_training(tmp_path):
    first = compose_config([*QUICK, "trainer.max_epochs=1", "test=false", "export=false"], tmp_path / "a")
    train(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    steps_one_epoch = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    second = compose_config([*QUICK, "trainer.max_epochs=3", "test=false", "export=false", f"ckpt_path={last}"],
                            tmp_path / "b")
    train(second)
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 3 * steps_one_epoch


def test_ckpt_path_that_does_not_exist_fails_before_anything_runs(tmp_path):
    from lightning_ft.errors import UserError

    cfg = compose_config([*QUICK, f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path / "run")
    with pytest.raises(UserError, match=r"ckpt_path '.*missing.ckpt' does not exist .*/checkpoints/last.ckpt"):
        train(cfg)
    assert not (tmp_path / "run").exists(), "nothing is written for a run that cannot start"
