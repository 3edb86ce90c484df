"""Callbacks the lifecycle tests add to real training processes (``+callbacks.<name>._target_=run_callbacks...``)."""

import hashlib
import json
import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class BatchRecorder(pl.Callback):
    """Appends (process, optimizer step, a hash of the batch's input ids) to ``path`` after every training step."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        digest = hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]
        with self.path.open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": trainer.global_step, "batch": digest}) + "\n")


class SignalAtStep(pl.Callback):
    """Sends ``signal_name`` to its own process when training reaches ``step``: a real kill at a known point."""

    def __init__(self, step: int, signal_name: str) -> None:
        self.step, self.signum = step, getattr(signal, f"SIG{signal_name}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNAtStep(pl.Callback):
    """Makes the training loss of step ``step`` non-finite (once), as a diverging step would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 != self.step:
            return
        original = pl_module.forward

        def poisoned(**inputs):
            pl_module.forward = original
            outputs = original(**inputs)
            outputs.loss = outputs.loss * float("nan")
            return outputs

        pl_module.forward = poisoned
