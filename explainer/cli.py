"""Command-line entry points: ``train.py`` (LightningCLI) and ``python -m explainer ...``.

    python -m explainer explain  --checkpoint CKPT --images FILE_OR_DIR --out DIR
    python -m explainer evaluate --config configs/<...>.yaml --out results.json
    python -m explainer export   --checkpoint CKPT --format onnx|safetensors --out PATH
"""

from __future__ import annotations

import argparse
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


def check_config(path: str | os.PathLike) -> None:
    """Type-check a training config against the classes it names, building nothing.

    Raises ValueError naming the offending keys (unknown keys, wrong types).
    """
    from jsonargparse import ArgumentParser

    import explainer  # noqa: F401

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--seed_everything", type=int | bool | None, default=None)
    parser.add_class_arguments(pl.Trainer, "trainer", fail_untyped=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", fail_untyped=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", fail_untyped=False)
    try:
        parser.parse_path(str(path))
    except Exception as err:  # jsonargparse's own error types
        raise ValueError(f"config {str(path)!r}: {err}") from err


def _explain(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m explainer explain",
                                description="Masks of a trained explainer for a file or a folder of images.")
    p.add_argument("--checkpoint", required=True, help="explainer .ckpt or .safetensors export")
    p.add_argument("--images", required=True, help="an image file or a folder (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--top-k", type=int, default=3, help="classes per image, by the classifier's probability")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=None, help="resolution fed to the explainer (default: trained size)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--explanandum", default=None, help="override the classifier spec recorded in the checkpoint")
    a = p.parse_args(argv)
    from explainer.amortized import load
    from explainer.inference import explain_files, list_images

    module = load(a.checkpoint, explanandum=a.explanandum, map_location=a.device)
    files = list_images(a.images)
    explain_files(module, files, a.out, top_k=a.top_k, batch_size=a.batch_size, size=a.size)
    print(f"wrote masks of {len(files)} image(s) to {a.out}")
    return 0


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m explainer export",
                                description="Export an explainer (safetensors or ONNX) or a classifier (safetensors).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=["safetensors", "onnx"])
    p.add_argument("--out", required=True)
    p.add_argument("--input-size", type=int, default=None, help="ONNX input resolution (default: trained size)")
    p.add_argument("--explanandum", default=None, help="override the classifier spec recorded in the checkpoint")
    a = p.parse_args(argv)
    from explainer.export import export

    path = export(a.checkpoint, a.format, a.out, input_size=a.input_size, explanandum=a.explanandum)
    print(f"wrote {path}")
    return 0


def _evaluate(argv: list[str]) -> int:
    from explainer.evaluate import main as evaluate_main

    return int(evaluate_main(argv) or 0)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


COMMANDS = {"explain": _explain, "evaluate": _evaluate, "export": _export}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m explainer {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
