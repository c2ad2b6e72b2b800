"""Per-map localisation against object regions: energy inside the object, boundary F, IoU, peaks on other objects.

The helpers take what model selection has at hand: maps ``(N, 1, H, W)``
(any scale; min-max normalised per map before thresholding, as every
thresholded metric of :mod:`explainer.metrics` does), the segmentation
``(N, H, W)`` with class ids (0 background, ``c + 1`` class ``c``, 255 void)
and the class of each map. Each returns one value per map, float64 ``(N,)``,
NaN where the map cannot be scored (its class has no pixel in the
segmentation, or the image has none: all void).

**The class region.** The region of class ``c`` is its pixels plus the void
pixels next to them: void is the band VOC (and the embedded benchmark) draws
along every object outline, and the true edge lies inside it. A void pixel
joins every object it reaches through void within ``void_band`` steps
(8-connected; default 5 px, the width of VOC's band), so the band between two
touching objects belongs to both. Void reached by no object stays unknown and
is left out (neither region nor background).

``energy_pointing``
    share of the min-max normalised (non-negative) map's mass inside the class
    region, over the known pixels (the energy-based pointing game of
    Score-CAM, with the region instead of a bounding box); a constant map has
    no mass and scores 0. Higher is better.
``iou``
    foreground IoU of the map thresholded at ``t`` (``s > t`` on the normalised
    map) against the region, over the known pixels. Higher is better.
``boundary_f1``
    the DAVIS boundary F-measure (Perazzi et al. 2016) of the thresholded map
    against the region: the one-pixel outlines of both (a pixel differing
    from its right, lower or lower-right neighbour), each outline pixel matched
    if the other outline has a pixel within ``tolerance`` pixels (a disc),
    precision and recall of the matches, their harmonic mean; no outline on
    either side gives precision (or recall) 1, as DAVIS does. Higher is better.
``wrong_object``
    1 when the map's peak (arg-max, first in raster order) lies on an object of
    another class (its region, void band included) and outside the class's
    own region, else 0; a peak on background is not wrong. Lower is better.

:func:`choose_threshold` picks one global threshold on a grid (0.05, ...,
0.95) maximising the mean per-map IoU; :func:`iou_grid` gives the per-map IoU
at each grid threshold for accumulating over batches first.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from explainer.metrics._common import Target, _shape_of, check_maps, minmax
from explainer.metrics.localization import VOID_BAND, _check_gt, binarize, class_regions

#: the threshold grid of the validated threshold
VAL_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))
#: default boundary tolerance, pixels (DAVIS's rule gives the same at 128 x 128)
BOUNDARY_TOLERANCE = 2
#: DAVIS's tolerance: this fraction of the image diagonal, rounded up
DAVIS_FRACTION = 0.008


def _prepare(maps: torch.Tensor, gt: torch.Tensor, target: Target, void_band: int):
    maps = check_maps(maps, *_shape_of(maps))
    gt, t = _check_gt(maps, gt, target)
    region, other, known = class_regions(gt, t, void_band)
    valid = (gt == t.view(-1, 1, 1) + 1).flatten(1).any(1)
    return maps, region, other, known, valid


def _nan_where(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    values = values.double()
    return torch.where(valid, values, torch.full_like(values, float("nan")))


def energy_pointing(maps: torch.Tensor, gt: torch.Tensor, target: Target, *,
                    void_band: int = VOID_BAND) -> torch.Tensor:
    """Share of each min-max normalised map's mass inside its class region (known pixels); float64 (N,)."""
    maps, region, _, known, valid = _prepare(maps, gt, target, void_band)
    s = minmax(maps)[:, 0].double()
    inside = (s * region).flatten(1).sum(1)
    total = (s * known).flatten(1).sum(1)
    return _nan_where(torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total)), valid)


def _check_threshold(threshold: float | str) -> float | str:
    if threshold == "mean" or (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                               and math.isfinite(threshold)):
        return threshold
    raise ValueError(f"threshold: expected a number or 'mean', got {threshold!r}")


def iou(maps: torch.Tensor, gt: torch.Tensor, target: Target, threshold: float | str = 0.5, *,
        normalize: str = "minmax", void_band: int = VOID_BAND) -> torch.Tensor:
    """Foreground IoU of each map thresholded at ``threshold`` against its class region; float64 (N,)."""
    maps, region, _, known, valid = _prepare(maps, gt, target, void_band)
    return _nan_where(_iou(binarize(maps, _check_threshold(threshold), normalize), region, known), valid)


