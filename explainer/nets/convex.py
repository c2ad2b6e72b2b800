"""Edge-aware upsampling of a coarse segmentation output, guided by the image (convex upsampling).

An smp encoder-decoder whose head works at ``1/factor`` of the input (the light FPN at 1/4) draws its masks as
blobs once upsampled bilinearly: an object's edge is smeared over ``factor`` pixels or more. Here each
full-resolution pixel ``p`` takes a convex combination of the coarse logits in the 3 x 3 neighbourhood of its
coarse parent ``q(p)``::

    S_c(p) = sum_k w_k(p) L_c(q(p) + k),    w(p) = softmax_k(g(p)),   k in {-1, 0, 1}^2

with weights ``g`` predicted at full resolution from the image, the encoder's first (stride-2) features and
the decoder's features (RAFT's convex upsampling, Teed and Deng, ECCV 2020, used here as the image-guided
upsampling of an explainer's masks). The weights are shared by every class, so the class maps keep what the
coarse head decided and only their edges move to where the image has them; a class costs 9 multiply-adds per
pixel. The weight predictor starts at zero: the initial upsampling is the 3 x 3 box mean of the parents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONVEX_PADDINGS = ("replicate", "zero")


def check_padding(padding: str) -> str:
    if padding not in CONVEX_PADDINGS:
        raise ValueError(f"convex_upsample: padding expected one of {CONVEX_PADDINGS}, got {padding!r}")
    return padding


class ConvexUpsampledNet(nn.Module):
    """An smp model (``encoder``, ``decoder``, ``segmentation_head`` = [conv, upsampling, activation]) whose head
    is applied at the decoder's resolution and upsampled by :func:`convex_upsample` with image-guided weights.

    Args:
        base: the smp model (FPN: decoder output at 1/4 of the input).
        guide_channels: channels of the full-resolution image features and of each projection.
        padding: the coarse logits' padding at the border (:func:`convex_upsample`).
    """

    def __init__(self, base: nn.Module, guide_channels: int = 8, padding: str = "replicate"):
        super().__init__()
        self.padding = check_padding(padding)
        self.encoder, self.decoder = base.encoder, base.decoder
        self.segmentation_head = base.segmentation_head
        dec_ch = self.segmentation_head[0].in_channels
        g = guide_channels
        self.image_guide = nn.Sequential(nn.Conv2d(3, g, 3, padding=1), nn.ReLU(inplace=True))
        # smp encoders list their outputs from the input itself (stride 1) down; [1] is the stride-2 map
        self.stem_proj = nn.Conv2d(self.encoder.out_channels[1], g, 1)
        self.decoder_proj = nn.Conv2d(dec_ch, g, 1)
        self.weights = nn.Conv2d(3 * g + 3, 9, 1)
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)

    def coarse(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        features = self.encoder(z)
        d = self.decoder(features)
        return self.segmentation_head[0](d), features, d

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        H, W = z.shape[-2:]
        L, features, d = self.coarse(z)
        g = self.image_guide[0].out_channels
        # weights(cat[z, image_guide(z), up(stem_proj(stem)), up(decoder_proj(d))]) computed part by part: the
        # 1x1 conv is linear and commutes with the bilinear upsampling, so the low-resolution parts are mixed down
        # to 9 channels before they are upsampled (the same values, without full-resolution concatenation)
        Wt = self.weights.weight[:, :, 0, 0]
        parts = torch.split(Wt, [3, g, g, g], dim=1)
        low = F.conv2d(self.stem_proj(features[1]), parts[2][..., None, None])
        up = dict(size=(H, W), mode="bilinear", align_corners=False)
        # summed in place: each full-resolution term is a fresh (B, 9, H, W) tensor, and allocating their sums
        # cost more than the convolutions (docs/BENCHMARKS.md)
        logits = F.conv2d(z, parts[0][..., None, None], self.weights.bias)
        logits += F.conv2d(self.image_guide(z), parts[1][..., None, None])
        logits += F.interpolate(low, **up)
        logits += F.interpolate(F.conv2d(self.decoder_proj(d), parts[3][..., None, None]), **up)
        w = torch.softmax(logits, dim=1)
        return convex_upsample(L, w, self.padding)


def convex_upsample(L: torch.Tensor, w: torch.Tensor, padding: str = "replicate") -> torch.Tensor:
    """``S_c(p) = sum_k w_k(p) L_c(q(p) + k)`` (module docstring): coarse logits ``L`` (B, C, h, w), weights
    ``w`` (B, 9, H, W) summing to 1 over the 3 x 3 neighbourhood (row-major, zero padding outside), with
    ``H = f h`` and ``W = f w``; returns (B, C, H, W). ``padding``: what a neighbourhood holds outside the
    coarse grid: ``"replicate"`` (the nearest border logit, so a mask continues to the image's edge as it is
    inside) or ``"zero"`` (logit 0, a half-on mask: a faint strip along the border; kept to reproduce the
    first trained models)."""
    B, C, h, wd = L.shape
    H, W = w.shape[-2:]
    if H % h or W % wd or H // h != W // wd:
        raise ValueError(f"convex_upsample: expected the fine grid {H}x{W} to be an integer multiple of the coarse "
                         f"grid {h}x{wd}")
    check_padding(padding)
    f = H // h
    P = F.pad(L, (1, 1, 1, 1), mode="replicate") if padding == "replicate" else F.pad(L, (1, 1, 1, 1))
    # the 3 x 3 neighbourhoods channels-last: (B, h, w, 9, C), k row-major
    P = P.permute(0, 2, 3, 1)
    U = torch.stack([P[:, a:a + h, b:b + wd] for a in range(3) for b in range(3)], dim=3)
    # fine pixel (i f + a, j f + b) of coarse parent (i, j): one (f f x 9) @ (9 x C) product per parent, as a
    # batched matrix product (one copy groups each parent's pixels)
    wk = w.permute(0, 2, 3, 1).reshape(B, h, f, wd, f, 9).permute(0, 1, 3, 2, 4, 5).reshape(B * h * wd, f * f, 9)
    out = torch.bmm(wk, U.reshape(B * h * wd, 9, C))
    return out.view(B, h, wd, f, f, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
