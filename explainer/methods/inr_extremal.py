"""INR extremal perturbations (Byra & Skibbe, WACV 2025) -- a reconstruction, as no official code is public.

The mask is an implicit function ``m = g_theta(u, a)`` of the pixel coordinate ``u`` and the requested
area ``a`` (:class:`explainer.nets.inr.AreaConditionedINR`), trained per image with the extremal-perturbation
objective of :mod:`explainer.methods.extremal` (blur-pyramid perturbation, ranking area constraint with a
growing weight, preserve/delete/dual variants, simple/contrastive reward, flip jitter), sampling
``areas_per_step`` areas from ``area_range`` at every step (stratified, the same for all images). One
network then gives a mask for *any* area: the paper's claim is that such masks are well behaved with
respect to the imposed area (achieved close to requested, nested as the area grows, smooth).

    theta* = argmax_theta  E_{a ~ U(area_range)} [ reward(f(perturb(x, g_theta(., a)))) - lambda_t R_a(g_theta(., a)) ]

Choices this reconstruction makes where the paper leaves room: Adam (lr 1e-3) for 500 steps, 4 areas per
step, the EP schedule ``lambda_t = 300 * 1.0035^t``, Fourier features + FiLM conditioning, the network
evaluated on a grid of at most 64 px on the short side and upsampled bilinearly.

**Multiple non-overlapping masks** (:func:`multiple_masks`): after mask ``M_1`` is found, its region
(``M_1 > 0.5``) is held perturbed and a fresh network is fitted for an effective mask
``m_eff = g_theta(u, a) * (1 - U)`` with ``U`` the union of the earlier binarised masks, so the new mask
cannot overlap them; repeat ``k`` times, or, per image, until the class score no longer recovers
(the preserved reward minus the reward of the fully perturbed image falls to ``min_gain`` or below).

Batched over images: one network per image through grouped parameters (no vmap needed), ``internal_batch_size``
bounding images x areas per forward. Cost: ``max_iter`` forward+backward passes on ``areas_per_step``
perturbed images per image (x2 for ``dual``), times ``k`` for :func:`multiple_masks`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from explainer.core.images import check_images
from explainer.core.targets import TargetLike, resolve_targets
from explainer.explanandum import load_explanandum
from explainer.methods.base import (
    Method,
    check_areas,
    check_steps,
    chunks,
    no_validation,
    progress_bar,
    register,
)
from explainer.methods.extremal import (
    REDUCTIONS,
    Perturbation,
    _check_choice,
    area_reference,
    ascent_step,
    check_objective,
    default_scales,
    reduce_masks,
    variant_reward,
)
from explainer.nets.inr import AreaConditionedINR


@dataclass
class FittedINRMasks:
    """The networks fitted for a batch of images; :meth:`masks` evaluates them at any areas."""

    nets: list[AreaConditionedINR]
    size: tuple[int, int]
    resolution: int | None
    exclude: torch.Tensor | None = None  # (B, 1, H, W) binary region the masks may not cover

    @torch.no_grad()
    def masks(self, areas: float | Sequence[float]) -> torch.Tensor:
        """Masks (B, K, H, W) in [0, 1] for the areas (each in (0, 1))."""
        areas = check_areas(areas)
        m = torch.cat([n.masks(self.size, areas, self.resolution) for n in self.nets])
        return m if self.exclude is None else m * (1 - self.exclude)


def check_area_range(area_range: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` with ``0 < low < high < 1``, or a ValueError naming ``area_range``."""
    vals = check_areas(area_range, "area_range")
    if len(vals) != 2 or not vals[0] < vals[1]:
        raise ValueError(f"area_range: expected (low, high) with 0 < low < high < 1, got {area_range!r}")
    return vals


def _sample_areas(gen: torch.Generator, n: int, lo: float, hi: float) -> list[float]:
    """n stratified areas in [lo, hi]: one uniform draw in each of n equal bins."""
    u = torch.rand(n, generator=gen)
    return [lo + (hi - lo) * (i + float(u[i])) / n for i in range(n)]


