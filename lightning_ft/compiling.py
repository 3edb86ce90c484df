"""``compile=true``: the task's model trained through ``torch.compile`` (TorchInductor), counting what it compiles.

Packed rows change shape from batch to batch (how many rows, how wide), so the first new shapes recompile once and
dynamic shapes take over; the count of graphs compiled and the seconds spent say whether that settled.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class CompileRecord:
    """What ``torch.compile`` did in a run: the graphs TorchInductor compiled (a graph break or a recompile for a
    new shape is one more) and the seconds compiling them took. Each graph's backward compiles on its first
    backward pass, outside the backend: that time is in the first steps', not here (about 30% more on this CPU)."""

    graphs: int = 0
    seconds: float = 0.0


def cannot_compile(device_type: str) -> str | None:
    """Why TorchInductor cannot compile for ``device_type`` here (None: it can): it writes C++ for a CPU, which
    needs a compiler, and Triton kernels for a GPU."""
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") else "TorchInductor needs the triton package on a GPU"
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) or shutil.which("c++") or shutil.which("clang++"):
        return None
    return f"TorchInductor writes C++ for the CPU and no C++ compiler ({compiler}, c++ or clang++) is on the PATH"


def compile_model(model: Any, device_type: str) -> CompileRecord | None:
    """Compile ``model``'s forward in place (``nn.Module.compile``: the module, its parameters and state-dict names
    stay as they are) through TorchInductor, counting its compilations; None, with a warning, where this machine
    cannot compile, so the run trains uncompiled rather than failing."""
    reason = cannot_compile(device_type)
    if reason:
        log.warning("compile=true: %s; training without torch.compile.", reason)
        return None
    # The inductor backend's own entry point, called from a counting backend (torch.compile's documented way to
    # plug in a backend); private, so tests/test_private_apis.py pins it.
    from torch._inductor.compile_fx import compile_fx

    record = CompileRecord()

    def counting_inductor(graph: Any, example_inputs: list) -> Any:
        started = time.perf_counter()
        compiled = compile_fx(graph, example_inputs)
        record.graphs += 1
        record.seconds += time.perf_counter() - started
        return compiled

    model.compile(backend=counting_inductor)
    log.info("compile=true: the model's forward is compiled by TorchInductor on first use (new shapes recompile).")
    return record
