"""explainer.metrics.regions against plain per-pixel loops (breadth-first void growth, DAVIS's outline rule)."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch

from explainer.metrics import regions as R

VOID = 255


# ---- plain re-implementations -----------------------------------------------------------------------------
def slow_grow(seed: np.ndarray, void: np.ndarray, steps: int) -> np.ndarray:
    """Breadth-first: void pixels at most ``steps`` 8-connected steps (through void) from ``seed``."""
    h, w = seed.shape
    dist = np.full((h, w), -1)
    q = deque()
    for y in range(h):
        for x in range(w):
            if seed[y, x]:
                dist[y, x] = 0
                q.append((y, x))
    while q:
        y, x = q.popleft()
        if dist[y, x] >= steps:
            continue
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and void[yy, xx] and dist[yy, xx] < 0:
                    dist[yy, xx] = dist[y, x] + 1
                    q.append((yy, xx))
    return dist >= 0


def slow_regions(gt: np.ndarray, c: int, band: int):
    void = gt == VOID
    region = slow_grow(gt == c + 1, void, band)
    other = slow_grow((gt > 0) & ~void & (gt != c + 1), void, band) & ~region
    return region, other, ~void | region | other


def slow_norm(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    return np.zeros_like(m) if hi == lo else (m - lo) / (hi - lo)


def slow_energy(m, gt, c, band):
    region, _, known = slow_regions(gt, c, band)
    s = slow_norm(m)
    inside = sum(s[y, x] for y in range(m.shape[0]) for x in range(m.shape[1]) if region[y, x])
    total = sum(s[y, x] for y in range(m.shape[0]) for x in range(m.shape[1]) if known[y, x])
    return inside / total if total > 0 else 0.0


def slow_iou(m, gt, c, t, band):
    region, _, known = slow_regions(gt, c, band)
    pred = slow_norm(m) > t
    inter = union = 0
    for y in range(m.shape[0]):
        for x in range(m.shape[1]):
            if known[y, x] or region[y, x]:
                p, g = bool(pred[y, x] and known[y, x]), bool(region[y, x])
                inter += p and g
                union += p or g
    return inter / union if union else 1.0


def slow_outline(seg: np.ndarray) -> np.ndarray:
    h, w = seg.shape
    b = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((0, 1), (1, 0), (1, 1)):
                if y + dy < h and x + dx < w and seg[y, x] != seg[y + dy, x + dx]:
                    b[y, x] = True
    return b


def slow_boundary_f1(m, gt, c, t, tol, band):
    region, _, _ = slow_regions(gt, c, band)
    bp, bg = slow_outline(slow_norm(m) > t), slow_outline(region)
    pts_p, pts_g = list(zip(*np.nonzero(bp))), list(zip(*np.nonzero(bg)))

    def matched(a, b):
        return sum(any((y - v) ** 2 + (x - u) ** 2 <= tol ** 2 for v, u in b) for y, x in a)

    prec = matched(pts_p, pts_g) / len(pts_p) if pts_p else 1.0
    rec = matched(pts_g, pts_p) / len(pts_g) if pts_g else 1.0
    return 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0


def slow_wrong(m, gt, c, band):
    _, other, _ = slow_regions(gt, c, band)
    y, x = divmod(int(np.argmax(m)), m.shape[1])  # first maximum in raster order
    return float(other[y, x])


# ---- data -----------------------------------------------------------------------------------------------
def scene(rng: np.random.Generator, size: int = 20) -> np.ndarray:
    """Two or three rectangles of random classes, void drawn along every outline (as the benchmark does)."""
    gt = np.zeros((size, size), np.int64)
    edge = np.zeros((size, size), bool)
    for _ in range(rng.integers(2, 4)):
        y0, x0 = rng.integers(0, size - 6, 2)
        hh, ww = rng.integers(4, 10, 2)
        obj = np.zeros((size, size), bool)
        obj[y0:y0 + hh, x0:x0 + ww] = True
        gt[obj] = rng.integers(1, 4)
        grown = obj.copy()
        grown[1:] |= obj[:-1]
        grown[:-1] |= obj[1:]
        grown[:, 1:] |= obj[:, :-1]
        grown[:, :-1] |= obj[:, 1:]
        inner = obj.copy()
        inner[1:] &= obj[:-1]
        inner[:-1] &= obj[1:]
        inner[:, 1:] &= obj[:, :-1]
        inner[:, :-1] &= obj[:, 1:]
        edge |= grown & ~obj if rng.random() < 0.5 else grown & ~inner  # outside ring, or both sides
    gt[edge] = VOID
    return gt


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    gts, maps, targets = [], [], []
    for i in range(10):
        gt = scene(rng)
        present = sorted({int(v) - 1 for v in np.unique(gt) if 0 < v < VOID}) or [0]
        targets.append(int(rng.choice(present)) if i != 3 else 3)  # pair 3: a class absent from the mask
        m = rng.random(gt.shape)
        if i == 5:
            m = np.full(gt.shape, 0.7)  # constant map: no mass, no outline
        if i == 6:
            m = (gt == targets[-1] + 1).astype(float)  # the object itself
        others = np.argwhere((gt > 0) & (gt < VOID) & (gt != targets[-1] + 1))
        if i in (8, 9) and len(others):
            m[tuple(others[0])] = 2.0  # the peak on another object
        maps.append(m)
        gts.append(gt)
    gts[7] = np.full_like(gts[7], VOID)  # an image without segmentation
    return (torch.tensor(np.stack(maps))[:, None].float(), torch.tensor(np.stack(gts)),
            torch.tensor(targets), np.stack(maps).astype(np.float32), np.stack(gts), targets)


def _valid(gt, c):
    return bool((gt == c + 1).any())


@pytest.mark.parametrize("band", [0, 1, 5])
def test_energy_iou_wrong_match_plain_loops(batch, band):
    maps, gt, t, m_np, gt_np, t_np = batch
    e = R.energy_pointing(maps, gt, t, void_band=band)
    w = R.wrong_object(maps, gt, t, void_band=band)
    for thr in (0.3, 0.5, "mean"):
        i = R.iou(maps, gt, t, thr, void_band=band)
        for k in range(len(t_np)):
            if not _valid(gt_np[k], t_np[k]):
                assert math.isnan(i[k])
                continue
            tk = float(slow_norm(m_np[k]).mean()) if thr == "mean" else thr
            assert i[k] == pytest.approx(slow_iou(m_np[k], gt_np[k], t_np[k], tk, band), abs=1e-9)
    for k in range(len(t_np)):
        if not _valid(gt_np[k], t_np[k]):
            assert math.isnan(e[k]) and math.isnan(w[k])
            continue
        assert e[k] == pytest.approx(slow_energy(m_np[k], gt_np[k], t_np[k], band), abs=1e-6)
        assert w[k] == slow_wrong(m_np[k], gt_np[k], t_np[k], band)
    assert e[6] == pytest.approx(1.0) and e[5] == 0.0  # the object itself holds all its mass; constant: none


@pytest.mark.parametrize("tol", [0, 1, 2, 2.5, "davis"])
def test_boundary_f1_matches_plain_loop(batch, tol):
    maps, gt, t, m_np, gt_np, t_np = batch
    radius = math.ceil(0.008 * math.hypot(20, 20)) if tol == "davis" else tol
    for thr in (0.5, 0.8):
        f = R.boundary_f1(maps, gt, t, thr, tolerance=tol)
        for k in range(len(t_np)):
            if not _valid(gt_np[k], t_np[k]):
                assert math.isnan(f[k])
                continue
            assert f[k] == pytest.approx(slow_boundary_f1(m_np[k], gt_np[k], t_np[k], thr, radius, R.VOID_BAND),
                                         abs=1e-9), (k, thr)


def test_boundary_f1_axioms():
    gt = torch.zeros(1, 32, 32, dtype=torch.long)
    gt[0, 8:20, 10:24] = 1
    exact = (gt == 1).float()[:, None]
    assert float(R.boundary_f1(exact, gt, 0, 0.5, tolerance=0)) == 1.0
    shifted = torch.roll(exact, 2, dims=-1)
    assert float(R.boundary_f1(shifted, gt, 0, 0.5, tolerance=2)) == 1.0
    assert float(R.boundary_f1(shifted, gt, 0, 0.5, tolerance=1)) < 1.0
    assert R.tolerance_pixels("davis", 128, 128) == 2.0  # DAVIS's rule at the benchmark's size


def test_choose_threshold_maximises_mean_iou(batch):
    maps, gt, t, m_np, gt_np, t_np = batch
    grid = (0.1, 0.3, 0.5, 0.7, 0.9)
    ok = [k for k in range(len(t_np)) if _valid(gt_np[k], t_np[k])]
    means = [np.mean([slow_iou(m_np[k], gt_np[k], t_np[k], g, R.VOID_BAND) for k in ok]) for g in grid]
    assert R.choose_threshold(maps, gt, t, grid) == grid[int(np.argmax(means))]
    # the class region lifted and scaled: any threshold of the grid recovers it exactly
    region = R.class_regions(gt[6:7], t[6:7])[0].float()[:, None]
    m = region * 0.5 + 0.4
    assert float(R.iou(m, gt[6:7], t[6:7], R.choose_threshold(m, gt[6:7], t[6:7]))[0]) == 1.0


def test_void_band_joins_the_object():
    # a 6x6 object whose outline ring is void: with the band the region is the object and its ring
    gt = torch.zeros(1, 16, 16, dtype=torch.long)
    gt[0, 4:12, 4:12] = VOID
    gt[0, 5:11, 5:11] = 2
    region, other, known = R.class_regions(gt, torch.tensor([1]), 1)
    assert int(region.sum()) == 64 and not other.any() and bool(known.all())
    region0, _, known0 = R.class_regions(gt, torch.tensor([1]), 0)
    assert int(region0.sum()) == 36 and int((~known0).sum()) == 28


def test_bad_input_is_named():
    gt = torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="gt: expected"):
        R.iou(torch.rand(2, 1, 8, 8), gt[:1], [0, 0])
    with pytest.raises(ValueError, match="threshold"):
        R.iou(torch.rand(2, 1, 8, 8), gt, [0, 0], "median")
    with pytest.raises(ValueError, match="tolerance"):
        R.boundary_f1(torch.rand(2, 1, 8, 8), gt, [0, 0], tolerance=-1)
    with pytest.raises(ValueError, match="void_band"):
        R.energy_pointing(torch.rand(2, 1, 8, 8), gt, [0, 0], void_band=-2)
    with pytest.raises(ValueError, match="no map could be scored"):
        R.choose_threshold(torch.rand(2, 1, 8, 8), gt, [0, 0])
