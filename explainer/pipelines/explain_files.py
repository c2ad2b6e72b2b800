"""``python -m explainer explain``: masks for a file or a folder of images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from explainer.data.base import read_rgb
from explainer.data.folder import IMAGE_SUFFIXES
from explainer.io import atomic_write_text


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


def explain_files(module, images: list[Path], out: str | os.PathLike, top_k: int = 3, batch_size: int = 16,
                  size: int | None = None, progress: bool = True) -> dict:
    """Write ``<stem>_<class>_mask.png`` and ``_overlay.png`` for the top-k classes, and explanations.json.

    Images are resized to the explainer's input size for one batched pass
    (all classes at once) and the masks resized back to each image's size.
    """
    from explainer import viz

    out = Path(out)
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
                viz.save_png((full[c].clamp(0, 1).numpy() * 255).round().astype(np.uint8),
                             out / f"{p.stem}_{safe}_mask.png")
                viz.save_png(viz.overlay(img, full[c]), out / f"{p.stem}_{safe}_overlay.png")
                entries.append({"class": name, "index": c, "probability": float(pr[c]),
                                "mask_area": float(full[c].mean())})
            report[str(p)] = {"top_classes": entries}
    atomic_write_text(out / "explanations.json", json.dumps(report, indent=1))
    return report
