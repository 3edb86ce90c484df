"""The GLUE dataset configs: each task's published metrics (task.metrics, task.positive_label), GLUE's own TSV
layouts read locally (a byte-order mark, bare quotes, CoLA's header-less files), the hub layouts renamed to them, and
GLUE's unlabelled test files refused as a test split. The rows are made up here; the layouts are GLUE's."""

import json
import random
import re

import pytest
import pytorch_lightning as pl
import torch
from conftest import QUICK, compose_config
from hydra.utils import instantiate
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from lightning_ft.errors import UserError
from lightning_ft.tasks.text_classification import TextClassificationData, TextClassificationTask
from lightning_ft.train import train

WORDS = ["the", "cat", "sat", "on", "a", "mat", '"quoted"', "dog", "ran", "home", "'s", "fast", "slowly", "it"]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))


def write(path, lines: list[str], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


def mrpc_folder(folder, rows: int = 60):
    """MRPC as GLUE ships it: a byte-order mark on train.tsv's header, bare quote characters in the sentences, and a
    test.tsv without the Quality column."""
    rng = random.Random(0)
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    for split, bom in (("train", True), ("dev", False)):
        write(folder / f"{split}.tsv", [header] + [f"{rng.randint(0, 1)}\t{i}\t{i + 1}\t{sentence(rng)}\t"
                                                   f"{sentence(rng)}" for i in range(rows)], bom=bom)
    write(folder / "test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String"]
          + [f"{i}\t{i}\t{i + 1}\t{sentence(rng)}\t{sentence(rng)}" for i in range(10)])
    return folder


