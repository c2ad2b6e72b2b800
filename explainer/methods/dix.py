"""DIX -- Deep Integrated Explanations (Barkan et al., CIKM 2023).

**CNN.** Two integrated maps, at the last block ``A`` (e.g. ``layer4``) and the block before ``A'``:

    path:  r = min_channels(A) (per location),  v_k = r + (k/K)(A - r),  k = 0..K  (K = steps = 4)
    H1 = sum_k ReLU(dy_c/dv_k) * ReLU(v_k)                                     (last block, per channel)
    H2 = sum_k ReLU(dy_c/dv'_k * ReLU(v'_k) * ||(v'_k - r') / K||)             (block before; ||.|| the
                                                                                 Frobenius norm per image)
    M  = sum_channels (H2 * H1 + H1)   with H1, H2 resized (trilinearly, channels included) to one grid
         (channels, height, width);

then upsampled bicubically to the input and min-max normalised.

The grid: ``variant="faithful"`` (default) uses the block before's own (C', 2h', 2w'); the released code
always uses (1024, 28, 28) (:data:`OFFICIAL_GRID`), whatever the network and input size, which
``variant="official"`` does too. Both are the same grid for ResNet-50/101 at 224 px (``layer3``: 1024
channels at 14 x 14) and differ elsewhere.

``variant="faithful"`` integrates ``H1`` along that path. ``variant="official"`` reproduces the
released code, whose reference for the last block is the minimum over a singleton axis -- the
activations themselves -- so every path point is ``A`` and ``H1 = (K+1) ReLU(dy/dA) ReLU(A)``.
Passes per image: 1 backbone forward, ``K + 1`` passes of everything after the block before and ``K + 1``
passes of the head after the last block, in two batched forward+backward passes (each block's forward
hook expands its output into the path points, so the block's output must alone feed the rest of the
network).

**ViT.** For the last block and the one before (``blocks=2``), the block's attention is replaced by
``beta * A_b`` for ``beta`` in ``steps + 1`` scalings (default 10: 11 points); the per-head maps
``ReLU(dy/dA * A)`` of every block, averaged over the scalings, are rolled out (mean over heads, add
identity, row-normalise, multiply across blocks) and the class-token rows of both rollouts summed.
Passes per image: ``blocks * (steps + 1)`` forward+backward (22; the official code makes 24, two of them
only reading the attention; docs/METHODS.md section 5). ``variant="official"``: the released code injects
the *last* block's scaled attention into the earlier block as well, and uses ``steps = 5``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explainer.core.maps import minmax_normalize, upsample
from explainer.core.models import is_vit
from explainer.methods.base import (
    Method,
    check_steps,
    forward_hooks,
    no_validation,
    progress_bar,
    register,
    run_expanded,
    target_scores,
)
from explainer.methods.iia import _expand_path, check_variant, layer_reference
from explainer.methods.vit import attention_gradient_maps, attention_probe, rollout, tokens_to_image

# the released code combines the two CNN maps on this grid (channels, height, width) for every network
OFFICIAL_GRID = (1024, 28, 28)


def path_gradients(f: nn.Module, module: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int,
                   degenerate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients along the path ``v_k = r + (k/K)(u - r)`` at ``module``'s output ``u``.

    Returns ``v`` and ``dy_c/dv`` (B, K+1, C, h, w) and ``r`` (B, C, h, w); ``degenerate``: ``r = u``
    (every point is ``u``, the official code's last-block path). One batched forward+backward.
    """
    alphas = torch.linspace(0, 1, steps + 1, device=x.device, dtype=x.dtype)
    p, keep = steps + 1, {}

    def hook(_m, _i, u):
        u = u.detach()
        r = u if degenerate else layer_reference(u, "channel_min")
        v = _expand_path(u, r, alphas).contiguous().requires_grad_(True)
        keep["v"], keep["r"] = v, r
        return v.clone()  # downstream in-place ops (ReLU(inplace=True)) must not touch the leaf

    with forward_hooks([(module, hook)]):
        logits = run_expanded(f, x, "layer")
    v = keep["v"]
    (g,) = torch.autograd.grad(target_scores(logits, target.repeat_interleave(p)).sum(), v)
    shape = (x.shape[0], p, *v.shape[1:])
    return v.detach().view(shape), g.view(shape), keep["r"]


