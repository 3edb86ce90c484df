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


class WaitForSignalAtStep(pl.Callback):
    """On a job's first run, at ``step``: writes the SLURM job id to ``marker`` and waits (up to 120 s) for a signal,
    so that a test can signal the job through SLURM at a known step. A requeued run (restart > 0) does not wait."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            return
        import time

        watcher = next(cb for cb in trainer.callbacks if type(cb).__name__ == "PreemptionCheckpoint")
        self.marker.write_text(os.environ.get("SLURM_JOB_ID", ""))
        deadline = time.monotonic() + 120
        while watcher.received is None and not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)
