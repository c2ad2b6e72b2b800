"""``python -m explainer export``: an explainer to safetensors or ONNX, or a classifier checkpoint to safetensors."""

from __future__ import annotations

from typing import Literal

from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt

from explainer.explainers.export import export
from explainer.pipelines.args import parse


def config_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m explainer export", exit_on_error=False,
                       description="Export an explainer (safetensors or ONNX) or a classifier (safetensors).")
    p.add_argument("--config", action="config")
    p.add_argument("--checkpoint", type=str, required=True)
    p.add_argument("--format", type=Literal["safetensors", "onnx"], required=True)
    p.add_argument("--out", type=str, required=True, help="the file to write")
    p.add_argument("--input_size", "--input-size", type=PositiveInt | None, default=None,
                   help="ONNX input resolution (default: trained size)")
    p.add_argument("--explanandum", type=str | None, default=None,
                   help="override the classifier spec recorded in the checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parse(config_parser(), argv)
    path = export(a.checkpoint, a.format, a.out, input_size=a.input_size, explanandum=a.explanandum)
    print(f"wrote {path}")
    return 0
