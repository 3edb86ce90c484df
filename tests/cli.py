"""Run the real entry point in a subprocess, as a user would."""

import os
import subprocess
import sys
from pathlib import Path


def run_cli(args: list[str], cwd: Path, timeout: int = 600, module: str = "lightning_ft.train"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
