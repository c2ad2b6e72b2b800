"""``python -m explainer explain``: masks for a file or a folder of images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from explainer.core import viz
from explainer.core.io import atomic_write_text
from explainer.data.base import read_rgb
from explainer.data.folder import IMAGE_SUFFIXES


def list_images(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"images: {str(path)!r} holds no images ({sorted(IMAGE_SUFFIXES)})")
        return files
    raise FileNotFoundError(f"images: no such file or directory {str(path)!r}")


def output_stem(image: Path, root: Path | None) -> Path:
    """Where an image's outputs go, relative to the output folder: its path relative to ``root`` (the folder
    given), its extension kept in the name (``s1/img.jpg`` -> ``s1/img_jpg``), so that no two inputs share
    outputs and the same input always gets the same names."""
    rel = image.relative_to(root) if root is not None else Path(image.name)
    return rel.parent / rel.name.replace(".", "_")


def explain_files(module, images: list[Path], out: str | os.PathLike, top_k: int = 3, batch_size: int = 16,
                  size: int | None = None, progress: bool = True, root: str | os.PathLike | None = None) -> dict:
    """Write ``<name>_<class>_mask.png`` and ``_overlay.png`` for the top-k classes, and explanations.json.

    Outputs mirror the input tree below ``root`` (see :func:`output_stem`); explanations.json is keyed by the
    same relative paths. Images are resized to the explainer's input size for one batched pass (all classes at
    once) and the masks resized back to each image's size.
    """
    for name, v in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size: expected an integer >= 1 (pixels) or None, got {size!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out: {str(out)!r} is an existing file; expected a folder for the masks")
    root = Path(root) if root is not None and Path(root).is_dir() else None
    out.mkdir(parents=True, exist_ok=True)
    size = int(size or getattr(module, "input_size", None) or 128)
    f = module.explanandum
    report: dict[str, dict] = {}
    k = max(1, min(top_k, f.num_classes))
    for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc="explain", unit="batch"):
        paths = images[i:i + batch_size]
        arrays = [read_rgb(p) for p in paths]
        x = torch.stack([F.interpolate(torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255,
                                       size=(size, size), mode="bilinear", align_corners=False)[0]
                         for a in arrays]).clamp(0, 1)
        masks = module.explain(x)
        with torch.inference_mode():
            probs = f.probabilities(f(x.to(module.device))).cpu()
        for p, a, m, pr in zip(paths, arrays, masks, probs):
            H, W = a.shape[:2]
            full = F.interpolate(m[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            img = torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255
            top = pr.topk(k).indices.tolist()
            entries = []
            for c in top:
                name = f.class_names[c]
                safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
                stem = out / output_stem(p, root)
                viz.save_png((full[c].clamp(0, 1).numpy() * 255).round().astype(np.uint8),
                             stem.parent / f"{stem.name}_{safe}_mask.png")
                viz.save_png(viz.overlay(img, full[c]), stem.parent / f"{stem.name}_{safe}_overlay.png")
                entries.append({"class": name, "index": c, "probability": float(pr[c]),
                                "mask_area": float(full[c].mean())})
            report[str(p.relative_to(root) if root is not None else p)] = {"top_classes": entries}
    atomic_write_text(out / "explanations.json", json.dumps(report, indent=1))
    return report
