"""Command-line entry points: ``train.py`` (LightningCLI) and ``python -m explainer ...``."""

from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI


def train_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """LightningCLI over every LightningModule and datamodule of the project (chosen by class_path)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import explainer  # noqa: F401  (registers models)

    return LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args, run=run,
                        auto_configure_optimizers=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    raise SystemExit("usage: python -m explainer {explain,evaluate,export} ...")
