"""An ensemble of registered methods: the weighted mean of their normalised maps.

``get("ensemble", f, members={"dix": {}, "gradcam": {"weight": 0.5}})`` runs every member on the same images and
targets, brings each map to the images' size, normalises it per map (min-max to [0, 1], or to ranks in [0, 1]) and
averages them with the members' weights. Members are looked up in the method registry when the ensemble is built,
so any registered method can take part, trained explainers included (``{"pltx": {"checkpoint": PATH}}``). The
same method twice with other options: give each its own label and name the method with ``"method"``
(``{"ig_a": {"method": "integrated_gradients", "steps": 16}, ...}``).

Why: maps of different methods err in different places, and their mean is often more faithful than each (the
embedded benchmark's numbers are in docs/DISTILLATION.md); an ensemble is a slow teacher that a one-pass
student (the ``distill`` kind) can learn from, at the price of one forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from explainer.core.maps import minmax_normalize, upsample
from explainer.methods.base import Method, get, register

NORMALIZATIONS = ("minmax", "rank")


def rank_normalize(m: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> the rank of every pixel within its map, scaled to [0, 1] (ties broken by position)."""
    flat = m.flatten(1)
    ranks = flat.argsort(dim=1, stable=True).argsort(dim=1, stable=True).to(torch.float32)
    return (ranks / max(flat.shape[1] - 1, 1)).view_as(m)


@register("ensemble")
class Ensemble(Method):
    """The weighted mean of registered methods' normalised maps (see the module docstring).

    Args:
        members: ``{label: options}``; the label is the registered method's name unless the options give
            ``"method"``; ``"weight"`` (default 1, >= 0) weighs the member's map; the other options go to the
            method.
        normalize: "minmax" (each map to [0, 1]) or "rank" (each pixel's rank in its map, in [0, 1]).
        sharpen: the mean is min-max normalised and raised to this power (> 0; 1 leaves it): a monotone
            transform, so the order of the pixels (what deletion, insertion and pointing read) is unchanged.
    """

    def __init__(self, f: Any, *, members: dict[str, dict] | None = None, normalize: str = "minmax",
                 sharpen: float = 1.0, **options: Any):
        super().__init__(f, **options)
        if not isinstance(members, dict) or not members:
            raise ValueError("members: expected a non-empty mapping {method name or label: options}, e.g. "
                             f"{{'dix': {{}}, 'gradcam': {{'weight': 0.5}}}}; got {members!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: expected one of {list(NORMALIZATIONS)}, got {normalize!r}")
        if isinstance(sharpen, bool) or not isinstance(sharpen, (int, float)) or not sharpen > 0:
            raise ValueError(f"sharpen: expected a number > 0, got {sharpen!r}")
        self.normalize, self.sharpen = normalize, float(sharpen)
        self.members: list[tuple[str, float, Method]] = []
        for label, opts in members.items():
            if opts is None:
                opts = {}
            if not isinstance(opts, dict):
                raise ValueError(f"members.{label}: expected a mapping of options, got {opts!r}")
            opts = dict(opts)
            name = opts.pop("method", label)
            weight = opts.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"members.{label}.weight: expected a number >= 0, got {weight!r}")
            if name == "ensemble":
                raise ValueError(f"members.{label}: an ensemble cannot hold an ensemble")
            self.members.append((str(label), float(weight), get(str(name), self.f, **opts)))
        self.total_weight = sum(w for _, w, _ in self.members)
        if not self.total_weight > 0:
            raise ValueError("members: every weight is 0; expected at least one positive weight")

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = None
        for _, weight, method in self.members:
            if weight == 0:
                continue
            m = upsample(method.attribute(x, target).float(), x.shape[-2:])
            m = minmax_normalize(m, rel_eps=0) if self.normalize == "minmax" else rank_normalize(m)
            total = weight * m if total is None else total + weight * m
        total = total / self.total_weight
        if self.sharpen != 1.0:
            total = minmax_normalize(total, rel_eps=0).pow(self.sharpen)
        return total
