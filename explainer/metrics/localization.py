"""Localisation metrics: attribution maps against ground-truth segmentation.

Ground truth is the datamodules' mask (N, H, W) long: 0 background, ``c + 1``
for class ``c``, 255 void (VOC's boundary band, or unknown). For the map of
class ``c``, the foreground is ``mask == c + 1``; void pixels are *ignored*
(neither foreground nor background) by every metric here. No perturbation,
so no baseline fill.

A pair (image, class) whose mask holds no pixel of the class (the class is
absent, fully void, or the image has no segmentation) cannot be scored: it
is reported as *not evaluated* (``valid`` False), never counted as a miss.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from explainer.core.constants import VOID
from explainer.metrics._common import Target, _shape_of, check_maps, minmax

FIXED_F1_THRESHOLDS = (0.25, 0.5, 0.75)  # the Explainer paper's discrete F1
FIXED_IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the Explainer paper's IoU
VOID_BAND = 5  # default reach of an object into the void next to it, pixels (the width of VOC's band)


def _check_gt(maps: torch.Tensor, gt: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(gt, torch.Tensor) or gt.dim() != 3 or gt.shape != (maps.shape[0], *maps.shape[-2:]):
        shape = tuple(gt.shape) if isinstance(gt, torch.Tensor) else type(gt).__name__
        raise ValueError(f"gt: expected ground-truth masks of shape {(maps.shape[0], *maps.shape[-2:])} "
                         f"(0 background, c+1 class c, 255 void), got {shape}")
    if gt.is_floating_point():
        raise ValueError(f"gt: expected integer class indices, got dtype {gt.dtype}")
    if target is None:
        raise ValueError("target: localisation metrics need the class of each map (int, list or LongTensor)")
    n = maps.shape[0]
    t = torch.full((n,), target, dtype=torch.long) if isinstance(target, int) else torch.as_tensor(target).long()
    if t.shape != (n,):
        raise ValueError(f"target: expected {n} class indices, got shape {tuple(t.shape)}")
    gt = gt.to(maps.device).long()
    return gt, t.to(maps.device)


def foreground(gt: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fg, known)`` bool (N, H, W): pixels of class ``target`` and the non-void pixels."""
    known = gt != VOID
    fg = (gt == target.view(-1, 1, 1) + 1) & known
    return fg, known


