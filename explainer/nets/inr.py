"""An area-conditioned coordinate network for masks: ``g_theta(u, a) -> m in (0, 1)``.

Part of the reconstruction of Byra & Skibbe (WACV 2025), "Generating visual explanations from deep
networks using implicit neural representations", which has no public code: the architecture below is
this project's choice within what the paper describes (a coordinate MLP with Fourier-feature or
sinusoidal encoding, the requested area as a conditioning input, a sigmoid output).

* ``u`` in [-1, 1]^2 (pixel centres), encoded as Fourier features
  ``gamma(u) = [sin(2 pi B u), cos(2 pi B u)]`` with fixed frequencies ``B ~ N(0, scale^2)`` (F x 2);
* the area ``a`` enters as ``psi(a) = [a, log a]`` through FiLM (``h <- h * (1 + s_l(psi)) + t_l(psi)``
  after every hidden layer; ``s_l, t_l`` linear, zero-initialised so training starts area-agnostic) or by
  concatenation to ``gamma(u)`` (``conditioning="concat"``);
* ``layers`` hidden layers of ``width`` units, ReLU, a linear output and a sigmoid.

``groups`` independent networks (one per image) are held in grouped parameters (G, ...) and evaluated
with batched matrix products, so a batch of images trains in one pass and each network sees only its own
image's loss (Adam's per-element updates keep them independent). All groups start from the same
initialisation (drawn from ``seed``), so an image's result does not depend on the batch it is in.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def pixel_coordinates(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixel centres of an (h, w) grid in [-1, 1]^2 as (h * w, 2) rows ``(y, x)``, row-major."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def area_features(areas: torch.Tensor) -> torch.Tensor:
    """``psi(a) = [a, log a]``: (..., ) -> (..., 2)."""
    a = areas.clamp_min(1e-4)
    return torch.stack([a, a.log()], dim=-1)


class AreaConditionedINR(nn.Module):
    """G coordinate networks ``g_theta(u, a)``; see the module docstring.

    Args:
        groups: G, independent networks (one per image).
        width, layers: hidden units and hidden layers (64, 3).
        num_frequencies, frequency_scale: F Fourier features with frequencies ~ N(0, scale^2) (32, 3.0);
            a low scale gives smooth masks.
        conditioning: ``"film"`` (default) or ``"concat"``.
        output_bias: initial output bias (0: masks start at 0.5).
        seed: the initialisation (shared by all groups) and the frequencies.
    """

    def __init__(self, groups: int = 1, width: int = 64, layers: int = 3, num_frequencies: int = 32,
                 frequency_scale: float = 3.0, conditioning: str = "film", output_bias: float = 0.0, seed: int = 0):
        super().__init__()
        if conditioning not in ("film", "concat"):
            raise ValueError(f"conditioning: expected 'film' or 'concat', got {conditioning!r}")
        for name, v in (("groups", groups), ("width", width), ("layers", layers), ("num_frequencies", num_frequencies)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        self.groups, self.conditioning = groups, conditioning
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(num_frequencies, 2, generator=gen) * frequency_scale)
        d_in = 2 * num_frequencies + (2 if conditioning == "concat" else 0)
        dims = [d_in] + [width] * layers
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            self.weights.append(self._grouped(torch.randn(a, b, generator=gen) * math.sqrt(2.0 / a)))
            self.biases.append(self._grouped(torch.zeros(b)))
        self.out_w = self._grouped(torch.randn(width, 1, generator=gen) * math.sqrt(1.0 / width))
        self.out_b = self._grouped(torch.full((1,), float(output_bias)))
        if conditioning == "film":
            self.film_w = self._grouped(torch.zeros(layers, 2, 2 * width))
            self.film_b = self._grouped(torch.zeros(layers, 2 * width))

    def _grouped(self, t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.unsqueeze(0).repeat(self.groups, *([1] * t.dim())))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Fourier features (P, 2F) of coordinates (P, 2)."""
        z = 2 * math.pi * coords @ self.freqs.t()
        return torch.cat([z.sin(), z.cos()], dim=-1)

    def forward(self, coords: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
        """Mask logits (G, S, P) at coordinates (P, 2) for areas (S,) (shared) or (G, S)."""
        g = self.groups
        if areas.dim() == 1:
            areas = areas.unsqueeze(0).expand(g, -1)
        s, p = areas.shape[1], coords.shape[0]
        psi = area_features(areas.to(coords.dtype))  # (G, S, 2)
        h = self.encode(coords).unsqueeze(0).unsqueeze(0).expand(g, s, p, -1)
        if self.conditioning == "concat":
            h = torch.cat([h, psi.unsqueeze(2).expand(g, s, p, 2)], dim=-1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.relu(torch.baddbmm(b.unsqueeze(1), h.reshape(g, s * p, -1), w)).view(g, s, p, -1)
            if self.conditioning == "film":
                mod = torch.einsum("gsk,gkd->gsd", psi, self.film_w[:, i]) + self.film_b[:, i].unsqueeze(1)
                scale, shift = mod.chunk(2, dim=-1)
                h = h * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)
        out = torch.baddbmm(self.out_b.unsqueeze(1), h.reshape(g, s * p, -1), self.out_w)
        return out.view(g, s, p)

    def masks(self, size: Sequence[int], areas: torch.Tensor | Sequence[float], resolution: int | None = None
              ) -> torch.Tensor:
        """Masks (G, S, H, W) in (0, 1) for ``areas``: evaluated on a grid whose short side is
        ``min(resolution, min(H, W))`` (all pixels when None) and upsampled bilinearly to ``size``."""
        h, w = int(size[0]), int(size[1])
        dev = self.out_w.device
        areas = torch.as_tensor(areas, dtype=torch.float32, device=dev)
        gh, gw = h, w
        if resolution is not None and min(h, w) > resolution:
            scale = resolution / min(h, w)
            gh, gw = max(1, round(h * scale)), max(1, round(w * scale))
        m = torch.sigmoid(self(pixel_coordinates(gh, gw, dev), areas)).view(self.groups, -1, gh, gw)
        if (gh, gw) != (h, w):
            m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        return m
