"""IIA -- Iterated Integrated Attributions (Barkan et al., ICCV 2023).

**CNN, faithful (default).** Integrals are nested over the input path and the paths of chosen layers'
representations, outer to inner. With ``b`` the baseline image, ``u_l`` the representation of layer
``l`` computed from the (interpolated) representation before it, ``r_l`` its reference and ``alpha`` the
path coordinates:

    x(a_0)          = b + a_0 (x - b)
    v_l(a_0..a_l)   = r_l + a_l (u_l - r_l),     u_l = layer_l(v_{l-1}),  r_l = reference(u_l)
    IIA(x)          = sum_channels  int..int  (u_L - r_L) * dy_c / dv_L  da_0 .. da_L

at the innermost representation ``L``, each integral by the trapezoid rule on ``steps + 1`` points; the
map is upsampled bicubically to the input and min-max normalised. The integrand is the path derivative
``dv_L/da_L * dy/dv_L``, so with only the input path it *is* Integrated Gradients (summed over
channels): IIA generalises IG to iterated paths. Reference: ``"channel_min"`` (per location, the
minimum over channels, as DIX's code; default), ``"min"`` (per image) or ``"zero"``.
IIA2 = ``layers=[last]``, IIA3 = ``layers=[previous, last]`` (reported best; default).

Passes per image: ``(steps+1)`` backbone passes, ``(steps+1)^2`` passes of the layers after the first
chosen one, ..., ``(steps+1)^(1+len(layers))`` passes of the head after the innermost layer; all run in
one batched forward+backward in which each chosen layer's forward hook expands its output into its path
points (so a layer's output must alone feed the rest of the network: ResNet stages, VGG features).
``internal_batch_size`` bounds the input-path points per pass (at least one).

**CNN, ``variant="official"``.** The released code's path over the layer degenerates (its reference is
the minimum over a singleton axis, i.e. the activations themselves), leaving
``sum_k sum_channels dy/dA_k * ReLU(A_k)`` at the last layer over the 11 input points (``steps=10``) from
the mean-colour image (zero after normalisation), upsampled bicubically, min-max normalised.
Passes per image: ``steps + 1`` forward+backward.

**ViT.** Gradient rollout integrated over the input path and a scaling of the last block's attention:
for ``a`` in ``steps + 1`` input scalings and ``beta`` in ``steps + 1`` attention scalings (default 5:
6 x 6), the last block's attention is replaced by ``beta * A_L(x(a))``; the per-head maps
``ReLU(dy/dA_b * A_b)`` of every block are averaged over all (a, beta) and rolled out (mean over heads,
add identity, row-normalise, multiply across blocks); the class-token row over the patches is upsampled
bilinearly and min-max normalised. Passes per image: ``(steps + 1)^2`` forward+backward (the official code
makes ``steps + 1`` more to read the attention first: 42).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from explainer.core.maps import minmax_normalize, upsample
from explainer.core.masking import baseline_image, check_baseline
from explainer.core.models import is_vit
from explainer.methods.base import (
    Method,
    capture_outputs,
    check_steps,
    forward_hooks,
    no_validation,
    progress_bar,
    register,
    run_expanded,
    target_scores,
    trapezoid_weights,
)
from explainer.methods.vit import attention_gradient_maps, attention_probe, rollout, tokens_to_image

REFERENCES = ("channel_min", "min", "zero")


def layer_reference(u: torch.Tensor, kind: str = "channel_min") -> torch.Tensor:
    """The reference ``r`` of a representation ``u`` (N, C, ...), same shape.

    ``channel_min``: per location, the minimum over channels; ``min``: per sample, the global minimum;
    ``zero``: zeros.
    """
    if kind == "channel_min":
        return u.amin(dim=1, keepdim=True).expand_as(u)
    if kind == "min":
        return u.flatten(1).amin(dim=1).view(-1, *([1] * (u.dim() - 1))).expand_as(u)
    if kind == "zero":
        return torch.zeros_like(u)
    raise ValueError(f"reference: expected one of {REFERENCES}, got {kind!r}")


def check_variant(variant: str) -> str:
    """``variant`` if it is ``"faithful"`` or ``"official"`` (IIA's and DIX's), else a ValueError naming it."""
    if variant not in ("faithful", "official"):
        raise ValueError(f"variant: expected 'faithful' or 'official', got {variant!r}")
    return variant


def _expand_path(u: torch.Tensor, r: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``r + a (u - r)`` for every a: (N, ...) -> (N * P, ...), sample-major (rows n*P .. n*P+P-1)."""
    a = alphas.view(1, -1, *([1] * (u.dim() - 1))).to(u.dtype)
    return (r.unsqueeze(1) + a * (u - r).unsqueeze(1)).flatten(0, 1)