def _grow(seed: torch.Tensor, void: torch.Tensor, steps: int) -> torch.Tensor:
    """``seed`` bool (N, H, W) grown into ``void`` by up to ``steps`` 8-connected steps (through void only)."""
    m = seed
    for _ in range(steps):
        grown = m | ((F.max_pool2d(m[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0) & void)
        if torch.equal(grown, m):
            break
        m = grown
    return m


def class_regions(gt: torch.Tensor, target: torch.Tensor, void_band: int = VOID_BAND
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(region, other, known)`` bool (N, H, W) for ``gt`` (N, H, W) long and ``target`` (N,) long.

    ``region``: the class's pixels and the void pixels they reach through void in at most ``void_band``
    8-connected steps (the void band along an outline belongs to the object; between two objects, to both);
    ``other``: objects of other classes, grown the same way, outside ``region``; ``known``: every pixel but
    the void that no object reaches. ``void_band=0`` is :func:`foreground`'s rule (void ignored).
    """
    if not isinstance(void_band, int) or isinstance(void_band, bool) or void_band < 0:
        raise ValueError(f"void_band: expected an int >= 0 (pixels of void an object reaches), got {void_band!r}")
    void = gt == VOID
    own = gt == target.view(-1, 1, 1) + 1
    region = _grow(own, void, void_band)
    other = _grow((gt > 0) & ~void & ~own, void, void_band) & ~region
    return region, other, ~void | region | other


def pointing_game(maps: torch.Tensor, gt: torch.Tensor, target: Target, *,
                  tolerance: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointing game (Zhang et al. 2016; the TorchRay protocol). **Higher is better.**

    The point is the arg-max of the map (first in raster order on ties); a
    hit if some foreground pixel of the class lies at a distance strictly
    less than ``tolerance`` pixels (15 at VOC/COCO resolution), i.e. the
    disc around the point meets the class mask. Void pixels are not
    foreground. TorchRay's dataset value is the mean over classes of the
    per-class hit rates (see :func:`pointing_accuracy`).

    Args:
        maps: (N, 1, H, W); gt: (N, H, W); target: class per map.

    Returns:
        ``(hit, valid)``: bool (N,) each; ``valid`` is False where the mask
        has no pixel of the class (not evaluated).
    """
    maps = check_maps(maps, *_shape_of(maps))
    gt, t = _check_gt(maps, gt, target)
    fg, _ = foreground(gt, t)
    n, _, h, w = maps.shape
    idx = maps.flatten(1).argmax(1)
    py, px = idx // w, idx % w
    yy = torch.arange(h, device=maps.device).view(1, h, 1)
    xx = torch.arange(w, device=maps.device).view(1, 1, w)
    near = (yy - py.view(-1, 1, 1)) ** 2 + (xx - px.view(-1, 1, 1)) ** 2 < tolerance ** 2
    hit = (near & fg).flatten(1).any(1)
    valid = fg.flatten(1).any(1)
    return hit & valid, valid


def pointing_accuracy(hit: torch.Tensor, valid: torch.Tensor, target: torch.Tensor) -> float:
    """TorchRay's aggregate: mean over classes (with at least one evaluated pair) of hits / (hits + misses)."""
    v = valid.bool()
    if not bool(v.any()):
        return float("nan")
    hit, target = hit[v].float(), torch.as_tensor(target, device=hit.device)[v]
    rates = [hit[target == c].mean() for c in target.unique()]
    return float(torch.stack(rates).mean())


def binarize(maps: torch.Tensor, threshold: str | float = "mean", normalize: str = "minmax") -> torch.Tensor:
    """Threshold maps (N, 1, H, W) -> bool (N, H, W).

    ``normalize="minmax"`` rescales each map to [0, 1] first (LTX/IIA);
    ``"none"`` clamps to [0, 1] (masks that already are). ``threshold="mean"``
    keeps the pixels strictly above the (normalised) map's mean (LTX/IIA,
    after Chefer et al.); a float keeps those strictly above it (the
    Explainer paper's fixed thresholds).
    """
    s = _normalized(maps, normalize)
    if threshold == "mean":
        thr = s.flatten(1).mean(1).view(-1, 1, 1, 1)
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        thr = float(threshold)
    else:
        raise ValueError(f"threshold: expected 'mean' or a number, got {threshold!r}")
    return (s > thr)[:, 0]


def _normalized(maps: torch.Tensor, normalize: str) -> torch.Tensor:
    if normalize == "minmax":
        return minmax(maps)
    if normalize == "none":
        return maps.clamp(0, 1)
    raise ValueError(f"normalize: expected 'minmax' or 'none', got {normalize!r}")


def confusion(pred: torch.Tensor, fg: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Per-map counts over the non-void pixels: long (N, 4) = (tp, fp, tn, fn); void pixels are not counted."""
    pred, fg, known = pred.flatten(1), fg.flatten(1), known.flatten(1)
    tp = (pred & fg & known).sum(1)
    fp = (pred & ~fg & known).sum(1)
    tn = (~pred & ~fg & known).sum(1)
    fn = (~pred & fg & known).sum(1)
    return torch.stack([tp, fp, tn, fn], 1)


def _f1(c: torch.Tensor) -> torch.Tensor:
    tp, fp, _, fn = c.double().unbind(1)
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.ones_like(den))


def _iou(c: torch.Tensor) -> torch.Tensor:
    tp, fp, _, fn = c.double().unbind(1)
    den = tp + fp + fn
    return torch.where(den > 0, tp / den.clamp_min(1), torch.ones_like(den))


def segmentation_stats(maps: torch.Tensor, gt: torch.Tensor, target: Target, *, normalize: str = "minmax",
                       f1_thresholds: Sequence[float] = FIXED_F1_THRESHOLDS,
                       iou_thresholds: Sequence[float] = FIXED_IOU_THRESHOLDS,
                       soft: bool = True, threshold: str | float = "mean",
                       void_band: int = 0) -> dict[str, torch.Tensor]:
    """Per-pair statistics of segmentation agreement (see :func:`segmentation_summary`).

    ``threshold`` (``"mean"``, the LTX/IIA rule, or a number) binarises the
    map for ``tp``...``fn`` and ``f1``; ``void_band`` > 0 counts the void
    next to an object as that object's (:func:`class_regions`), 0 ignores
    void.

    Returns a dict of (N,) tensors:

    * ``valid``: bool, the mask has a non-void pixel of the class (other
      entries are meaningless where False);
    * ``tp``, ``fp``, ``tn``, ``fn``: counts of the map thresholded at its
      mean after min-max normalisation (LTX/IIA), void ignored;
    * ``f1``: F1 of the foreground at that threshold, ``2tp / (2tp+fp+fn)``;
    * ``f1_fixed``: F1 averaged over ``f1_thresholds`` (Explainer paper:
      0.25, 0.5, 0.75);
    * ``iou_fixed``: foreground IoU ``tp / (tp+fp+fn)`` averaged over
      ``iou_thresholds`` (Explainer paper: 0.1, ..., 0.9);
    * ``ap``, ``auroc`` (when ``soft``): pixel average precision and ROC-AUC
      of the soft map against the foreground (torchmetrics), NaN where the
      non-void pixels are all foreground (undefined).
    """
    maps = check_maps(maps, *_shape_of(maps))
    gt, t = _check_gt(maps, gt, target)
    fg, _, known = class_regions(gt, t, void_band)
    valid = (gt == t.view(-1, 1, 1) + 1).flatten(1).any(1)
    out: dict[str, torch.Tensor] = {"valid": valid}
    c = confusion(binarize(maps, threshold, normalize), fg, known)
    out.update(tp=c[:, 0], fp=c[:, 1], tn=c[:, 2], fn=c[:, 3], f1=_f1(c))
    if f1_thresholds:
        out["f1_fixed"] = torch.stack([_f1(confusion(binarize(maps, float(th), normalize), fg, known))
                                       for th in f1_thresholds]).mean(0)
    if iou_thresholds:
        out["iou_fixed"] = torch.stack([_iou(confusion(binarize(maps, float(th), normalize), fg, known))
                                        for th in iou_thresholds]).mean(0)
    if soft:
        ap = torch.full((maps.shape[0],), float("nan"), dtype=torch.float64, device=maps.device)
        auroc = ap.clone()
        s = _normalized(maps, normalize)[:, 0]
        for i in range(maps.shape[0]):
            k = known[i]
            has_bg = bool((k & ~fg[i]).any())
            if not valid[i] or not has_bg:
                continue
            p, y = s[i][k].float(), fg[i][k].long()
            ap[i] = binary_average_precision(p, y, validate_args=False).double()
            auroc[i] = binary_auroc(p, y, validate_args=False).double()
        out["ap"], out["auroc"] = ap, auroc
    return out


def segmentation_summary(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Dataset values from per-pair :func:`segmentation_stats` (evaluated pairs only). **All higher is better.**

    * ``pixel_accuracy = sum(tp+tn) / sum(tp+fp+tn+fn)`` over the dataset (LTX/IIA);
    * ``miou``: mean over {background, foreground} of the dataset IoU,
      ``(sum tp / sum(tp+fp+fn) + sum tn / sum(tn+fn+fp)) / 2`` (LTX/IIA,
      after Chefer et al.);
    * ``f1``, ``f1_fixed``, ``iou_fixed``, ``pixel_ap``, ``pixel_auroc``:
      means over pairs (NaN-valued pairs left out).
    """
    v = stats["valid"].bool()
    if not bool(v.any()):
        return {}
    tp, fp, tn, fn = (stats[k][v].double().sum() for k in ("tp", "fp", "tn", "fn"))
    res = {"pixel_accuracy": float((tp + tn) / (tp + fp + tn + fn)),
           "miou": float((tp / (tp + fp + fn).clamp_min(1) + tn / (tn + fn + fp).clamp_min(1)) / 2),
           "f1": float(stats["f1"][v].double().mean())}
    for key, name in (("f1_fixed", "f1_fixed"), ("iou_fixed", "iou_fixed"), ("ap", "pixel_ap"),
                      ("auroc", "pixel_auroc")):
        if key in stats:
            vals = stats[key][v].double()
            vals = vals[~torch.isnan(vals)]
            if vals.numel():
                res[name] = float(vals.mean())
    return res
