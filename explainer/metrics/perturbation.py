"""Faithfulness metrics: perturb the image by the attribution map, watch the class score.

All functions take the frozen classifier ``f`` (``f(x) -> logits``,
``f.probabilities``), images ``x`` (N, 3, H, W) in [0, 1], attribution maps
(N, 1, H, W) of the same size (any real values; higher means more relevant)
and the class to score per image (``target``: int, list, LongTensor (N,), or
None for the predicted top-1 class). They return one value per image (N,)
unless said otherwise; the dataset value is the mean. Removed pixels are
filled with the *baseline* (:mod:`explainer.core.masking`: ``"mean"``, ``"black"``,
``"blur"`` or an image tensor) by ``apply_mask(x, keep, baseline)``;
:func:`deletion_auc` and :func:`insertion_auc` also take ``"nli"``, ROAD's
noisy linear imputation (:mod:`explainer.metrics.road`), recomputed for
every removed set.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from explainer.core.masking import apply_mask
from explainer.metrics._common import (
    Target,
    baseline_images,
    check_images_maps,
    check_max_batch,
    class_scores,
    minmax,
    perturbation_curves,
    pixel_ranks,
    resolve_target,
)
from explainer.metrics.road import removal_fill

POS_NEG_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def rise_counts(num_pixels: int, steps: int) -> torch.Tensor:
    """RISE's schedule: ``n = ceil(HW / s)`` steps of ``s = ceil(HW / steps)`` pixels.

    Returns the number of perturbed pixels after each step, ``min(k*s, HW)``
    for ``k = 0..n`` (long, ``n + 1`` entries; the first 0, the last HW).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    step = math.ceil(num_pixels / steps)
    n = math.ceil(num_pixels / step)
    return (torch.arange(n + 1) * step).clamp_max(num_pixels)


def trapezoid_auc(curves: torch.Tensor, fractions: torch.Tensor | None = None) -> torch.Tensor:
    """Area under curves (N, K) by the trapezoidal rule -> (N,).

    ``fractions`` (K,): the increasing points of [0, 1] the curves were
    sampled at; None means K evenly spaced points.
    """
    k = curves.shape[1]
    if k < 2:
        raise ValueError(f"curves: need at least 2 points, got {k}")
    if fractions is None:
        return (curves.sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2) / (k - 1)
    if fractions.shape != (k,):
        raise ValueError(f"fractions: expected {k} points (one per curve sample), got {tuple(fractions.shape)}")
    return torch.trapezoid(curves, fractions.to(curves), dim=1)


def _causal(f, x, maps, target, baseline, steps, max_batch, mode, return_curves, score="probability",
            noise=None, seed=None):
    maps = check_images_maps(x, maps)
    check_max_batch(max_batch)
    t = resolve_target(f, x, target, max_batch)
    base = removal_fill(f, x, baseline, noise, seed)
    hw = x.shape[-1] * x.shape[-2]
    counts = rise_counts(hw, steps)
    curves = perturbation_curves(f, x, pixel_ranks(maps), counts, t, base, mode=mode, score=score,
                                 max_batch=max_batch)
    # the last step may perturb fewer pixels than the others: integrate over the actual fractions
    auc = trapezoid_auc(curves, counts.double() / hw)
    return (auc, curves) if return_curves else auc


