"""ROAD: RemOve And Debias (Rong, Leemann et al., ICML 2022), and its noisy linear imputation.

Removal metrics that fill removed pixels with a constant (mean, black) or a
blur leave a shape-shaped hole: the classifier can read the *mask* from the
filled image, so a score may measure how much the mask leaks rather than
how relevant the removed pixels were, and an explainer trained with that
same fill can learn to exploit it. ROAD fills removed pixels by **noisy
linear imputation** (NLI): every removed pixel takes the weighted mean of
its 8 neighbours (weight 1/6 for the 4 edge neighbours, 1/12 for the 4
corner ones), removed neighbours included, so all removed pixels are
solved together as one sparse linear system per image; Gaussian noise is
then added to the removed pixels. No explainer of this project trains with
this fill.

The solve (SuperLU in symmetric mode, :func:`_solve`) costs about 38 ms for
a 128 px image with 90% of its pixels removed on one CPU core (59 ms with
``scipy.sparse.linalg.spsolve``'s defaults); the system matrix has ``9 x``
as many non-zeros as removed pixels. Images are solved in parallel threads.

Conventions (checked against ``pytorch_grad_cam.metrics.road``, a copy of
the authors' code, in ``tests/metrics/test_metrics_road.py``; identical results
with noise 0):

* A percentile ``p`` means that ``round(p/100 * H*W)`` pixels are removed,
  for MoRF and LeRF alike (the ROAD paper's x axis). pytorch-grad-cam's
  ``ROADMostRelevantFirst(percentile=q)`` keeps the pixels below the ``q``-th
  percentile of the map, i.e. removes ``100 - q`` percent, and so does its
  ``ROADLeastRelevantFirst`` on the inverted map; the averages over the
  symmetric default percentiles 10..90 coincide.
* Ties in the map are broken by raster order (the project's
  :func:`~explainer.metrics._common.pixel_ranks`); the authors add 1e-4
  noise to the map, pytorch-grad-cam removes every pixel tied at the
  threshold.
* Imputation happens on the images in [0, 1] (the authors impute before
  normalising, as here); the noise std ``noise`` is in those units. Noisy
  values are clamped to [0, 1] (the explanandum accepts no other input);
  the noise-free imputation never leaves the range of the kept values.
* With every pixel removed the system has no unique solution (every
  constant image solves it); the metrics then use the explanandum's mean
  colour (the ``"mean"`` baseline) plus the noise.
* The score is the target's probability by default (``score``), and the
  per-image ROAD value the mean over the percentiles of the curve.
  pytorch-grad-cam reports the same mean minus the score of the intact
  image; the authors report the accuracy over the dataset.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import splu

from explainer.metrics._common import (
    BASELINES,
    Target,
    baseline_images,
    check_baseline_arg,
    check_images_maps,
    check_max_batch,
    perturbation_curves,
    pixel_ranks,
    resolve_target,
)

# offset (dy, dx) -> weight; the weights of the 8 neighbours sum to 1
NEIGHBOUR_WEIGHTS: dict[tuple[int, int], float] = {
    (-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12,
    (0, -1): 1 / 6, (0, 1): 1 / 6,
    (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12,
}
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ORDERS = ("morf", "lerf")
FILLS = (*BASELINES, "nli")
DEFAULT_NOISE = 0.01


def _check_keep(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected float images of shape (N, C, H, W), got {shape}")
    n, _, h, w = x.shape
    if not isinstance(keep, torch.Tensor) or keep.dim() not in (3, 4) or keep.shape[0] != n \
            or tuple(keep.shape[-2:]) != (h, w) or (keep.dim() == 4 and keep.shape[1] != 1):
        shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep: expected a mask of shape ({n}, 1, {h}, {w}) matching the images, got {shape}")
    if keep.dtype != torch.bool:
        if not bool(((keep == 0) | (keep == 1)).all()):
            raise ValueError("keep: expected a binary mask (bool, or 0/1 values; 1 = pixel kept)")
        keep = keep != 0
    return keep.reshape(n, 1, h, w).to(x.device)


def _system(values: np.ndarray, keep: np.ndarray) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
    """The imputation system of images ``values`` (M, C, H, W) with kept pixels ``keep`` (M, H, W).

    Unknowns are the removed pixels of all M images (block-diagonal: a
    neighbour never crosses images). Row ``u`` (pixel ``i``) reads
    ``s_i x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij v_j``, ``s_i``
    the total weight of ``i``'s neighbours inside the image: ``x_i`` is the
    weighted mean of its neighbours. Returns (A, right-hand sides (U, C),
    flat indices of the unknowns into (M, H, W)).
    """
    m, c, h, w = values.shape
    kflat = keep.reshape(-1)
    unknown = np.flatnonzero(~kflat)
    u = unknown.size
    var = np.full(kflat.size, -1, dtype=np.int64)
    var[unknown] = np.arange(u)
    img, rest = np.divmod(unknown, h * w)
    row, col = np.divmod(rest, w)
    vflat = values.transpose(0, 2, 3, 1).reshape(-1, c)  # (M*H*W, C)
    diag = np.zeros(u)
    rhs = np.zeros((u, c))
    rows, cols, vals = [np.arange(u)], [np.arange(u)], []
    for (dy, dx), weight in NEIGHBOUR_WEIGHTS.items():
        r2, c2 = row + dy, col + dx
        inside = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
        eq = np.flatnonzero(inside)
        nb = img[eq] * (h * w) + r2[eq] * w + c2[eq]
        diag[eq] += weight
        known = kflat[nb]
        # each equation meets each offset at most once: plain fancy-index adds are safe
        rhs[eq[known]] += weight * vflat[nb[known]]
        rows.append(eq[~known])
        cols.append(var[nb[~known]])
        vals.append(np.full(int((~known).sum()), -weight))
    a = sp.csc_matrix((np.concatenate([diag, *vals]), (np.concatenate(rows), np.concatenate(cols))), shape=(u, u))
    return a, rhs, unknown


def _solve(values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The removed pixels of images ``values`` (M, C, H, W): (solution (U, C), their flat indices into (M, H, W)).

    The matrix of :func:`_system` is symmetric (``w_ij = w_ji``) and weakly
    diagonally dominant, strictly in every row next to a kept pixel, so
    SuperLU factorises it in symmetric mode without pivoting, on the minimum
    degree ordering of ``A + A^T``: 1.5x faster than the default ``spsolve``
    at 128 px, equal to 1e-13 (docs/METRICS_ROAD.md).
    """
    a, rhs, unknown = _system(values, keep)
    lu = splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    return lu.solve(rhs), unknown