def fit_inr_masks(f: nn.Module, x: torch.Tensor, target: TargetLike = None, *,
                  area_range: tuple[float, float] = (0.02, 0.5), areas_per_step: int = 4, max_iter: int = 500,
                  lr: float = 1e-3, lambda0: float = 300.0, lambda_growth: float = 1.0035,
                  variant: str = "preserve", reward: str = "simple", baseline: str = "blur", num_levels: int = 8,
                  max_blur: float | None = None, jitter: bool = True, resolution: int | None = 64,
                  exclude: torch.Tensor | None = None, batch_size: int | None = None, seed: int = 0,
                  progress: bool = False, **net_options) -> FittedINRMasks:
    """Fit one area-conditioned network per image (see the module docstring); returns the fitted networks.

    Args:
        f: the explanandum; x: images (B, 3, H, W) in [0, 1]; target: int | list | LongTensor (B,) | None.
        area_range: areas sampled during training, inside (0, 1).
        areas_per_step: areas sampled per step (stratified over ``area_range``).
        max_iter, lr: Adam steps and learning rate; lambda0, lambda_growth: the area weight schedule.
        variant, reward, baseline, num_levels, max_blur, jitter: as :func:`~explainer.methods.extremal.
            extremal_perturbation`.
        resolution: short side of the grid the networks are evaluated on (None: every pixel).
        exclude: (B, 1, H, W) binary region the masks may not cover (used by :func:`multiple_masks`).
        batch_size: images fitted together (default all); seed: initialisation and area sampling.
        net_options: passed to :class:`~explainer.nets.inr.AreaConditionedINR` (width, layers, ...).
    """
    f = load_explanandum(f)
    check_images(x)
    lo, hi = check_area_range(area_range)
    areas_per_step = check_steps(areas_per_step, "areas_per_step")
    max_iter = check_steps(max_iter, "max_iter")
    check_objective(variant, reward, baseline)
    x = x.detach()
    t = resolve_targets(f, x, target)
    size = (x.shape[-2], x.shape[-1])
    blur_sigma = default_scales(size)[2] if max_blur is None else max_blur
    nets = []
    with no_validation(f), torch.enable_grad():
        for s in chunks(x.shape[0], batch_size or x.shape[0]):
            xb, tb = x[s], t[s]
            b = xb.shape[0]
            net = AreaConditionedINR(groups=b, seed=seed, **net_options).to(x.device)
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            pert = Perturbation(xb, baseline, num_levels, blur_sigma, mean=f.mean.flatten())
            keep = None if exclude is None else 1 - exclude[s].to(x.device)
            gen = torch.Generator().manual_seed(seed)
            lam = lambda0
            for it in progress_bar(range(max_iter), progress, "inr extremal perturbation"):
                areas = _sample_areas(gen, areas_per_step, lo, hi)
                m = net.masks(size, areas, resolution)  # (b, S, H, W)
                if keep is not None:
                    m = m * keep
                ref = area_reference(areas, size[0] * size[1], x.device)
                ascent_step(opt, f, pert, m, tb, ref, lam, variant, reward, flip=jitter and it % 2 == 0)
                lam *= lambda_growth
            nets.append(net.eval().requires_grad_(False))
    return FittedINRMasks(nets, size, resolution, None if exclude is None else exclude.to(x.device).float())


@torch.no_grad()
def _preserved_reward(f, x, t, m, baseline, num_levels, max_blur, reward) -> torch.Tensor:
    pert = Perturbation(x, baseline, num_levels, max_blur, mean=f.mean.flatten())
    with no_validation(f):
        return variant_reward(f, pert, m, t, "preserve", reward)[:, 0]


