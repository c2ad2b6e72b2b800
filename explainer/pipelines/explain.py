"""``python -m explainer explain``: a trained explainer's masks for an image file or a folder of images."""

from __future__ import annotations

from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt

from explainer.explainers.loading import load
from explainer.pipelines.args import parse
from explainer.pipelines.explain_files import exit_code, explain_files, list_images


def config_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m explainer explain", exit_on_error=False,
                       description="Masks of a trained explainer for a file or a folder of images (PNG masks and "
                                   "overlays mirroring the input tree, explanations.json).")
    p.add_argument("--config", action="config")
    p.add_argument("--checkpoint", type=str, required=True, help="explainer .ckpt or .safetensors export")
    p.add_argument("--images", type=str, required=True, help="an image file or a folder (searched recursively)")
    p.add_argument("--out", type=str, required=True, help="output folder")
    p.add_argument("--top_k", "--top-k", type=PositiveInt, default=3,
                   help="classes per image, by the classifier's probability")
    p.add_argument("--batch_size", "--batch-size", type=PositiveInt, default=16)
    p.add_argument("--size", type=PositiveInt | None, default=None,
                   help="resolution fed to the explainer (default: its trained size)")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--explanandum", type=str | None, default=None,
                   help="override the classifier spec recorded in the checkpoint")
    p.add_argument("--trust", type=bool, default=True,
                   help="write each mask's trust (and keep/remove probabilities) into explanations.json")
    p.add_argument("--refine", type=float, default=0.0,
                   help="refine this fraction of the masks, those of lowest trust, by per-image finetuning")
    p.add_argument("--skip_bad", "--skip-bad", type=bool, default=False,
                   help="exit 0 when some files cannot be read (by default: exit 1); either way every readable "
                        "image is explained and every unreadable file is listed with its reason in "
                        "explanations.json and on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parse(config_parser(), argv)
    module = load(a.checkpoint, explanandum=a.explanandum, map_location=a.device)
    files = list_images(a.images, exclude=a.out)
    report = explain_files(module, files, a.out, top_k=a.top_k, batch_size=a.batch_size, size=a.size,
                           root=a.images, trust=a.trust or a.refine > 0, refine=a.refine)
    return exit_code(report, a.out, a.skip_bad)
