"""Input checks and the batched perturbation engine shared by the metrics.

Every perturbation metric feeds many perturbed copies of many images through
the explanandum. :func:`perturbation_curves` builds those copies on the fly,
``max_batch`` at a time, so memory stays bounded whatever the number of
images or steps, and everything runs on the device of the inputs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from explainer.core.maps import minmax_normalize
from explainer.core.masking import BASELINES, apply_mask, baseline_image
from explainer.core.targets import resolve_targets

Target = int | Sequence[int] | torch.Tensor | None
SCORES = ("probability", "logit", "accuracy")


def check_maps(maps: torch.Tensor, n: int, h: int, w: int, name: str = "maps",
               device: torch.device | None = None) -> torch.Tensor:
    """``maps`` as float (n, 1, h, w) on ``device``.

    Raises:
        ValueError: ``maps`` is not (n, 1, h, w) or (n, h, w), or it holds NaN
            or infinite values.
    """
    if not isinstance(maps, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape ({n}, 1, {h}, {w}), got {type(maps).__name__}")
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4 or maps.shape[1] != 1 or maps.shape[0] != n or tuple(maps.shape[-2:]) != (h, w):
        raise ValueError(f"{name}: expected attribution maps of shape ({n}, 1, {h}, {w}) matching the images, "
                         f"got {tuple(maps.shape)} (upsample maps to the image size first)")
    maps = maps.detach()
    maps = maps.to(device=device if device is not None else maps.device,
                   dtype=maps.dtype if maps.is_floating_point() else torch.float32)
    if not torch.isfinite(maps).all():
        bad = int((~torch.isfinite(maps)).flatten(1).any(1).sum())
        raise ValueError(f"{name}: {bad} of {n} attribution maps contain NaN or infinite values")
    return maps


def check_images_maps(x: torch.Tensor, maps: torch.Tensor, name: str = "maps") -> torch.Tensor:
    """Validate images ``x`` (N, 3, H, W) and return ``maps`` as float (N, 1, H, W) on ``x``'s device."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected images of shape (N, 3, H, W), got {shape}")
    n, _, h, w = x.shape
    return check_maps(maps, n, h, w, name, x.device)


def _shape_of(maps: torch.Tensor, name: str = "maps") -> tuple[int, int, int]:
    if not isinstance(maps, torch.Tensor) or maps.dim() not in (3, 4):
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"{name}: expected attribution maps of shape (N, 1, H, W), got {shape}")
    return maps.shape[0], maps.shape[-2], maps.shape[-1]


def resolve_target(f, x: torch.Tensor, target: Target, max_batch: int = 256) -> torch.Tensor:
    """Targets as a LongTensor (N,) on ``x``'s device; ``None`` means the predicted top-1 class
    (:func:`explainer.core.targets.resolve_targets`). Every bad target is reported as a ValueError here."""
    try:
        return resolve_targets(f, x, target, max_batch)
    except TypeError as err:
        raise ValueError(str(err)) from err


def check_max_batch(max_batch: int) -> int:
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_batch: expected a positive int (images per forward pass), got {max_batch!r}")
    return max_batch


def check_baseline_arg(baseline: str | torch.Tensor, x: torch.Tensor, allowed: tuple[str, ...] = BASELINES) -> None:
    """ValueError unless ``baseline`` is one of ``allowed`` or a baseline image of ``x``'s shape."""
    if isinstance(baseline, torch.Tensor):
        if baseline.shape != x.shape:
            raise ValueError(f"baseline: a baseline image must have the images' shape {tuple(x.shape)}, "
                             f"got {tuple(baseline.shape)}")
    elif baseline not in allowed:
        raise ValueError(f"baseline: expected one of {allowed} or an image tensor, got {baseline!r}")