def multiple_masks(f: nn.Module, x: torch.Tensor, target: TargetLike = None, k: int = 3, area: float = 0.1,
                   min_gain: float = 0.0, threshold: float = 0.5, **fit_options) -> tuple[torch.Tensor, torch.Tensor]:
    """K non-overlapping masks per image, found one after the other (see the module docstring).

    Args:
        f, x, target: explanandum, images (B, 3, H, W) in [0, 1], targets.
        k: the largest number of masks; area: the area of each mask in (0, 1).
        min_gain: stop (per image) when the preserved reward of a new mask exceeds that of the fully
            perturbed image by no more than this; later masks are zero.
        threshold: binarisation of earlier masks for the exclusion region.
        fit_options: passed to :func:`fit_inr_masks` (max_iter, lr, area_range, variant, ...).

    Returns:
        masks (B, K, H, W) in [0, 1] (``(masks_i > threshold) & (masks_j > threshold)`` is empty for
        i != j) and gains (B, K): each mask's preserved reward minus the fully perturbed image's
        (NaN after an image stopped).
    """
    f = load_explanandum(f)
    k = check_steps(k, "k")
    (area,) = check_areas(area, "area")
    t = resolve_targets(f, x.detach(), target)
    baseline = fit_options.get("baseline", "blur")
    num_levels = fit_options.get("num_levels", 8)
    max_blur = fit_options.get("max_blur") or default_scales(x.shape[-2:])[2]
    reward = fit_options.get("reward", "simple")
    b = x.shape[0]
    empty = _preserved_reward(f, x, t, torch.zeros(b, 1, *x.shape[-2:], device=x.device), baseline, num_levels,
                              max_blur, reward)
    exclude = torch.zeros(b, 1, *x.shape[-2:], device=x.device)
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    masks, gains = [], []
    for _ in range(k):
        fitted = fit_inr_masks(f, x, t, exclude=exclude, **fit_options)
        m = fitted.masks([area])  # (B, 1, H, W), already zero on the excluded region
        gain = _preserved_reward(f, x, t, m, baseline, num_levels, max_blur, reward) - empty
        active = active & (gain > min_gain)
        m = m * active.view(-1, 1, 1, 1)
        masks.append(m)
        gains.append(torch.where(active, gain, torch.full_like(gain, float("nan"))))
        exclude = torch.maximum(exclude, (m > threshold).float())
        if not bool(active.any()):
            masks += [torch.zeros_like(m)] * (k - len(masks))
            gains += [torch.full_like(gain, float("nan"))] * (k - len(gains))
            break
    return torch.cat(masks, dim=1), torch.stack(gains, dim=1)


@register("inr_extremal_perturbation")
class INRExtremalPerturbation(Method):
    """INR extremal perturbations as a :class:`Method` (options: those of :func:`fit_inr_masks`).

    ``attribute`` fits one network per image and returns the sum of its masks at ``areas``
    (``reduce="sum"``, as :class:`~explainer.methods.extremal.ExtremalPerturbation`) or the first area's
    mask (``reduce="first"``); :meth:`fit` returns the networks, whose ``masks(areas)`` serves any areas.
    Passes per image: ``max_iter`` forward+backward on ``areas_per_step`` images.
    """

    def __init__(self, f: nn.Module | str, *, areas: float | Sequence[float] = (0.05, 0.1, 0.2, 0.3),
                 reduce: str = "sum", internal_batch_size: int = 64, progress: bool = False, seed: int = 0,
                 **options):
        super().__init__(f, internal_batch_size=internal_batch_size, progress=progress, seed=seed)
        self.areas = check_areas(areas)
        self.reduce = _check_choice(reduce, REDUCTIONS, "reduce")
        allowed = (set(inspect.signature(fit_inr_masks).parameters) | set(
            inspect.signature(AreaConditionedINR).parameters)) - {"f", "x", "target", "exclude", "batch_size",
                                                                  "seed", "progress", "groups", "net_options"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"options: unknown option(s) {unknown} for inr_extremal_perturbation; "
                            f"accepted: {', '.join(sorted(allowed))}")
        check_area_range(options.get("area_range", (0.02, 0.5)))
        check_steps(options.get("areas_per_step", 4), "areas_per_step")
        check_steps(options.get("max_iter", 500), "max_iter")
        check_objective(options.get("variant", "preserve"), options.get("reward", "simple"),
                        options.get("baseline", "blur"))
        self.options = options

    def fit(self, x: torch.Tensor, target: TargetLike = None) -> FittedINRMasks:
        """Fit the per-image networks for images ``x`` (B, 3, H, W)."""
        per = (2 if self.options.get("variant") == "dual" else 1) * self.options.get("areas_per_step", 4)
        return fit_inr_masks(self.f, x, target, seed=self.seed, progress=self.progress,
                             batch_size=max(1, self.internal_batch_size // per), **self.options)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        m = self.fit(x, target).masks(self.areas)
        return reduce_masks(m, self.reduce)
