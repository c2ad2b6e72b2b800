"""Exact resumption: a run killed at any moment and resumed from its last checkpoint ends as if never stopped.

Two pieces, both plugged into Lightning's own checkpointing:

* :class:`ResumableLoader`, the train loader: torchdata's ``StatefulDataLoader``,
  which Lightning saves in the fit loop's state (``state_dict``) and restores
  when a run resumes mid-epoch. Its snapshots follow the batches the trainer
  received, not those the workers prefetched, and the sampler's own state
  (epoch, samples handed out) travels inside them. What it adds: the loader
  starts its workers at the first batch, not when Lightning creates the
  iterator. Lightning creates the first iterator of a fit before it calls
  ``set_epoch``; worker processes prefetch at once, so a resumed run used to
  replay epoch 0's order (with no workers nothing is prefetched and the order
  was right). Starting late, the sampler always knows the epoch, and a saved
  position is used only if it belongs to that epoch (a checkpoint taken at
  an epoch's last batch resumes with the next epoch from its start).
* :class:`ExactResume`, a callback every module of the project installs
  (``configure_callbacks``): before each training batch it seeds torch, numpy
  and Python's ``random`` from (seed, epoch, batch index, rank). Dropout and
  any other draw in a step are then a function of the step alone: nothing to
  save, nothing that depends on how many numbers the data loaders drew from
  the global generator before (their iterator seeds differ with the number of
  workers and on resume), so results do not depend on ``num_workers`` either.
  Saving and restoring the global generators could not give that: the
  loaders draw from them between steps, differently in a resumed run. It
  also loads the saved loader position where Lightning 2.6 forgets to.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

# torchdata's state layout (0.11): where the sampler's own state sits in a loader's state_dict
_SNAPSHOT, _MAIN, _NUM_WORKERS = "_snapshot", "_main_snapshot", "_num_workers"
_SAMPLER_ITER, _SAMPLER = "_sampler_iter_state", "sampler_state"


class ResumableLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose worker processes start at the first batch of an epoch.

    Takes ``DataLoader``'s arguments. The sampler should be stateful
    (``state_dict``/``load_state_dict``, as ``EpochSeededSampler``) and read
    its epoch when iteration starts. A checkpoint written with another
    ``num_workers`` is restored through the sampler's state alone.
    """

    def __iter__(self):
        return _StartsAtFirstBatch(self)

    def _start(self):
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        # before the first batch nothing was consumed (and torchdata would start workers to ask them)
        return {} if self._iterator is None else super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return super().load_state_dict(state_dict)
        saved_workers = state_dict[_SNAPSHOT][_MAIN][_NUM_WORKERS] if _SNAPSHOT in state_dict else 0
        if saved_workers == self.num_workers:
            return super().load_state_dict(state_dict)
        # another worker count: torchdata cannot restore its own state, the sampler's is enough
        main = state_dict[_SNAPSHOT][_MAIN] if _SNAPSHOT in state_dict else state_dict
        sampler_state = (main.get(_SAMPLER_ITER) or {}).get(_SAMPLER)
        if sampler_state is None or not hasattr(self.sampler, "load_state_dict"):
            raise ValueError(f"num_workers: the checkpoint's train loader ran with {saved_workers} worker(s), this "
                             f"one has {self.num_workers}, and its sampler {type(self.sampler).__name__} keeps no "
                             f"state to resume from; resume with num_workers={saved_workers}")
        self.sampler.load_state_dict(sampler_state)
        super().load_state_dict({})


class _StartsAtFirstBatch:
    """The loader's iterator, created at the first ``next`` (after Lightning's ``set_epoch``)."""

    def __init__(self, loader: ResumableLoader):
        self._loader, self._it = loader, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = self._loader._start()
        return next(self._it)


class ExactResume(pl.Callback):
    """What a run needs beyond Lightning's checkpoints to resume exactly; modules install it themselves.

    * Before each training batch, seeds torch, numpy and ``random`` from
      (seed, epoch, batch index, rank): the step's draws (dropout, ...)
      depend on nothing else.
    * At the start of training, restores the train loader's saved position
      when Lightning did not: a module whose ``configure_optimizers`` reads
      ``trainer.estimated_stepping_batches`` (any schedule over the whole
      run) makes Lightning build the loader before it reads the checkpoint,
      and the saved loader state is then dropped (Lightning issue #20550,
      open in 2.6.6). With the state already loaded this does nothing.

    Args:
        seed: the run's seed; None: the one given to ``seed_everything``
            (``PL_GLOBAL_SEED``), else 0. Saved in checkpoints, so a resumed
            run keeps it.
    """

    def __init__(self, seed: int | None = None):
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed: expected None or an int >= 0, got {seed!r}")
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        # the loader's iterator starts at the first batch (ResumableLoader), so loading now is in time
        if getattr(fit_loop, "_combined_loader_states_to_load", None):
            fit_loop._load_combined_loader_states()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed_step(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]


def seed_step(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> None:
    """Seed torch (all devices), numpy's and Python's global generators from (seed, epoch, batch, rank)."""
    t, n, p = np.random.SeedSequence([seed, epoch, batch_idx, rank]).generate_state(3, dtype=np.uint64)
    torch.manual_seed(int(t))
    np.random.seed(int(n) % 2**32)
    random.seed(int(p))
