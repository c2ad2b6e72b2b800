"""The image contract: float RGB ``(B, 3, H, W)`` in [0, 1]."""

from __future__ import annotations

from typing import Any

import torch


def check_images(x: Any, name: str = "x", check_range: bool = True) -> torch.Tensor:
    """Raise a clear error unless ``x`` is a float (B, 3, H, W) tensor in [0, 1] without NaN."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected images of shape (B, 3, H, W) with 3 RGB channels, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor with values in [0, 1], got dtype {x.dtype} "
                        "(convert uint8 images with x.float() / 255)")
    if check_range and x.numel():
        with torch.no_grad():
            lo, hi = torch.aminmax(x.detach())
            lo, hi = float(lo), float(hi)
        if lo != lo or hi != hi:
            raise ValueError(f"{name}: contains NaN")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{name}: expected RGB values in [0, 1], got range [{lo:.3g}, {hi:.3g}] "
                             "(pass unnormalised images; the explanandum normalises inside)")
    return x