def deletion_auc(f, x: torch.Tensor, maps: torch.Tensor, target: Target = None, *,
                 baseline: str | torch.Tensor = "mean", steps: int = 100, max_batch: int = 256,
                 return_curves: bool = False, score: str = "probability", noise: float | None = None,
                 seed: int | None = None):
    """Deletion AUC (Petsiuk et al., RISE, BMVC 2018). **Lower is better.**

    Pixels are removed in order of decreasing attribution, ``s =
    ceil(HW/steps)`` pixels per step (the last step removes what is left),
    and the target class probability ``p_k`` is recorded after each of the
    ``n+1`` steps (``k = 0``: the intact image; ``k = n``: every pixel
    removed). ``AUC = trapz(p_k, r_k)``, the trapezoid rule over the
    actual removed fractions ``r_k = min(k*s, HW) / HW`` (RISE's code
    assumes even spacing, which over-weights a short last step).

    Fill of the removed pixels: ``baseline``: ``"mean"``, ``"black"``,
    ``"blur"``, an image, or ``"nli"``: ROAD's noisy linear imputation
    (:func:`explainer.metrics.road.noisy_linear_impute`, noise std ``noise``,
    default 0.01, seeded by ``seed``, default 0; a fill no explainer trains
    with, one sparse solve per image and step). RISE used black for
    deletion. Target: as given (ground truth or predicted; None = predicted
    top-1).

    Returns:
        AUC (N,), and the curves (N, n+1) when ``return_curves``.
    """
    return _causal(f, x, maps, target, baseline, steps, max_batch, "delete", return_curves, score, noise, seed)


def insertion_auc(f, x: torch.Tensor, maps: torch.Tensor, target: Target = None, *,
                  baseline: str | torch.Tensor = "mean", steps: int = 100, max_batch: int = 256,
                  return_curves: bool = False, score: str = "probability", noise: float | None = None,
                  seed: int | None = None):
    """Insertion AUC (Petsiuk et al., RISE, BMVC 2018). **Higher is better.**

    Starting from the fully removed image, pixels of ``x`` are inserted in
    order of decreasing attribution, ``s = ceil(HW/steps)`` per step; the
    curve and its area are as in :func:`deletion_auc` (``k = 0``: every
    pixel removed; ``k = n``: the intact image).

    Fill: ``baseline`` as in :func:`deletion_auc` (RISE used a blurred
    image for insertion; with ``"nli"`` the pixels not yet inserted are
    imputed from the inserted ones). Target: as given (None = predicted top-1).
    """
    return _causal(f, x, maps, target, baseline, steps, max_batch, "insert", return_curves, score, noise, seed)


def _check_fractions(fractions: Sequence[float]) -> torch.Tensor:
    fr = torch.as_tensor(list(fractions), dtype=torch.float64)
    if fr.numel() < 2 or (fr < 0).any() or (fr > 1).any() or (fr[1:] <= fr[:-1]).any():
        raise ValueError(f"fractions: expected at least 2 increasing fractions in [0, 1], got {list(fractions)}")
    return fr


def _pos_neg(f, x, maps, target, baseline, fractions, score, max_batch, descending, return_curves):
    maps = check_images_maps(x, maps)
    check_max_batch(max_batch)
    fr = _check_fractions(fractions)
    t = resolve_target(f, x, target, max_batch)
    base = baseline_images(f, x, baseline)
    hw = x.shape[-1] * x.shape[-2]
    counts = torch.round(fr * hw).long()
    curves = perturbation_curves(f, x, pixel_ranks(maps, descending=descending), counts, t, base,
                                 mode="delete", score=score, max_batch=max_batch)
    auc = 100 * torch.trapezoid(curves, fr.to(curves), dim=1)
    return (auc, curves) if return_curves else auc


def pos_auc(f, x: torch.Tensor, maps: torch.Tensor, target: Target = None, *,
            baseline: str | torch.Tensor = "mean", fractions: Sequence[float] = POS_NEG_FRACTIONS,
            score: str = "accuracy", max_batch: int = 256, return_curves: bool = False):
    """Positive-perturbation AUC (Chefer et al. 2021; used by LTX, IIA, DIX). **Lower is better.**

    The *most* relevant ``r`` of the pixels are removed (set to the baseline)
    for each fraction ``r`` in ``fractions`` (default 0, 10%, ..., 90%), and
    the score ``a_r`` of the target class recorded: ``score="accuracy"``
    (the papers: 1 while the target is still predicted, arg-max for a
    single-label model, sigmoid > 0.5 for a multi-label one) or
    ``"probability"``. ``AUC = 100 * trapz(a_r, r)`` over the fraction axis
    (not normalised: at most 90 with the default fractions).

    Baseline fill: ``baseline`` (the papers: zero after normalisation, i.e.
    ``"mean"``). Target: as given (None = predicted top-1).
    """
    return _pos_neg(f, x, maps, target, baseline, fractions, score, max_batch, True, return_curves)