def baseline_images(f, x: torch.Tensor, baseline: str | torch.Tensor, blur_sigma: float = 10.0) -> torch.Tensor:
    """The baseline image of each image (N, 3, H, W); ``"mean"`` is the explanandum's normalisation mean."""
    check_baseline_arg(baseline, x)
    if isinstance(baseline, torch.Tensor):
        return baseline.to(device=x.device, dtype=x.dtype)
    mean = getattr(f, "mean", None)
    mean = mean.flatten() if isinstance(mean, torch.Tensor) else mean
    return baseline_image(x, baseline, mean, blur_sigma=blur_sigma)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation to [0, 1]; only an exactly constant map becomes all zeros. Shape kept."""
    return minmax_normalize(maps, rel_eps=0.0)


def pixel_ranks(maps: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Rank of every pixel in its map (N, 1, H, W) -> long (N, 1, H, W); rank 0 is the most relevant.

    Ties are broken by raster order (stable sort), so the result is
    deterministic.
    """
    flat = maps.flatten(1)
    order = torch.argsort(flat, dim=1, descending=descending, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order).contiguous())
    return ranks.view_as(maps)


def class_scores(f, logits: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    """Per-row score of the target class from logits (M, C) -> (M,).

    ``probability``: ``f.probabilities`` (sigmoid if multi-label, else softmax);
    ``logit``: the raw logit; ``accuracy``: 1 if the target is still
    predicted (single-label: it is the arg-max; multi-label: its sigmoid
    exceeds 0.5), else 0.
    """
    t = target.view(-1, 1)
    if score == "probability":
        return f.probabilities(logits).gather(1, t).squeeze(1)
    if score == "logit":
        return logits.gather(1, t).squeeze(1)
    if score == "accuracy":
        if getattr(f, "multilabel", False):
            return (logits.gather(1, t).squeeze(1) > 0).to(logits.dtype)
        return (logits.argmax(1) == target).to(logits.dtype)
    raise ValueError(f"score: expected one of {SCORES}, got {score!r}")


@torch.no_grad()
def perturbation_curves(f, x: torch.Tensor, ranks: torch.Tensor, counts: torch.Tensor, target: torch.Tensor,
                        base: torch.Tensor | Callable, mode: str = "delete", score: str = "probability",
                        max_batch: int = 256) -> torch.Tensor:
    """Scores of perturbed images (N, K): pair ``i`` at step ``k``.

    ``mode="delete"``: the ``counts[k]`` pixels of lowest rank are replaced by
    the baseline, ``keep = rank >= counts[k]``; ``mode="insert"``: only they
    are kept, ``keep = rank < counts[k]``. The image is
    ``apply_mask(x, keep, base)``. All N*K perturbed images go through ``f``
    in chunks of at most ``max_batch``.

    Args:
        x: images (N, 3, H, W); ranks: long (N, 1, H, W); counts: long (K,);
        target: long (N,); base: baseline images (N, 3, H, W), or a fill
            that depends on the removed set, called once per chunk as
            ``base(x[i], keep, i, j) -> (M, 3, H, W)`` with ``keep`` bool
            (M, 1, H, W) and the pair ``i`` and step ``j`` of each row (e.g.
            :class:`explainer.metrics.road.NoisyLinearFill`).
    """
    check_max_batch(max_batch)
    n, k = x.shape[0], counts.numel()
    counts = counts.to(x.device)
    out = torch.empty(n * k, dtype=torch.float32, device=x.device)
    for start in range(0, n * k, max_batch):
        rows = torch.arange(start, min(start + max_batch, n * k), device=x.device)
        i, j = rows // k, rows % k
        c = counts[j].view(-1, 1, 1, 1)
        keep = ranks[i] >= c if mode == "delete" else ranks[i] < c
        b = base(x[i], keep, i, j) if callable(base) else base[i]
        imgs = apply_mask(x[i], keep.to(x.dtype), b)
        out[start:start + rows.numel()] = class_scores(f, f(imgs), target[i], score).float()
    return out.view(n, k)