def _iou(pred: torch.Tensor, region: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    pred = pred & known
    inter = (pred & region).flatten(1).sum(1).double()
    union = (pred | region).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def iou_grid(maps: torch.Tensor, gt: torch.Tensor, target: Target, grid: Sequence[float] = VAL_GRID, *,
             normalize: str = "minmax", void_band: int = VOID_BAND) -> torch.Tensor:
    """Per-map IoU at every threshold of ``grid``: float64 (N, G), NaN rows for maps that cannot be scored."""
    grid = _check_grid(grid)
    maps, region, _, known, valid = _prepare(maps, gt, target, void_band)
    cols = [_iou(binarize(maps, t, normalize), region, known) for t in grid]
    out = torch.stack(cols, 1) if cols else torch.zeros(maps.shape[0], 0, dtype=torch.float64)
    return torch.where(valid[:, None], out, torch.full_like(out, float("nan")))


def _check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(float(g) for g in grid)
    if not grid or not all(math.isfinite(g) for g in grid):
        raise ValueError(f"grid: expected a non-empty sequence of finite thresholds, got {grid!r}")
    return grid


def best_threshold(ious: torch.Tensor, grid: Sequence[float] = VAL_GRID) -> float:
    """The threshold of ``grid`` with the highest mean (over maps, NaN rows left out) of ``ious`` (N, G) from
    :func:`iou_grid`; the smallest on ties. ValueError when no map could be scored."""
    grid = _check_grid(grid)
    if ious.dim() != 2 or ious.shape[1] != len(grid):
        raise ValueError(f"ious: expected per-map IoUs of shape (N, {len(grid)}), got {tuple(ious.shape)}")
    ious = ious[~torch.isnan(ious).any(1)]
    if not ious.shape[0]:
        raise ValueError("choose_threshold: no map could be scored (no class pixels in the segmentation)")
    return grid[int(ious.double().mean(0).argmax())]


def choose_threshold(maps: torch.Tensor, gt: torch.Tensor, target: Target, grid: Sequence[float] = VAL_GRID, *,
                     normalize: str = "minmax", void_band: int = VOID_BAND) -> float:
    """The validated threshold: the one of ``grid`` maximising the mean per-map IoU of ``maps`` (validation)."""
    return best_threshold(iou_grid(maps, gt, target, grid, normalize=normalize, void_band=void_band), grid)


def boundary_pixels(seg: torch.Tensor) -> torch.Tensor:
    """One-pixel outlines of bool masks (N, H, W): a pixel differing from its right, lower or lower-right
    neighbour (where that neighbour exists), as DAVIS's ``seg2bmap`` at full resolution."""
    b = torch.zeros_like(seg)
    b[:, :, :-1] |= seg[:, :, :-1] ^ seg[:, :, 1:]
    b[:, :-1, :] |= seg[:, :-1, :] ^ seg[:, 1:, :]
    b[:, :-1, :-1] |= seg[:, :-1, :-1] ^ seg[:, 1:, 1:]
    return b


def tolerance_pixels(tolerance: float | str, h: int, w: int) -> float:
    """The boundary tolerance in pixels: a number of pixels, or ``"davis"`` (0.008 x the diagonal, rounded up)."""
    if tolerance == "davis":
        return float(math.ceil(DAVIS_FRACTION * math.hypot(h, w)))
    if isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and 0 <= tolerance < math.inf:
        return float(tolerance)
    raise ValueError(f"tolerance: expected pixels (a number >= 0) or 'davis', got {tolerance!r}")


def _dilate_disc(b: torch.Tensor, radius: float) -> torch.Tensor:
    r = int(math.floor(radius))
    if r < 1:
        return b
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    disc = ((yy ** 2 + xx ** 2) <= radius ** 2).to(device=b.device, dtype=torch.float32)
    return F.conv2d(b[:, None].float(), disc[None, None], padding=r)[:, 0] > 0.5


def boundary_f1(maps: torch.Tensor, gt: torch.Tensor, target: Target, threshold: float | str = 0.5, *,
                tolerance: float | str = BOUNDARY_TOLERANCE, normalize: str = "minmax",
                void_band: int = VOID_BAND) -> torch.Tensor:
    """DAVIS boundary F of each thresholded map against its class region; float64 (N,)."""
    maps, region, _, _, valid = _prepare(maps, gt, target, void_band)
    radius = tolerance_pixels(tolerance, *maps.shape[-2:])
    pred = binarize(maps, _check_threshold(threshold), normalize)
    bp, bg = boundary_pixels(pred), boundary_pixels(region)
    n_p, n_g = bp.flatten(1).sum(1).double(), bg.flatten(1).sum(1).double()
    hit_p = (bp & _dilate_disc(bg, radius)).flatten(1).sum(1).double()
    hit_g = (bg & _dilate_disc(bp, radius)).flatten(1).sum(1).double()
    precision = torch.where(n_p > 0, hit_p / n_p.clamp_min(1), torch.ones_like(n_p))
    recall = torch.where(n_g > 0, hit_g / n_g.clamp_min(1), torch.ones_like(n_g))
    both = precision + recall
    return _nan_where(torch.where(both > 0, 2 * precision * recall / both.clamp_min(1e-300), torch.zeros_like(both)),
                      valid)


def wrong_object(maps: torch.Tensor, gt: torch.Tensor, target: Target, *, void_band: int = VOID_BAND) -> torch.Tensor:
    """1.0 where the map's peak lies on an object of another class (outside the class's region), else 0.0;
    float64 (N,)."""
    maps, _, other, _, valid = _prepare(maps, gt, target, void_band)
    peak = maps.flatten(1).argmax(1)
    return _nan_where(other.flatten(1).gather(1, peak[:, None])[:, 0], valid)


def peak_off_object(maps: torch.Tensor, gt: torch.Tensor, target: Target, *,
                    void_band: int = VOID_BAND) -> torch.Tensor:
    """1.0 where the map's peak (arg-max, first in raster order) lies outside its class's region (on
    background or on another object), else 0.0; float64 (N,)."""
    maps, region, _, _, valid = _prepare(maps, gt, target, void_band)
    peak = maps.flatten(1).argmax(1)
    return _nan_where(1 - region.flatten(1).gather(1, peak[:, None])[:, 0].double(), valid)


def bad_masks(maps: torch.Tensor, gt: torch.Tensor, target: Target, threshold: float, *, min_iou: float = 0.2,
              void_band: int = VOID_BAND) -> torch.Tensor:
    """1.0 for a bad mask: IoU below ``min_iou`` against its class's region at ``threshold``, or its peak off
    the region (what a trust score should find); NaN where the map cannot be scored; float64 (N,)."""
    ious = iou(maps, gt, target, threshold, void_band=void_band)
    off = peak_off_object(maps, gt, target, void_band=void_band)
    bad = ((ious < min_iou) | (off > 0.5)).double()
    return torch.where(torch.isnan(ious), ious, bad)