def neg_auc(f, x: torch.Tensor, maps: torch.Tensor, target: Target = None, *,
            baseline: str | torch.Tensor = "mean", fractions: Sequence[float] = POS_NEG_FRACTIONS,
            score: str = "accuracy", max_batch: int = 256, return_curves: bool = False):
    """Negative-perturbation AUC (Chefer et al. 2021; used by LTX, IIA, DIX). **Higher is better.**

    As :func:`pos_auc`, but the *least* relevant ``r`` of the pixels are
    removed first: a faithful map keeps the prediction alive longest.
    """
    return _pos_neg(f, x, maps, target, baseline, fractions, score, max_batch, False, return_curves)


@torch.no_grad()
def _masked_scores(f, x, masks, target, base, max_batch, score="probability"):
    """Score of the target on ``apply_mask(x, masks, base)``, (N,), ``max_batch`` images per pass."""
    out = []
    for s in range(0, x.shape[0], max_batch):
        sl = slice(s, s + max_batch)
        out.append(class_scores(f, f(apply_mask(x[sl], masks[sl], base[sl])), target[sl], score).float())
    return torch.cat(out) if out else torch.empty(0, device=x.device)


@torch.no_grad()
def adp_pic(f, x: torch.Tensor, maps: torch.Tensor, target: Target = None, *,
            baseline: str | torch.Tensor = "mean", max_batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Average Drop % and Increase in Confidence (Chattopadhyay et al., Grad-CAM++, WACV 2018).

    With ``Y`` the target probability on ``x`` and ``O`` on
    ``apply_mask(x, minmax(map), baseline)`` (the map, min-max normalised to
    [0, 1], used as a continuous mask; Grad-CAM++ used the product
    ``map * x``, i.e. the black baseline):

    * ADP per image ``100 * max(0, Y - O) / Y``; dataset value the mean.
      **Lower is better.**
    * PIC per image ``100 * [O > Y]``; dataset value the mean. **Higher is better.**

    Target: as given (None = predicted top-1).

    Returns:
        ``(adp, pic)``, each (N,).
    """
    maps = check_images_maps(x, maps)
    check_max_batch(max_batch)
    t = resolve_target(f, x, target, max_batch)
    base = baseline_images(f, x, baseline)
    y = _masked_scores(f, x, torch.ones_like(maps), t, base, max_batch)
    o = _masked_scores(f, x, minmax(maps), t, base, max_batch)
    adp = 100 * (y - o).clamp_min(0) / y.clamp_min(torch.finfo(y.dtype).tiny)
    pic = 100 * (o > y).float()
    return adp, pic


@torch.no_grad()
def masked_probabilities(f, x: torch.Tensor, masks: torch.Tensor, baseline: str | torch.Tensor = "mean",
                         max_batch: int = 256) -> torch.Tensor:
    """``f.probabilities(f(apply_mask(x, masks, baseline)))`` (N, C), ``max_batch`` images per pass."""
    check_max_batch(max_batch)
    base = baseline_images(f, x, baseline)
    out = [f.probabilities(f(apply_mask(x[s:s + max_batch], masks[s:s + max_batch], base[s:s + max_batch]))).float()
           for s in range(0, x.shape[0], max_batch)]
    return torch.cat(out) if out else torch.empty(0, getattr(f, "num_classes", 0), device=x.device)


def _multi_hot(classes, n: int, num_classes: int, device) -> torch.Tensor:
    if isinstance(classes, torch.Tensor) and classes.dim() == 2:
        if classes.shape != (n, num_classes):
            raise ValueError(f"classes: expected a multi-hot tensor ({n}, {num_classes}), got {tuple(classes.shape)}")
        return classes.to(device).bool()
    t = torch.as_tensor(classes, device=device).long().view(-1)
    if t.numel() != n or (t < 0).any() or (t >= num_classes).any():
        raise ValueError(f"classes: expected {n} class indices in [0, {num_classes}) or a multi-hot ({n}, "
                         f"{num_classes}) tensor, got {tuple(t.shape)}")
    return torch.nn.functional.one_hot(t, num_classes).bool()


@torch.no_grad()
def saliency_metric(f, x: torch.Tensor, masks: torch.Tensor, classes, *, baseline: str | torch.Tensor = "mean",
                    min_area: float = 0.05, normalize: bool = True, max_batch: int = 256) -> torch.Tensor:
    """The Explainer paper's saliency metric (after Dabkowski & Gal 2017). **Lower is better.**

    ``s = log(max(a, 0.05)) - log(sum_{c in Y} p_c(x_m))`` where ``x_m =
    apply_mask(x, m, baseline)``, ``a = mean(m)`` the mask's area and ``Y``
    the image's classes. A small mask that keeps the classes' probability
    high scores low.

    Args:
        masks: (N, 1, H, W); min-max normalised to [0, 1] when ``normalize``
            (needed for unbounded attribution maps; pass ``normalize=False``
            for masks already in [0, 1]). For several classes, pass the
            union (pixel-wise max) of their masks.
        classes: ``Y``: multi-hot (N, C), or one class index per image (N,).
        baseline: the fill of the removed region (the paper: the mean).

    Returns:
        (N,) values; probabilities are clamped at 1e-12 before the log.
    """
    masks = check_images_maps(x, masks, "masks")
    check_max_batch(max_batch)
    m = minmax(masks) if normalize else masks.clamp(0, 1)
    y = _multi_hot(classes, x.shape[0], f.num_classes, x.device)
    p = (masked_probabilities(f, x, m, baseline, max_batch) * y).sum(1)
    area = m.flatten(1).mean(1).float()
    return torch.log(area.clamp_min(min_area)) - torch.log(p.clamp_min(1e-12))


@torch.no_grad()
def class_specificity(f, x: torch.Tensor, class_masks: torch.Tensor, classes: Sequence[int] | torch.Tensor, *,
                      baseline: str | torch.Tensor = "mean", normalize: bool = True,
                      max_batch: int = 256) -> torch.Tensor:
    """Class-specificity matrix of one image (the Explainer paper). **Higher diagonal, lower off-diagonal.**

    ``S[c, t] = p_t(apply_mask(x, m_c, baseline))``: the probability of class
    ``t`` when the image is masked by the mask of class ``c``. A class-
    specific explainer gives high values on the diagonal, low elsewhere; the
    summary used by :mod:`explainer.metrics` is ``mean(diag) - mean(offdiag)``
    (higher is better).

    Args:
        x: ONE image (1, 3, H, W) or (3, H, W).
        class_masks: (K, 1, H, W): the masks of the K classes ``classes``
            (min-max normalised when ``normalize``).
        classes: K class indices.

    Returns:
        S (K, K), rows the masking class, columns the scored class.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"x: expected one image (1, 3, H, W), got {tuple(x.shape)}")
    k = class_masks.shape[0] if isinstance(class_masks, torch.Tensor) else 0
    xs = x.expand(k, -1, -1, -1)
    m = check_images_maps(xs, class_masks, "class_masks")
    m = minmax(m) if normalize else m.clamp(0, 1)
    cl = torch.as_tensor(classes, device=x.device).long().view(-1)
    if cl.numel() != k:
        raise ValueError(f"classes: expected {k} class indices (one per mask), got {cl.numel()}")
    return masked_probabilities(f, xs, m, baseline, max_batch)[:, cl]