def dix_cnn_maps(f: nn.Module, last: nn.Module, previous: nn.Module, x: torch.Tensor, target: torch.Tensor,
                 steps: int = 4, variant: str = "faithful") -> tuple[torch.Tensor, torch.Tensor]:
    """``H1`` (B, C, h, w) at ``last`` and ``H2`` (B, C', h', w') at ``previous`` (formulas in the module
    docstring)."""
    v, g, _ = path_gradients(f, last, x, target, steps, degenerate=variant == "official")
    h1 = (g.relu() * v.relu()).sum(dim=1)
    v2, g2, r2 = path_gradients(f, previous, x, target, steps)
    norm = ((v2 - r2.unsqueeze(1)) / steps).flatten(2).norm(dim=2).view(*v2.shape[:2], 1, 1, 1)
    h2 = (g2 * v2.relu() * norm).relu().sum(dim=1)
    return h1, h2


def dix_combine(h1: torch.Tensor, h2: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``sum_channels (H2 H1 + H1)`` with both maps resized to ``grid`` (channels, height, width); None: the
    grid (C', 2h', 2w') of ``H2``'s block. Returns (B, 1, height, width)."""
    size = tuple(grid) if grid is not None else (h2.shape[1], 2 * h2.shape[2], 2 * h2.shape[3])
    a = F.interpolate(h1.unsqueeze(1), size=size, mode="trilinear", align_corners=False).squeeze(1)
    b = F.interpolate(h2.unsqueeze(1), size=size, mode="trilinear", align_corners=False).squeeze(1)
    return (b * a + a).sum(dim=1, keepdim=True)


@register("dix")
class DIX(Method):
    """Deep Integrated Explanations (see the module docstring for the formulas and pass counts).

    Args:
        layer, previous_layer: CNN blocks (default ``layer4`` / ``layer3`` on ResNets, see
            :func:`~explainer.methods.base.default_layers`).
        steps: K, intervals per path (CNN default 4; ViT default 10, official 5).
        blocks: ViT blocks integrated, counted from the last (default 2).
        variant: ``"faithful"`` (default) or ``"official"`` (the released code's behaviour, its fixed
            1024 x 28 x 28 combination grid included).
        normalize: min-max normalise each map (default True).
    """

    def __init__(self, f: nn.Module | str, *, layer: str | None = None, previous_layer: str | None = None,
                 steps: int | None = None, blocks: int = 2, variant: str = "faithful", normalize: bool = True,
                 **common):
        super().__init__(f, **common)
        self.variant, self.normalize = check_variant(variant), bool(normalize)
        self.vit = is_vit(self.model)
        default_steps = (5 if variant == "official" else 10) if self.vit else 4
        self.steps = check_steps(steps if steps is not None else default_steps, "steps")
        if self.vit:
            self.blocks = check_steps(blocks, "blocks")
            if self.blocks > len(self.model.blocks):
                raise ValueError(f"blocks: the ViT has {len(self.model.blocks)} blocks, got blocks={blocks}")
        else:
            self.layer_name, self.last = self.layer(layer, "last")
            self.previous_name, self.previous = self.layer(previous_layer, "previous", "previous_layer")

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = []
        with no_validation(self.f):
            for i in progress_bar(range(x.shape[0]), self.progress, "dix"):
                s = slice(i, i + 1)
                if self.vit:
                    out.append(self._vit(x[s], target[s]))
                else:
                    m = dix_combine(*dix_cnn_maps(self.f, self.last, self.previous, x[s], target[s], self.steps,
                                                  self.variant), OFFICIAL_GRID if self.variant == "official" else None)
                    out.append(upsample(m, x.shape[-2:], "bicubic"))
        m = torch.cat(out)
        return minmax_normalize(m) if self.normalize else m

    def _vit(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One image (1, 3, H, W) -> (1, 1, H, W)."""
        n_blocks = len(self.model.blocks)
        betas = torch.linspace(0, 1, self.steps + 1, device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
        n_prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        last_attn = None
        if self.variant == "official":
            with attention_probe(self.model) as att, torch.no_grad():
                self.f(x)
            last_attn = att[n_blocks - 1]
        total = 0
        for j in range(1, self.blocks + 1):
            idx = n_blocks - j
            acc = None
            for s in range(0, betas.shape[0], self.internal_batch_size):
                bs = betas[s:s + self.internal_batch_size]

                def edit(a, bs=bs):
                    src = a if last_attn is None else last_attn.expand_as(a)
                    return (bs * src.detach()).requires_grad_(True)

                with attention_probe(self.model, {idx: edit}) as att:
                    logits = self.f(x.expand(bs.shape[0], -1, -1, -1).detach().requires_grad_(True))
                maps = attention_gradient_maps(att, logits, target.expand(bs.shape[0]))
                acc = maps if acc is None else acc + maps
            total = total + rollout(list((acc / betas.shape[0]).unsqueeze(1)), n_prefix)
        return tokens_to_image(self.model, total, x.shape[-2:])