def test_mrpc_config_reads_glue_tsvs_and_reports_positive_f1_and_accuracy(tmp_path):
    data = mrpc_folder(tmp_path / "mrpc")
    run = tmp_path / "run"
    train(compose_config([*QUICK, "dataset=mrpc", f"dataset.data_dir={data}"], run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["monitor"] == "val/f1"
    assert set(metrics["test"]) >= {"test/f1", "test/accuracy"} and "test/mcc" not in metrics["test"]
    exported = json.loads((run / "hf_model" / "config.json").read_text())
    assert exported["id2label"] == {"0": "not_equivalent", "1": "equivalent"}


def test_cola_config_reads_header_less_tsvs_and_reports_mcc(tmp_path):
    rng = random.Random(1)
    for split in ("train", "dev"):  # source, label, original label ("*" where unacceptable), sentence
        lines = []
        for _ in range(60):
            label = rng.randint(0, 1)
            lines.append(f"gj04\t{label}\t{'' if label else '*'}\t{sentence(rng)}")
        write(tmp_path / "cola" / f"{split}.tsv", lines)
    run = tmp_path / "run"
    train(compose_config([*QUICK, "dataset=cola", f"dataset.data_dir={tmp_path / 'cola'}"], run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["monitor"] == "val/mcc"
    assert set(metrics["test"]) >= {"test/mcc", "test/accuracy"}


def test_stsb_config_reports_pearson_and_spearman(tmp_path):
    rng = random.Random(2)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split in ("train", "dev"):
        write(tmp_path / "stsb" / f"{split}.tsv", [header] + [
            f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{sentence(rng)}\t{sentence(rng)}\t"
            f"{rng.uniform(0, 5):.3f}" for i in range(60)])
    run = tmp_path / "run"
    train(compose_config([*QUICK, "dataset=stsb", f"dataset.data_dir={tmp_path / 'stsb'}"], run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["monitor"] == "val/spearman"
    assert set(metrics["test"]) >= {"test/pearson", "test/spearman"}


def test_a_glue_test_file_without_labels_is_refused_as_a_test_split_before_any_work(tmp_path):
    data = mrpc_folder(tmp_path / "mrpc")
    cfg = compose_config([*QUICK, "dataset=mrpc", f"dataset.data_dir={data}", "dataset.data_files.test=test.tsv"],
                         tmp_path / "run")
    with pytest.raises(UserError) as err:
        train(cfg)
    message = str(err.value)
    assert "the test split has no labels: column 'Quality' is missing" in message
    assert "GLUE keeps those labels private" in message and "dataset.data_files.test" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def hub_folder(folder, splits: dict[str, list[dict]], labels: int):
    """A local folder laid out as a hub dataset's parquet export (``data/<split>-00000-of-00001.parquet``), which
    ``datasets.load_dataset(folder)`` reads as the hub copy would be read: its split names and column names."""
    import datasets

    columns = [k for k in next(iter(splits.values()))[0] if k != "label"]
    features = datasets.Features({**{k: datasets.Value("string") for k in columns},
                                  "label": datasets.ClassLabel(num_classes=labels)})
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def test_mnli_and_mrpc_configs_read_the_hub_layout(tmp_path):
    rng = random.Random(3)
    rows = lambda n, labels, a, b: [{a: sentence(rng), b: sentence(rng), "label": rng.randrange(labels)}  # noqa: E731
                                    for _ in range(n)]
    mnli = hub_folder(tmp_path / "mnli", {"train": rows(40, 3, "premise", "hypothesis"),
                                          "validation_matched": rows(20, 3, "premise", "hypothesis"),
                                          "validation_mismatched": rows(25, 3, "premise", "hypothesis")}, 3)
    cfg = compose_config(["dataset=mnli", f"dataset.hub_name={mnli}", "dataset.hub_config=null"], tmp_path)
    dm = instantiate(cfg.dataset, tokenizer=cfg.backbone.name, _convert_="all")
    raw = dm.load_raw()
    assert {split: len(data) for split, data in raw.items()} == {"train": 40, "validation": 20, "test": 25}
    dm.prepare_data()
    assert dm.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert list(cfg.task.metrics) == ["accuracy"]

    mrpc = hub_folder(tmp_path / "mrpc_hub", {"train": rows(30, 2, "sentence1", "sentence2"),
                                              "validation": rows(20, 2, "sentence1", "sentence2")}, 2)
    cfg = compose_config(["dataset=mrpc", f"dataset.hub_name={mrpc}", "dataset.hub_config=null"], tmp_path)
    dm = instantiate(cfg.dataset, tokenizer=cfg.backbone.name, _convert_="all")
    dm.prepare_data()
    assert dm.id2label == {0: "not_equivalent", 1: "equivalent"} and len(dm.datasets["test"]) == 20
    assert cfg.task.positive_label == "equivalent"


def test_every_glue_config_composes_with_its_published_metrics(tmp_path):
    published = {"cola": ["mcc", "accuracy"], "mrpc": ["f1", "accuracy"], "qqp": ["f1", "accuracy"],
                 "mnli": ["accuracy"], "qnli": ["accuracy"], "rte": ["accuracy"], "wnli": ["accuracy"]}
    for name, metrics in published.items():
        cfg = compose_config([f"dataset={name}"], tmp_path)
        assert cfg.dataset.hub_name == "nyu-mll/glue" and cfg.dataset.hub_config == name
        assert list(cfg.task.metrics) == metrics
        assert cfg.dataset._target_.endswith("TextClassificationData")
    # the command line still wins over the dataset config's choice
    assert list(compose_config(["dataset=mrpc", "task.metrics=[mcc]"], tmp_path).task.metrics) == ["mcc"]


def binary_data(tmp_path, tokenizer):
    rng = random.Random(4)
    lines = ["sentence\tlabel"] + [f"{sentence(rng)}\t{rng.choice(['no', 'yes', 'maybe'])}" for _ in range(90)]
    write(tmp_path / "train.tsv", lines)
    write(tmp_path / "validation.tsv", lines[:1] + lines[1:71])
    dm = TextClassificationData(tokenizer=tokenizer, data_dir=str(tmp_path), batch_size=16, text_column="sentence")
    dm.prepare_data()
    return dm


def test_positive_class_f1_precision_recall_match_sklearn(tmp_path, tiny_pretrained):
    dm = binary_data(tmp_path, tiny_pretrained)
    assert dm.id2label == {0: "maybe", 1: "no", 2: "yes"}
    module = TextClassificationTask(backbone={"name": tiny_pretrained, "pretrained": True}, **dm.model_kwargs(),
                                    metrics=["f1", "precision", "recall", "accuracy"], positive_label="yes")
    assert module.monitor == ("val/f1", "max")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    module.eval()
    with torch.no_grad():
        batches = list(dm.val_dataloader())
        preds = torch.cat([module(**b).logits.argmax(-1) for b in batches]).numpy()
        labels = torch.cat([b["labels"] for b in batches]).numpy()
    for name, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        expected = score(labels, preds, labels=[2], average="micro", zero_division=0)
        assert metrics[f"val/{name}"] == pytest.approx(expected, abs=1e-6), name
    assert metrics["val/accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-6)
    assert set(metrics) == {"val/loss", "val/f1", "val/precision", "val/recall", "val/accuracy"}
    # A random tiny model predicts one class: the scores on predictions of every class, over two updates
    collection = module.make_metrics("val/")
    generator = torch.Generator().manual_seed(0)
    preds, labels = torch.randint(0, 3, (200,), generator=generator), torch.randint(0, 3, (200,), generator=generator)
    collection.update(preds[:77], labels[:77])
    collection.update(preds[77:], labels[77:])
    scores = collection.compute()
    for name, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        expected = score(labels, preds, labels=[2], average="micro", zero_division=0)
        assert float(scores[f"val/{name}"]) == pytest.approx(expected, abs=1e-6), name


@pytest.mark.parametrize("settings,words", [
    ({"metrics": ["f1"]}, "set task.positive_label to a label name, or use f1_macro"),
    ({"metrics": ["f1"], "positive_label": "perhaps"}, "task.positive_label='perhaps' is not one of the labels "
                                                        "(maybe, no, yes)"),
    ({"metrics": ["spearman"]}, "task.metrics names 'spearman', which a single label classification task does not "
                                "report: choose from accuracy, f1, precision, recall, f1_macro, mcc"),
])
def test_metric_settings_that_cannot_work_are_refused_before_the_model_loads(tmp_path, settings, words):
    dm = binary_data(tmp_path, "sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(UserError, match=re.escape(words)):
        TextClassificationTask(backbone={"name": str(tmp_path / "no-such-model")}, **dm.model_kwargs(), **settings)


def test_a_glue_config_under_another_task_is_refused_naming_the_key(tmp_path):
    data = mrpc_folder(tmp_path / "mrpc")
    cfg = compose_config([*QUICK, "task=ner", "dataset=mrpc", f"dataset.data_dir={data}"], tmp_path / "run")
    with pytest.raises(UserError, match=r"task\.metrics is not a setting of TokenClassificationTask, yet the config "
                                        r"sets it .*~task\.metrics\."):
        train(cfg)
