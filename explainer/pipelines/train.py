"""Training with Lightning's CLI: ``python -m explainer fit --config ...`` (and ``train.py``).

LightningCLI sees every LightningModule and LightningDataModule of the project (chosen by ``class_path`` in the
config); the Trainer holds devices, precision, DDP, logging and checkpointing.
"""

from __future__ import annotations

import os
import warnings

import pytorch_lightning as pl
from jsonargparse import ArgumentParser
from pytorch_lightning.cli import LightningCLI

import explainer.classifier  # noqa: F401  (the classes a config may name)
import explainer.data  # noqa: F401
import explainer.explainers  # noqa: F401


def train_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """LightningCLI over every LightningModule and datamodule of the project (chosen by class_path)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    with warnings.catch_warnings():
        # `args` are sys.argv's own arguments after the verb; sys.argv itself must stay as it is (DDP relaunches
        # the command from it), so LightningCLI's warning about both being given says nothing here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                            subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args, run=run,
                            auto_configure_optimizers=False)


def check_config(path: str | os.PathLike) -> None:
    """Type-check a training config against the classes it names, building nothing.

    Raises ValueError naming the offending keys (unknown keys, wrong types).
    """
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--seed_everything", type=int | bool | None, default=None)
    parser.add_class_arguments(pl.Trainer, "trainer", fail_untyped=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", fail_untyped=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", fail_untyped=False)
    try:
        parser.parse_path(str(path))
    except Exception as err:  # jsonargparse's own error types
        raise ValueError(f"config {str(path)!r}: {err}") from err
