"""Gradient baselines wrapping Captum: Saliency and Integrated Gradients.

Both produce a per-channel attribution (B, 3, H, W) that is reduced over the colour channels to one map
(B, 1, H, W); the reduction is an option because it changes what the map means (see each class).
"""

from __future__ import annotations

import torch
from torch import nn

from explainer.core.masking import baseline_image, check_baseline
from explainer.methods.base import Method, check_steps, no_validation, register

_AGGREGATES = ("sum", "abs", "max")


def reduce_channels(attr: torch.Tensor, how: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): ``"sum"`` (signed sum), ``"abs"`` (sum of absolute values) or
    ``"max"`` (maximum absolute value, Simonyan et al. 2014)."""
    if how == "sum":
        return attr.sum(dim=1, keepdim=True)
    if how == "abs":
        return attr.abs().sum(dim=1, keepdim=True)
    if how == "max":
        return attr.abs().amax(dim=1, keepdim=True)
    raise ValueError(f"aggregate: expected one of {_AGGREGATES}, got {how!r}")


def _check_aggregate(how: str) -> str:
    if how not in _AGGREGATES:
        raise ValueError(f"aggregate: expected one of {_AGGREGATES}, got {how!r}")
    return how


@register("saliency")
class Saliency(Method):
    """Saliency (Simonyan et al., 2014): ``max_channel |dy_c / dx|`` (Captum ``Saliency``, ``abs=True``).

    Passes per image: 1 forward + 1 backward.

    Args:
        aggregate: channel reduction, ``"max"`` (default, the paper's), ``"abs"`` or ``"sum"``.
    """

    def __init__(self, f: nn.Module | str, *, aggregate: str = "max", **common):
        super().__init__(f, **common)
        self.aggregate = _check_aggregate(aggregate)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import Saliency as _Saliency

        with no_validation(self.f):
            attr = _Saliency(self.f).attribute(x.requires_grad_(True), target=target, abs=self.aggregate != "sum")
        return reduce_channels(attr, self.aggregate)


@register("integrated_gradients")
class IntegratedGradients(Method):
    """Integrated Gradients (Sundararajan et al., 2017), via Captum:

    ``IG_i(x) = (x_i - b_i) * int_0^1 dy_c/dx_i (b + a (x - b)) da``, summed over the colour channels.

    With ``aggregate="sum"`` (default) the map keeps IG's completeness axiom:
    ``sum_ij map_ij ~= y_c(x) - y_c(b)``; ``"abs"`` sums ``|IG|`` over channels (a common display choice
    that loses the sign and completeness). Passes per image: ``steps`` forward+backward, in batches of
    ``internal_batch_size`` path points.

    Args:
        steps: number of path points (Captum ``n_steps``), default 50.
        baseline: the reference image ``b``: ``"black"`` (default, Captum's zeros), ``"mean"`` or ``"blur"``
            (see :mod:`explainer.core.masking`).
        method: Captum's quadrature, ``"gausslegendre"`` (default) or ``"riemann_left"``, ``"riemann_right"``,
            ``"riemann_middle"``, ``"riemann_trapezoid"``.
        aggregate: ``"sum"`` (default), ``"abs"`` or ``"max"``.
    """

    def __init__(self, f: nn.Module | str, *, steps: int = 50, baseline: str = "black",
                 method: str = "gausslegendre", aggregate: str = "sum", **common):
        super().__init__(f, **common)
        self.steps = check_steps(steps, "steps")
        self.baseline = check_baseline(baseline)
        methods = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
        if method not in methods:
            raise ValueError(f"method: expected one of {methods}, got {method!r}")
        self.method = method
        self.aggregate = _check_aggregate(aggregate)

    def per_channel(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Captum's IG attributions before the channel reduction, (B, 3, H, W)."""
        from captum.attr import IntegratedGradients as _IG

        b = baseline_image(x, self.baseline, mean=self.f.mean.flatten())
        with no_validation(self.f):
            return _IG(self.f).attribute(x, baselines=b, target=target, n_steps=self.steps, method=self.method,
                                         internal_batch_size=max(self.internal_batch_size, x.shape[0]))

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return reduce_channels(self.per_channel(x, target), self.aggregate)
