"""LTX per-instance finetuning from the command line: ``python -m explainer finetune`` (and ``finetune.py``).

    python -m explainer finetune --config configs/synthetic/ltx_finetune.yaml [--steps 10 --out DIR]

Masks are written like ``python -m explainer explain`` (PNG masks, overlays, ``explanations.json``), plus
``finetune.json`` with the settings used and the seconds per image.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt

from explainer.core.io import atomic_write_text
from explainer.data.voc import find_voc_root
from explainer.explainers.explanation import ExplainsImages
from explainer.explainers.loading import load
from explainer.explainers.ltx import FINETUNE_PRESETS, OBJECTIVE_KEYS, check_module, finetune, finetune_settings
from explainer.pipelines.args import parse
from explainer.pipelines.explain_files import exit_code, explain_files, list_images


class FinetunedExplainer(ExplainsImages):
    """A pretrained LTX explainer finetuned on each image: :meth:`explanation` as every trained explainer's.

    Each chosen class of each image gets its own finetuning run (one run per rank of the classes, the images of
    a batch together); ``settings``: complete finetuning settings (:func:`explainer.explainers.ltx.finetune_settings`).
    """

    def __init__(self, module, settings: dict[str, Any], batch_size: int = 16):
        check_module(module)
        self.module, self.settings, self.batch_size = module, settings, batch_size
        self.explanandum = module.explanandum
        self.input_size = getattr(module, "input_size", None)

    @property
    def device(self) -> torch.device:
        return self.module.device

    def selected_masks(self, x: torch.Tensor, classes: list[torch.Tensor]) -> list[torch.Tensor]:
        masks = [torch.zeros(len(c), *x.shape[-2:], device=x.device) for c in classes]
        for j in range(max(len(c) for c in classes)):
            idx = [i for i, c in enumerate(classes) if len(c) > j]
            m = finetune(self.module, x[idx], torch.stack([classes[i][j] for i in idx]), batch_size=self.batch_size,
                         **self.settings)
            for i, mi in zip(idx, m.to(x.device)):
                masks[i][j] = mi[0]
        return masks


def split_images(voc_root: str, split: str) -> list[Path]:
    """JPEGImages of a VOC-style tree's ``ImageSets/Main/<split>.txt`` (the synthetic benchmark is one)."""
    root = find_voc_root(voc_root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"split: {str(listing)!r} does not exist (expected ImageSets/Main/{split}.txt)")
    ids = [ln.split()[0] for ln in listing.read_text().splitlines() if ln.strip()]
    return [Path(root) / "JPEGImages" / f"{i}.jpg" for i in ids]


def config_parser() -> ArgumentParser:
    """The jsonargparse parser of ``finetune``'s settings (a YAML ``--config`` and/or flags)."""
    p = ArgumentParser(prog="python -m explainer finetune", exit_on_error=False,
                       description="LTX per-instance finetuning: masks of a pretrained LTX explainer finetuned on "
                                   "each image.")
    p.add_argument("--config", action="config", help="YAML file of the settings below")
    p.add_argument("--checkpoint", type=str, required=True, help="an LTX .ckpt or export")
    p.add_argument("--images", type=str | None, default=None, help="an image file or a folder")
    p.add_argument("--voc_root", type=str | None, default=None, help="a VOC-style tree (instead of images)")
    p.add_argument("--split", type=str, default="test", help="the split of voc_root")
    p.add_argument("--limit", type=PositiveInt | None, default=None, help="the first N images only")
    p.add_argument("--preset", type=Literal["validated", "paper"] | None, default=None,
                   help="finetuning settings (null: those recorded in the checkpoint, by default 'validated')")
    p.add_argument("--steps", type=PositiveInt | None, default=None, help="steps per image (null: the preset's)")
    p.add_argument("--lr", type=float | None, default=None, help="learning rate (null: the preset's)")
    p.add_argument("--mode", type=Literal["groundtruth", "predicted", "kl"] | None, default=None,
                   help="objective target mode (null: the preset's)")
    p.add_argument("--objective", type=dict[str, Any] | None, default=None,
                   help=f"objective settings among {list(OBJECTIVE_KEYS)} (null: the preset's)")
    p.add_argument("--top_k", type=PositiveInt, default=1, help="classes per image, each finetuned")
    p.add_argument("--batch_size", type=PositiveInt, default=16, help="images finetuned together")
    p.add_argument("--size", type=PositiveInt | None, default=None,
                   help="resolution fed to the explainer (null: its trained size)")
    p.add_argument("--out", type=str, required=True, help="output folder")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--explanandum", type=str | None, default=None,
                   help="override the classifier spec recorded in the checkpoint")
    p.add_argument("--progress", type=bool, default=True)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the settings, finetune, write the masks and ``finetune.json``."""
    a = parse(config_parser(), argv).as_dict()
    a.pop("config", None)
    if (a["images"] is None) == (a["voc_root"] is None):
        raise ValueError("images/voc_root: give exactly one of images (a file or folder) or voc_root (+ split)")
    module = load(a["checkpoint"], explanandum=a["explanandum"], map_location=a["device"])
    if module.kind != "ltx":
        raise ValueError(f"checkpoint: {a['checkpoint']!r} holds a {module.kind!r} explainer, expected 'ltx' (an "
                         "Explainer checkpoint has nothing to finetune; use python -m explainer explain)")
    settings = finetune_settings(module, a["preset"], steps=a["steps"], lr=a["lr"], mode=a["mode"],
                                 objective=a["objective"])
    files = (list_images(a["images"], exclude=a["out"]) if a["images"] is not None
             else split_images(a["voc_root"], a["split"]))
    if a["limit"] is not None:
        files = files[:a["limit"]]
    wrapped = FinetunedExplainer(module, settings, batch_size=a["batch_size"])
    t0 = time.perf_counter()
    report = explain_files(wrapped, files, a["out"], top_k=a["top_k"], batch_size=a["batch_size"], size=a["size"],
                           progress=a["progress"])
    seconds = time.perf_counter() - t0
    record = {**a, **{k: settings[k] for k in ("steps", "lr", "mode")}}
    record.update({"num_images": len(files), "seconds_per_image": seconds / max(1, len(files)),
                   "objective": {k: settings["objective"].get(k, module.hparams[k]) for k in OBJECTIVE_KEYS},
                   "target_mode": settings["mode"] or module.hparams.target,
                   "presets": sorted(FINETUNE_PRESETS)})
    atomic_write_text(Path(a["out"]) / "finetune.json", json.dumps(record, indent=1))
    return exit_code(report, a["out"], what=f"LTX masks ({settings['steps']} steps)")