def linear_impute(x: torch.Tensor, keep: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
    """Noise-free linear imputation: removed pixels become the weighted mean of their 8 neighbours.

    Solves, per image and for all channels at once, the sparse system of
    :func:`_system` (neighbour weights :data:`NEIGHBOUR_WEIGHTS`, rescaled at
    the border to the neighbours inside the image). Kept pixels are
    returned unchanged, bit for bit. Each image is its own system
    (:func:`_solve`), the images solved in as many threads as torch uses
    (at most the CPU count); the work is done in float64 on the CPU.

    Args:
        x: images (N, C, H, W).
        keep: (N, 1, H, W) or (N, H, W), bool or 0/1: True where the pixel is kept.
        empty: images (N, C, H, W) (or broadcastable) returned for an image
            with no kept pixel, whose imputation is undetermined (any
            constant solves it); None raises ValueError for such an image.

    Returns:
        (N, C, H, W), ``x``'s dtype and device.
    """
    keep = _check_keep(x, keep)
    n, c, h, w = x.shape
    out = x.detach().clone(memory_format=torch.contiguous_format)
    kept_any = keep.flatten(1).any(1)
    if not bool(kept_any.all()):
        if empty is None:
            bad = torch.nonzero(~kept_any).flatten().tolist()
            raise ValueError(f"keep: image(s) {bad} keep no pixel, so their imputation is undetermined; pass "
                             "`empty` (e.g. the mean colour) for them")
        out[~kept_any] = torch.as_tensor(empty, dtype=x.dtype, device=x.device).expand_as(x)[~kept_any]
    todo = torch.nonzero(kept_any & ~keep.flatten(1).all(1)).flatten().tolist()
    if not todo:
        return out
    values = x.detach()[todo].double().cpu().numpy()
    kp = keep[todo, 0].cpu().numpy()
    # one system per image, solved in threads (SuperLU and numpy release the GIL)
    workers = min(len(todo), max(1, torch.get_num_threads()), os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            sols = list(pool.map(lambda k: _solve(values[k:k + 1], kp[k:k + 1]), range(len(todo))))
    else:
        sols = [_solve(values[k:k + 1], kp[k:k + 1]) for k in range(len(todo))]
    flat = out.view(n, c, h * w)
    for k, (sol, unknown) in zip(todo, sols):
        flat[k][:, torch.as_tensor(unknown, device=x.device)] = torch.from_numpy(sol.T).to(dtype=x.dtype,
                                                                                           device=x.device)
    return out


def _noisy(x: torch.Tensor, keep: torch.Tensor, filled: torch.Tensor, noise: float,
           z: torch.Tensor | None) -> torch.Tensor:
    """Add ``noise * z`` to the removed pixels of ``filled``, clamp them to [0, 1]; kept pixels stay ``x``'s."""
    if noise > 0 and z is not None:
        filled = (filled + noise * z.to(device=filled.device, dtype=filled.dtype)).clamp(0, 1)
    return torch.where(keep, x, filled)


def check_noise(noise: float) -> float:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0 or noise == float("inf"):
        raise ValueError(f"noise: expected a finite non-negative std (in [0, 1] pixel units), got {noise!r}")
    return float(noise)


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    return seed


def noisy_linear_impute(x: torch.Tensor, keep: torch.Tensor, *, noise: float = DEFAULT_NOISE,
                        generator: torch.Generator | None = None, empty: torch.Tensor | None = None) -> torch.Tensor:
    """ROAD's noisy linear imputation of the removed pixels of images ``x`` in [0, 1].

    :func:`linear_impute`, then ``noise * N(0, 1)`` (drawn on the CPU from
    ``generator``) added to every removed pixel and channel, clamped to
    [0, 1]. Kept pixels are unchanged.

    Args:
        x: images (N, 3, H, W) in [0, 1].
        keep: (N, 1, H, W), bool or 0/1, True where kept.
        noise: the noise std in [0, 1] pixel units (the authors' default 0.01;
            0 gives the plain linear imputation).
        empty: see :func:`linear_impute`.
    """
    noise = check_noise(noise)
    keep = _check_keep(x, keep)
    filled = linear_impute(x, keep, empty)
    z = torch.randn(x.shape, generator=generator, dtype=torch.float64) if noise > 0 else None
    return _noisy(x.detach(), keep, filled, noise, z)


def content_seed(seed: int, image: torch.Tensor, keep: torch.Tensor) -> int:
    """A 64-bit generator seed from ``seed``, the bytes of one image and of its kept-pixel mask."""
    img = np.ascontiguousarray(image.detach().cpu().numpy())
    kp = np.packbits(keep.detach().cpu().numpy().astype(bool))
    words = [seed, zlib.crc32(img.tobytes()), zlib.crc32(kp.tobytes()), img.size]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


class NoisyLinearFill:
    """The fill of :func:`~explainer.metrics._common.perturbation_curves` for noisy linear imputation.

    Called with the pair images of one chunk ``x`` (M, 3, H, W), their
    kept pixels ``keep`` (M, 1, H, W) bool and the pair and step of each row
    (``i``, ``j``: long (M,)). The noise of a row comes from a generator
    seeded by ``seed``, the image and the removed set
    (:func:`content_seed`), so the images do not depend on how the rows are
    chunked (``max_batch``), on the order of the pairs or on how a dataset
    is split into batches.

    Args:
        empty: the image of each pair when every pixel is removed (N, 3, H, W).
    """

    def __init__(self, empty: torch.Tensor, noise: float = DEFAULT_NOISE, seed: int = 0):
        self.empty = empty
        self.noise = check_noise(noise)
        self.seed = check_seed(seed)

    def __call__(self, x: torch.Tensor, keep: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        filled = linear_impute(x, keep, self.empty[i])
        z = None
        if self.noise > 0:
            z = torch.stack([torch.randn(x.shape[1:], dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(content_seed(self.seed, xr, kr)))
                             for xr, kr in zip(x, keep)])
        return _noisy(x, keep, filled, self.noise, z)


def check_fill(fill: str | torch.Tensor, x: torch.Tensor) -> None:
    """ValueError unless ``fill`` is one of :data:`FILLS` or a baseline image of ``x``'s shape."""
    check_baseline_arg(fill, x, FILLS)


def removal_fill(f, x: torch.Tensor, fill: str | torch.Tensor, noise: float | None = None,
                 seed: int | None = None) -> torch.Tensor | NoisyLinearFill:
    """What :func:`~explainer.metrics._common.perturbation_curves` fills removed pixels with.

    ``"mean"``, ``"black"``, ``"blur"`` or an image: the baseline images
    (N, 3, H, W) (one per pair, the same at every step). ``"nli"``: a
    :class:`NoisyLinearFill` (noise std ``noise``, default 0.01, seeded by
    ``seed``, default 0), recomputed for every removed set. ``noise`` and
    ``seed`` apply to ``"nli"`` only: ValueError when given with another fill.
    """
    check_fill(fill, x)
    if isinstance(fill, str) and fill == "nli":
        return NoisyLinearFill(baseline_images(f, x, "mean"), DEFAULT_NOISE if noise is None else noise,
                               0 if seed is None else seed)
    for name, v in (("noise", noise), ("seed", seed)):
        if v is not None:
            shown = fill if isinstance(fill, str) else "an image"
            raise ValueError(f"{name}: only used by the noisy linear imputation (baseline='nli'), got {v!r} "
                             f"with baseline {shown!r}")
    return baseline_images(f, x, fill)


def _check_percentiles(percentiles: Sequence[float]) -> torch.Tensor:
    try:
        p = torch.as_tensor(list(percentiles), dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"percentiles: expected a sequence of numbers in [0, 100], got {percentiles!r}") from err
    if p.dim() != 1 or p.numel() < 1 or not bool(((p >= 0) & (p <= 100)).all()) or bool((p[1:] <= p[:-1]).any()):
        raise ValueError(f"percentiles: expected increasing percentages of removed pixels in [0, 100], "
                         f"got {list(percentiles)}")
    return p


def road(f, x: torch.Tensor, maps: torch.Tensor, target: Target = None, *, order: str = "morf",
         percentiles: Sequence[float] = ROAD_PERCENTILES, noise: float = DEFAULT_NOISE, seed: int = 0,
         score: str = "probability", max_batch: int = 256, return_curves: bool = False):
    """ROAD (Rong et al., ICML 2022): remove pixels by the map, fill them by noisy linear imputation.

    For each percentile ``p`` the ``round(p/100 * H*W)`` pixels ranked
    first are removed and filled by :func:`noisy_linear_impute` (noise std
    ``noise``, seeded by ``seed``, the image and the removed set: see
    :class:`NoisyLinearFill`), and the target's score
    recorded (``score``: ``"probability"``, ``"logit"`` or ``"accuracy"``, as
    in :func:`~explainer.metrics._common.class_scores`).

    * ``order="morf"``: most relevant first (map descending). A faithful map
      destroys the prediction early: **lower is better**.
    * ``order="lerf"``: least relevant first (map ascending). A faithful map
      keeps the prediction: **higher is better**.

    The per-image value is the mean of the curve over the percentiles
    (default 10, 20, ..., 90). Target: as given (None = predicted top-1).
    Cost: one sparse solve per image and percentile (see the module notes),
    plus ``N * len(percentiles)`` forward passes.

    Returns:
        (N,) values, and the curves (N, len(percentiles)) when ``return_curves``.
    """
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    maps = check_images_maps(x, maps)
    check_max_batch(max_batch)
    p = _check_percentiles(percentiles)
    t = resolve_target(f, x, target, max_batch)
    fill = removal_fill(f, x, "nli", noise, seed)
    counts = torch.round(p / 100 * (x.shape[-1] * x.shape[-2])).long()
    curves = perturbation_curves(f, x, pixel_ranks(maps, descending=order == "morf"), counts, t, fill,
                                 mode="delete", score=score, max_batch=max_batch)
    value = curves.mean(1)
    return (value, curves) if return_curves else value


def road_morf(f, x: torch.Tensor, maps: torch.Tensor, target: Target = None, **kwargs):
    """ROAD, most relevant first: :func:`road` with ``order="morf"``. **Lower is better.**"""
    return road(f, x, maps, target, order="morf", **kwargs)


def road_lerf(f, x: torch.Tensor, maps: torch.Tensor, target: Target = None, **kwargs):
    """ROAD, least relevant first: :func:`road` with ``order="lerf"``. **Higher is better.**"""
    return road(f, x, maps, target, order="lerf", **kwargs)
