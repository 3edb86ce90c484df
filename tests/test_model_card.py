"""Every export carries a Hugging Face model card that says what the model is and how it was made."""

import json

import pytest
from conftest import QUICK, compose_config

from lightning_ft.train import train


@pytest.mark.parametrize("task", ["text_classification", "ner"])
def test_every_export_carries_a_model_card_that_model_card_load_reads(task, tmp_path):
    from huggingface_hub import ModelCard

    run_dir = tmp_path / "run"
    train(compose_config([*QUICK, f"task={task}", "trainer.max_epochs=1"], run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    card = ModelCard.load(run_dir / "hf_model" / "README.md")
    assert card.data.pipeline_tag == {"text_classification": "text-classification", "ner": "token-classification"}[task]
    assert card.data.library_name == "transformers" and "lightning_ft" in card.data.tags and task in card.data.tags
    for name, value in {**metrics["validation"], **metrics["test"]}.items():
        assert f"| {name} | {value:.4f} |" in card.text
    assert f"task={task}" in card.text and "lightning_ft 0.1.0" in card.text and "max_epochs" in card.text
