"""compile=true: the model trains through torch.compile, what it compiled is counted, and a machine that cannot
compile trains uncompiled with a warning."""

import json
import logging

import pytest
import torch
from conftest import QUICK, compose_config

from lightning_ft import compiling
from lightning_ft.errors import UserError
from lightning_ft.train import train


class TwoLayers(torch.nn.Module):  # not torch.nn.Sequential: dynamo leaves torch's own modules' code alone
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def test_compile_model_counts_its_graphs_and_computes_what_eager_does():
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(5, 4)
    expected = model(x)
    record = compiling.compile_model(model, "cpu")
    assert record is not None and record.graphs == 0  # compiled on first use
    torch.testing.assert_close(model(x), expected)
    assert record.graphs >= 1 and record.seconds > 0


def test_without_a_compiler_the_run_trains_uncompiled_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with caplog.at_level(logging.WARNING, logger="lightning_ft"):
        train(compose_config([*QUICK, "compile=true", "test=false", "export=false"], tmp_path))
    assert "no C++ compiler (g++, c++ or clang++) is on the PATH; training without torch.compile" in caplog.text
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "compile_graphs" not in metrics.get("throughput", {})


def test_compile_must_be_true_or_false(tmp_path):
    with pytest.raises(UserError, match="compile='yes' is not true or false"):
        train(compose_config([*QUICK, "compile=yes"], tmp_path))
