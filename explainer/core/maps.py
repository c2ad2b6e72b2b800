"""Operations on attribution maps ``(B, K, H, W)``: normalisation and resizing."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def minmax_normalize(m: torch.Tensor, rel_eps: float = 1e-6) -> torch.Tensor:
    """Per map: ``(m - min) / (max - min)`` over the trailing spatial dims, for maps ``(..., H, W)``.

    A map whose range is at most ``rel_eps`` of its magnitude becomes all zeros instead of amplified rounding
    noise (a constant map, or the upsampled 1x1 map of a late layer at a small input). ``rel_eps=0`` blanks only
    exactly constant maps (what the metrics use, so that any real ranking survives).
    """
    if m.dim() < 2:
        raise ValueError(f"maps: expected at least (H, W) dims, got shape {tuple(m.shape)}")
    flat = m.flatten(-2)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    rng = hi - lo
    flat_enough = rng <= rel_eps * torch.maximum(hi.abs(), lo.abs()) + 1e-30 if rel_eps > 0 else rng <= 0
    out = (flat - lo) / torch.where(flat_enough, torch.ones_like(rng), rng)
    return torch.where(flat_enough, torch.zeros_like(out), out).view_as(m)


def upsample(m: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resize maps (B, K, h, w) to ``size`` (align_corners=False); unchanged when already that size."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m, size=tuple(size), mode=mode, align_corners=False)
