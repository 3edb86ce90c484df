"""The README's main command for real (MiniLM, the embedded sample), and a non-editable install."""

import json
import os
import subprocess
import sys

import pytest
import torch
from cli import run_cli
from conftest import ROOT


@pytest.mark.slow
def test_default_command_fine_tunes_minilm_and_exports_a_pipeline_model(tmp_path):
    from transformers import AutoTokenizer, pipeline

    from lightning_ft.tasks.text_classification import TextClassificationTask

    result = run_cli([], tmp_path)  # exactly `python -m lightning_ft.train`, from a directory that is not the clone
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p.parent for p in (tmp_path / "outputs" / "text_classification").glob("*/metrics.json")]
    metrics = json.loads((run / "metrics.json").read_text())
    # 1,200 training sentences, 3 epochs: MiniLM reaches about 0.79 on the full SST-2 dev split (0.5 = chance).
    assert metrics["test"]["test/accuracy"] > 0.72
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert "test/accuracy" in result.stdout and "Hugging Face model" in result.stdout

    texts = ["a gripping , beautifully acted film", "dull , lifeless and far too long", "it 's fine"]
    module = TextClassificationTask.load_from_checkpoint(metrics["best_model_path"], map_location="cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "hf_model")
    with torch.no_grad():
        probs = torch.softmax(module(**tokenizer(texts, padding=True, return_tensors="pt")).logits, -1)
    predicted = pipeline("text-classification", model=str(run / "hf_model"))(texts)
    assert [p["label"] for p in predicted] == [module.model.config.id2label[int(i)] for i in probs.argmax(-1)]
    assert [p["score"] for p in predicted] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)
    assert predicted[0]["label"] == "positive" and predicted[1]["label"] == "negative"


@pytest.mark.slow
def test_non_editable_install_ships_configs_and_samples(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(ROOT)],
                   check=True, capture_output=True)
    assert (site / "lightning_ft" / "conf" / "train.yaml").is_file()
    assert (site / "lightning_ft" / "samples" / "sst2" / "train.tsv").is_file()
    assert (site / "lightning_ft" / "samples" / "wnut17" / "train.conll").is_file()
    assert (site / "lightning_ft" / "conf" / "recipe" / "ner.yaml").is_file()
    assert (site / "lightning_ft" / "metrics" / "entity.py").is_file()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    show_paths = "import lightning_ft.paths as p; print(p.config_dir(), p.sample_dir())"
    where = subprocess.run([sys.executable, "-c", show_paths], cwd=tmp_path, env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    assert all(path.startswith(str(site)) for path in where), where
    run = subprocess.run([sys.executable, "-m", "lightning_ft.train", "backbone=tiny_bert", "debug=fast_dev_run"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "test/accuracy" in run.stdout
