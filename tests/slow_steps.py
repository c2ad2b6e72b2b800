"""A callback for tests/test_resume.py: slows every training step so a test can kill the run mid-epoch."""

import os
import time

import pytorch_lightning as pl


class SlowSteps(pl.Callback):
    """Sleeps ``$SLOW_STEPS_SECONDS`` (default 0) after each training batch; changes nothing else."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(float(os.environ.get("SLOW_STEPS_SECONDS", "0")))
