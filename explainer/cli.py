"""The one command line: ``python -m explainer <verb> ...`` (``train.py`` and ``finetune.py`` are doors to it).

Every verb takes ``--help``; those with settings take ``--config FILE.yaml`` and ``--print_config``
(jsonargparse, the dialect LightningCLI uses).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from explainer.pipelines import attribute, evaluate, explain, export, finetune, quickstart, report, train, trust
from explainer.serving import cli as serve


def lightning_fit(argv: list[str]) -> int:
    train.train_cli(["fit", *argv])
    return 0


def lightning_cli(argv: list[str]) -> int:
    train.train_cli(argv)
    return 0


# verb -> (what runs it on the rest of the command line, one line of help)
VERBS: dict[str, tuple[Callable[[list[str]], int | None], str]] = {
    "fit": (lightning_fit, "train a model of a config (LightningCLI fit: --config, --trainer.*)"),
    "train": (lightning_cli, "LightningCLI with its subcommands (fit, validate, test, predict)"),
    "finetune": (finetune.main, "LTX per-image finetuning, masks written like explain"),
    "explain": (explain.main, "masks of a trained explainer for image files"),
    "evaluate": (evaluate.main, "methods x metrics on a dataset -> results.json/.md/.png"),
    "export": (export.main, "an explainer to safetensors or ONNX, a classifier to safetensors"),
    "attribute": (attribute.main, "a method's maps over a dataset split, sharded and resumable"),
    "trust": (trust.main, "fit an explainer's trust model on validation images, into a copy of its checkpoint"),
    "serve": (serve.main, "an explainer over HTTP (LitServe, dynamic batching)"),
    "report": (report.main, "docs/RESULTS.md from results.json files"),
    "quickstart": (quickstart.main, "the main job on the embedded default"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: python -m explainer <verb> [--help] ...", "", "verbs:"]
    lines += [f"  {verb.ljust(width)}  {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def run_verb(verb: str, argv: list[str]) -> int:
    return int(VERBS[verb][0](argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in VERBS:
        print(f"error: unknown verb {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        return run_verb(argv[0], argv[1:])
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
