"""Pictures: mask panels and overlays (numpy uint8, written as PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from explainer.core.io import atomic_path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def heat(m: torch.Tensor) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 with a perceptual colour map."""
    import matplotlib

    cmap = matplotlib.colormaps["inferno"]
    return (cmap(m.detach().float().clamp(0, 1).cpu().numpy())[..., :3] * 255).astype(np.uint8)


def overlay(x: torch.Tensor, m: torch.Tensor, alpha: float = 0.55) -> np.ndarray:
    """The image (3, H, W) with the mask (H, W) laid over it as a heat map."""
    img = to_uint8(x).astype(np.float32)
    h = heat(m).astype(np.float32)
    return (img * (1 - alpha) + h * alpha).round().astype(np.uint8)


def _label(arr: np.ndarray, text: str) -> np.ndarray:
    im = Image.fromarray(arr)
    ImageDraw.Draw(im).text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(im)


def mask_panel(x: torch.Tensor, s: torch.Tensor, present: torch.Tensor, class_names: list[str],
               max_classes: int = 4) -> np.ndarray:
    """One row per image: the image, then overlays of the masks of its present classes."""
    rows = []
    H, W = x.shape[-2:]
    for i in range(x.shape[0]):
        tiles = [to_uint8(x[i])]
        idx = present[i].nonzero().flatten().tolist()[:max_classes]
        for c in idx:
            tiles.append(_label(overlay(x[i], s[i, c]), class_names[c]))
        tiles += [np.zeros((H, W, 3), np.uint8)] * (max_classes + 1 - len(tiles))
        rows.append(np.concatenate(tiles, 1))
    return np.concatenate(rows, 0)


def save_png(arr: np.ndarray, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)
