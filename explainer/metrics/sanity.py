"""Sanity check by model-parameter randomisation (Adebayo et al., NeurIPS 2018).

An explanation that survives the randomisation of the model's weights does
not explain the model. :func:`randomize_explanandum` re-initialises the
weights (all of them, or the top ``k`` parametrised layers: the cascading
randomisation), and :func:`rank_correlation` measures how similar the
trained and randomised models' maps are. No perturbation of the image, so no
baseline fill; the target is the one the maps were computed for.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torchmetrics.functional import spearman_corrcoef

from explainer.metrics._common import Target, _shape_of, check_maps


def _param_modules(model: nn.Module) -> list[nn.Module]:
    """Modules owning parameters directly, in registration order (input side first)."""
    return [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]


@torch.no_grad()
def randomize_explanandum(f: nn.Module, *, cascade: int | None = None, seed: int = 0) -> nn.Module:
    """A copy of ``f`` whose weights are re-initialised; ``f`` itself is untouched.

    Args:
        f: the explanandum (or any module).
        cascade: None re-initialises every parametrised module; ``k``
            only the last ``k`` (from the logits down, Adebayo's cascading
            randomisation).
        seed: the seed of the new weights (the global RNG is left as it was).

    Modules with ``reset_parameters`` (conv, linear, norm layers) use it
    (their default initialisation; norm layers get weight 1, bias 0 and fresh
    running statistics); any other parameter is drawn from N(0, 0.02^2).
    """
    g = copy.deepcopy(f)
    mods = _param_modules(g)
    if cascade is not None:
        if not isinstance(cascade, int) or cascade < 1:
            raise ValueError(f"cascade: expected None or a positive number of layers, got {cascade!r}")
        mods = mods[-cascade:]
    devices = sorted({p.device.index or 0 for p in g.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for m in reversed(mods):
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            else:
                for p in m.parameters(recurse=False):
                    p.normal_(0, 0.02)
    for p in g.parameters():
        p.requires_grad_(False)
    return g


def rank_correlation(maps_a: torch.Tensor, maps_b: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Spearman rank correlation between paired maps (N, 1, H, W) -> (N,) in [-1, 1].

    Used as Adebayo et al.'s similarity of the trained and randomised
    models' explanations: **lower is better** (the explanation changed).
    ``absolute`` ranks ``|map|`` (their "with ABS" variant). A constant map
    carries no ranking: the correlation with it is reported as 0.
    """
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"maps_b: expected the shape of maps_a {tuple(maps_a.shape)}, got {tuple(maps_b.shape)}")
    a = check_maps(maps_a, *_shape_of(maps_a, "maps_a"), "maps_a")
    b = check_maps(maps_b, *_shape_of(maps_a, "maps_a"), "maps_b")
    a, b = a.flatten(1).double(), b.flatten(1).double()
    if absolute:
        a, b = a.abs(), b.abs()
    out = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    ok = (a.std(1) > 0) & (b.std(1) > 0)
    if bool(ok.any()):
        r = spearman_corrcoef(a[ok].T.contiguous(), b[ok].T.contiguous())
        out[ok] = r.reshape(-1).double()
    return out


def model_randomization(method_factory: Callable[[nn.Module], object], f: nn.Module, x: torch.Tensor,
                        target: Target, *, maps: torch.Tensor | None = None, cascade: int | None = None,
                        seed: int = 0, absolute: bool = False) -> torch.Tensor:
    """Model-parameter randomisation test: rank correlation of trained vs randomised maps. **Lower is better.**

    Args:
        method_factory: ``lambda model: explainer.methods.get(name, model, **options)``.
        f: the trained explanandum; x: images (N, 3, H, W); target: per image.
        maps: the trained model's maps (N, 1, H, W) if already computed.
        cascade, seed: see :func:`randomize_explanandum`.

    Returns:
        (N,) Spearman correlations (see :func:`rank_correlation`).
    """
    if maps is None:
        maps = method_factory(f).attribute(x, target)
    g = randomize_explanandum(f, cascade=cascade, seed=seed)
    maps_r = method_factory(g).attribute(x, target)
    return rank_correlation(maps.detach(), maps_r.detach(), absolute=absolute)
