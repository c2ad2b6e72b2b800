"""The one command line: ``python -m explainer <verb> ...`` (``train.py`` and ``finetune.py`` are doors to it).

Every verb takes ``--help``; those with settings take ``--config FILE.yaml`` and ``--print_config``
(jsonargparse, the dialect LightningCLI uses).
"""

from __future__ import annotations

import importlib
import os
import sys

# verb -> (pipeline module with main(argv), one line of help); modules are imported when their verb runs, so
# that `fit` does not pay for what `serve` imports
VERBS: dict[str, tuple[str, str]] = {
    "fit": ("explainer.pipelines.train", "train a model of a config (LightningCLI fit: --config, --trainer.*)"),
    "train": ("explainer.pipelines.train", "LightningCLI with its subcommands (fit, validate, test, predict)"),
    "finetune": ("explainer.pipelines.finetune", "LTX per-image finetuning, masks written like explain"),
    "explain": ("explainer.pipelines.explain", "masks of a trained explainer for image files"),
    "evaluate": ("explainer.pipelines.evaluate", "methods x metrics on a dataset -> results.json/.md/.png"),
    "export": ("explainer.pipelines.export", "an explainer to safetensors or ONNX, a classifier to safetensors"),
    "attribute": ("explainer.pipelines.attribute", "a method's maps over a dataset split, sharded and resumable"),
    "serve": ("explainer.serving.cli", "an explainer over HTTP (LitServe, dynamic batching)"),
    "report": ("explainer.pipelines.report", "docs/RESULTS.md from results.json files"),
    "quickstart": ("explainer.pipelines.quickstart", "the main job on the embedded default"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: python -m explainer <verb> [--help] ...", "", "verbs:"]
    lines += [f"  {verb.ljust(width)}  {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def run_verb(verb: str, argv: list[str]) -> int:
    module = importlib.import_module(VERBS[verb][0])
    if verb == "fit":
        module.train_cli(["fit", *argv])
        return 0
    if verb == "train":
        module.train_cli(argv)
        return 0
    return int(module.main(argv) or 0)


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
