"""Pictures: mask panels and overlays (numpy uint8, written as PNG), and line plots of curves (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

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


def plot_curves(series: dict[str, Sequence[dict]], x: str, panels: Sequence[tuple[str, str]],
                path: str | os.PathLike, title: str = "", xlabel: str | None = None,
                styles: Sequence[str] | None = None) -> Path:
    """Line plots side by side, one panel per ``(key, label)`` of ``panels``: each series (a name -> its rows,
    dicts) drawn as ``row[key]`` against ``row[x]`` (rows without ``key`` are left out), legend in the first
    panel; written as PNG atomically (matplotlib, Agg). A refinement curve (quality against the fraction ``r``
    of masks refined) is drawn this way by ``evaluate`` and ``benchmarks/bench_trust.py``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("panels: expected at least one (key, label) to plot")
    fig = Figure(figsize=(4.5 * len(panels), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels):
        for i, (name, rows) in enumerate(series.items()):
            pts = [(row[x], row[key]) for row in rows if row.get(key) is not None]
            style = styles[i % len(styles)] if styles else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)