def nested_path_integral(f: nn.Module, x: torch.Tensor, target: torch.Tensor, modules: Sequence[nn.Module],
                         steps: int, baseline: torch.Tensor | None, reference: str = "channel_min",
                         rows_per_pass: int = 64) -> torch.Tensor:
    """``int..int (u_L - r_L) * dy_c/dv_L`` (per channel) at the innermost representation: (B, C_L, h, w).

    ``x`` (B, 3, H, W); ``modules`` outer to inner (may be empty: then the input is innermost);
    ``baseline`` the input path's start image (B, 3, H, W), or None for no input path (then ``modules``
    must not be empty). Trapezoid rule with ``steps + 1`` points on every path.
    """
    if baseline is None and not modules:
        raise ValueError("layers: with no input path, at least one layer is needed")
    alphas, w = trapezoid_weights(steps, x.device, x.dtype)
    p = steps + 1
    # input rows: (image, a_0) when the input is integrated, else the image itself
    if baseline is not None:
        rows = _expand_path(x, baseline, alphas)
        row_img = torch.arange(x.shape[0], device=x.device).repeat_interleave(p)
        row_w = w.repeat(x.shape[0])
    else:
        rows = x
        row_img = torch.arange(x.shape[0], device=x.device)
        row_w = torch.ones(x.shape[0], device=x.device, dtype=x.dtype)
    expand = p ** len(modules)
    inner: dict[str, torch.Tensor] = {}

    def hook_for(depth: int):
        innermost = depth == len(modules) - 1

        def hook(_m, _i, u):
            u = u.detach()
            r = layer_reference(u, reference)
            v = _expand_path(u, r, alphas)
            if innermost:
                v = v.contiguous().requires_grad_(True)
                inner["v"], inner["delta"] = v, (u - r)
                return v.clone()  # downstream in-place ops (ReLU(inplace=True)) must not touch the leaf
            return v
        return hook

    # weights of the layer-path points below one input row: outer product of the trapezoid weights
    wk = torch.ones(1, device=x.device, dtype=x.dtype)
    for _ in modules:
        wk = torch.outer(wk, w).flatten()
    # the innermost layer runs on rows * p^(len(modules) - 1) samples: bound that by rows_per_pass
    per = max(1, rows_per_pass // p ** max(len(modules) - 1, 0))
    out = None
    for s in range(0, rows.shape[0], per):
        xr, img = rows[s:s + per], row_img[s:s + per]
        if not modules:
            xr = xr.clone().requires_grad_(True)
        with forward_hooks((m, hook_for(i)) for i, m in enumerate(modules)):
            logits = run_expanded(f, xr, "layers")
        v = inner["v"] if modules else xr
        (g,) = torch.autograd.grad(target_scores(logits, target[img].repeat_interleave(expand)).sum(), v)
        # the innermost path's derivative (u - r), repeated for its path points; (x - b) for the input path
        delta = inner["delta"].repeat_interleave(p, dim=0) if modules else x[img] - baseline[img]
        integrand = (delta * g).view(xr.shape[0], wk.numel(), *g.shape[1:])
        contrib = (integrand * wk.view(1, -1, *([1] * (g.dim() - 1)))).sum(dim=1)
        contrib = contrib * row_w[s:s + per].view(-1, *([1] * (g.dim() - 1)))
        if out is None:
            out = torch.zeros(x.shape[0], *contrib.shape[1:], device=x.device, dtype=contrib.dtype)
        out.index_add_(0, img, contrib)
        inner.clear()
    return out


@register("iia")
class IIA(Method):
    """Iterated Integrated Attributions (see the module docstring for the formulas and pass counts).

    Args:
        layers: CNN layer names, outer to inner (default ``[previous, last]``: IIA3; ``[last]``: IIA2;
            ``[]``: Integrated Gradients).
        steps: intervals per path (CNN default 10: 11 points; ViT default 5: 6 x 6 points).
        include_input: integrate along the input path too (default True).
        baseline: the input path's start, ``"mean"`` (default, the official zero after normalisation),
            ``"black"`` or ``"blur"``.
        reference: layer path start, ``"channel_min"`` (default), ``"min"`` or ``"zero"``.
        variant: ``"faithful"`` (default) or ``"official"`` (the released CNN code's degenerate path).
        normalize: min-max normalise each map to [0, 1] (default True; False keeps the raw integral).
    """

    def __init__(self, f: nn.Module | str, *, layers: Sequence[str] | None = None, steps: int | None = None,
                 include_input: bool = True, baseline: str = "mean", reference: str = "channel_min",
                 variant: str = "faithful", normalize: bool = True, **common):
        super().__init__(f, **common)
        check_variant(variant)
        if reference not in REFERENCES:
            raise ValueError(f"reference: expected one of {REFERENCES}, got {reference!r}")
        self.variant, self.reference = variant, reference
        self.baseline = check_baseline(baseline)
        self.include_input, self.normalize = bool(include_input), bool(normalize)
        self.vit = is_vit(self.model)
        self.steps = check_steps(steps if steps is not None else (5 if self.vit else 10), "steps")
        if self.vit:
            self.layer_names, self.modules = [], []
        else:
            if layers is None:
                layers = [self.layer(None, "previous")[0], self.layer(None, "last")[0]]
                if variant == "official":
                    layers = layers[-1:]
            if isinstance(layers, str):
                layers = [layers]
            self.layer_names = list(layers)
            self.modules = [self.layer(n)[1] for n in self.layer_names]
            if not self.include_input and not self.modules:
                raise ValueError("layers: with include_input=False, at least one layer is needed")
            if variant == "official" and len(self.modules) != 1:
                raise ValueError(f"layers: the official variant integrates one layer, got {self.layer_names}")

    def _finish(self, m: torch.Tensor, size, mode: str) -> torch.Tensor:
        m = upsample(m, size, mode)
        return minmax_normalize(m) if self.normalize else m

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        base = baseline_image(x, self.baseline, mean=self.f.mean.flatten())
        with no_validation(self.f):
            if self.vit:
                return self._finish(self._vit(x, target, base), x.shape[-2:], "bilinear")
            if self.variant == "official":
                return self._finish(self._official(x, target, base), x.shape[-2:], "bicubic")
            out = []
            for i in progress_bar(range(x.shape[0]), self.progress, "iia"):
                s = slice(i, i + 1)
                out.append(nested_path_integral(
                    self.f, x[s], target[s], self.modules, self.steps, base[s] if self.include_input else None,
                    self.reference, self.internal_batch_size).sum(dim=1, keepdim=True))
            return self._finish(torch.cat(out), x.shape[-2:], "bicubic")

    def _official(self, x: torch.Tensor, target: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        alphas, _ = trapezoid_weights(self.steps, x.device, x.dtype)
        p, out = self.steps + 1, []
        for i in progress_bar(range(x.shape[0]), self.progress, "iia"):
            rows = _expand_path(x[i:i + 1], base[i:i + 1], alphas)
            with capture_outputs({"a": self.modules[0]}) as store:
                logits = self.f(rows.requires_grad_(True))
            a = store["a"]
            (g,) = torch.autograd.grad(target_scores(logits, target[i].repeat(p)).sum(), a)
            out.append((g * a.detach().relu()).sum(dim=(0, 1)).unsqueeze(0).unsqueeze(0))
        return torch.cat(out)

    def _vit(self, x: torch.Tensor, target: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        alphas = torch.linspace(0, 1, self.steps + 1, device=x.device, dtype=x.dtype)
        p, out = self.steps + 1, []
        n_prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        for i in progress_bar(range(x.shape[0]), self.progress, "iia"):
            # rows: (input scaling a, attention scaling beta), a-major
            xi = _expand_path(x[i:i + 1], base[i:i + 1], alphas).repeat_interleave(p, dim=0)
            beta = alphas.repeat(p).view(-1, 1, 1, 1)
            acc = None
            for s in range(0, xi.shape[0], self.internal_batch_size):
                bs = beta[s:s + self.internal_batch_size]
                with attention_probe(self.model, {-1: lambda a, bs=bs: (bs * a.detach()).requires_grad_(True)}
                                     ) as att:
                    logits = self.f(xi[s:s + self.internal_batch_size].requires_grad_(True))
                maps = attention_gradient_maps(att, logits, target[i].repeat(logits.shape[0]))
                acc = maps if acc is None else acc + maps
            out.append(rollout(list((acc / xi.shape[0]).unsqueeze(1)), n_prefix))
        return tokens_to_image(self.model, torch.cat(out), x.shape[-2:])
