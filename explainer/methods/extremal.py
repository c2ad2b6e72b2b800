"""Extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019), after TorchRay's reference implementation.

For each requested area ``a`` find the smooth mask ``m_a`` that maximises the energy

    E(m) = reward(f(perturb(x, m))) - lambda_t * R_a(m),      R_a(m) = mean((sort(m) - r_a)^2),

where ``r_a`` is ``(1 - a) n`` zeros followed by ``a n`` ones (the area as a *ranking* constraint), and
``lambda_t = lambda_0 * growth^t`` grows so that the constraint wins in the end.

* ``perturb``: a blur pyramid of ``num_levels`` levels with sigma from ``max_blur`` down to 0; a mask value
  selects a level and interpolates linearly between the two nearest (m = 1 the image, m = 0 the most
  blurred) -- :class:`Perturbation`. Each interpolation is the project's masking rule
  (:func:`explainer.core.masking.apply_mask`) between two adjacent levels.
* smooth masks: parameters on a coarse grid (``step`` pixels apart) expanded by a smooth-max of flat-top
  Gaussian bumps of width ``sigma`` -- :class:`SmoothMask`.
* variants: ``preserve`` (reward of the image kept by ``m``), ``delete`` (minus the reward of the image
  with ``m`` removed), ``dual`` (the difference of both); rewards: ``simple`` (``y_c``) or ``contrastive``
  (``y_c - max_{c' != c} y_c'``).
* optimisation: SGD lr 0.01, momentum 0.9 (TorchRay also sets dampening 0.9), ``lambda_0 = 300``,
  growth 1.0035, 800 iterations, parameters initialised to 1 and clamped to [0, 1] after each step,
  the perturbed batch flipped horizontally on every other step (jitter); all areas (and all images)
  optimised in one batch.

Cost: ``max_iter`` forward+backward passes per image (x2 for ``dual``), each on ``len(areas)`` images.

Differences to TorchRay, on purpose: masks are generated at the image size (TorchRay adds a margin of
``sigma`` pixels and applies the area constraint to the mask with its margin); step, sigma and the blur
scale with the image size by default (TorchRay's 7 / 21 / 20 are for 224 px); masks come from the final
parameters (TorchRay returns those of the last iteration, one step earlier); the blur pyramid is blurred
with the project's blur (:func:`explainer.core.masking.blur`: the [0, 1] image reflect-padded, a kernel
of +-3 sigma) where TorchRay blurs the normalised image with zero padding (the mean colour leaks in at
the border) and a kernel of +-ceil(4 sigma); ``blur_style="torchray"`` uses TorchRay's.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from explainer.core.images import check_images
from explainer.core.masking import BLUR_STYLES, apply_mask, baseline_image, blur, check_baseline
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

VARIANTS = ("preserve", "delete", "dual")
REWARDS = ("simple", "contrastive")


# --------------------------------------------------------------------------------------------- pieces --
def default_scales(size: Sequence[int]) -> tuple[int, float, float]:
    """``(step, sigma, max_blur)`` scaled from the paper's (7, 21, 20) at 224 px to ``min(H, W)``."""
    s = min(size) / 224.0
    step = max(1, round(7 * s))
    return step, 3.0 * step, 20.0 * s


class Perturbation:
    """The blur pyramid of ``x`` (B, 3, H, W) and its mask-driven interpolation.

    Levels ``y_l = blur(x, max_blur * (1 - l / (L - 1)))``, ``l = 0..L-1`` (``y_{L-1} = x``). For a mask
    value ``m``, with ``w = m (L - 1)``, ``k = min(floor(w), L - 2)`` and ``t = w - k``:
    ``perturb(x, m) = t * y_{k+1} + (1 - t) * y_k`` -- the masking rule with ``y_k`` as the baseline.
    With a named non-blur ``baseline`` ("mean", "black") there is one level pair: ``m x + (1 - m) b``.
    """

    def __init__(self, x: torch.Tensor, baseline: str = "blur", num_levels: int = 8, max_blur: float = 20.0,
                 mean: torch.Tensor | None = None, blur_style: str = "reflect"):
        self.baseline = check_baseline(baseline)
        if baseline == "blur":
            self.num_levels = check_steps(num_levels, "num_levels", 2)
            sigmas = [max_blur * (1 - lv / (num_levels - 1)) for lv in range(num_levels)]
            fill = mean if blur_style == "torchray" else None  # TorchRay pads the normalised image with 0
            self.levels = torch.stack([blur(x, s, blur_style, fill) for s in sigmas], dim=1)  # (B, L, 3, H, W)
        else:
            self.num_levels = 2
            self.levels = torch.stack([baseline_image(x, baseline, mean=mean), x], dim=1)

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        """Perturbed images for masks ``m`` (B, K, H, W) in [0, 1] -> (B, K, 3, H, W)."""
        b, k = m.shape[:2]
        lv = self.levels
        w = m.clamp(0, 1) * (self.num_levels - 1)
        idx = w.detach().floor().clamp(max=self.num_levels - 2).long()
        t = (w - idx).unsqueeze(2)  # (B, K, 1, H, W)
        src = lv[:, None].expand(b, k, *lv.shape[1:])  # (B, K, L, 3, H, W), no copy
        index = idx[:, :, None, None].expand(b, k, 1, 3, *m.shape[-2:])
        y0 = src.gather(2, index).squeeze(2)
        y1 = src.gather(2, index + 1).squeeze(2)
        return apply_mask(y1, t, y0)


class SmoothMask:
    """Smooth masks from coarse parameters: ``m(u) = smax_{i in N(u)} p_i k(|u - c_i| / sigma)``.

    * control point ``c_i`` at the centre of cell ``i`` of a ``ceil(H/step) x ceil(W/step)`` grid,
      ``p_i`` its parameter in [0, 1] (0 for cells outside the grid);
    * ``k(z) = exp(-2 max(z - 1/2, 0)^2)``, a flat-top Gaussian bump;
    * ``N(u)``: the ``(2R+1)^2`` cells within ``R = 1 + ceil(sigma / step)`` cells of the cell holding
      pixel ``u`` (TorchRay's neighbourhood);
    * ``smax_T(v) = sum_i v_i softmax(T v)_i`` with coldness ``T = 20``, a smooth maximum.

    Shapes: parameters (N, 1, gh, gw) -> masks (N, 1, H, W).
    """

    def __init__(self, size: Sequence[int], step: int, sigma: float, coldness: float = 20.0,
                 device: torch.device | str = "cpu"):
        self.size = (int(size[0]), int(size[1]))
        self.step = check_steps(int(step), "step")
        if not sigma > 0:
            raise ValueError(f"sigma: expected a positive width in pixels, got {sigma!r}")
        self.sigma, self.coldness = float(sigma), float(coldness)
        self.grid = (math.ceil(self.size[0] / step), math.ceil(self.size[1] / step))
        self.radius = 1 + math.ceil(sigma / step)
        r, d = self.radius, 2 * self.radius + 1
        hh, ww = self.grid[0] * step, self.grid[1] * step
        y = torch.arange(hh, dtype=torch.float32)
        x = torch.arange(ww, dtype=torch.float32)
        cy = torch.div(y, step, rounding_mode="floor")
        cx = torch.div(x, step, rounding_mode="floor")
        off = torch.arange(-r, r + 1, dtype=torch.float32)
        # distance of pixel (y, x) to the centre of cell (cy + oy, cx + ox)
        dy = y[None, :] - ((cy[None, :] + off[:, None]) * step + (step - 1) / 2)  # (d, hh)
        dx = x[None, :] - ((cx[None, :] + off[:, None]) * step + (step - 1) / 2)  # (d, ww)
        dist = (dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2).sqrt()  # (d, d, hh, ww)
        self.weight = self.kernel(dist / self.sigma).reshape(1, d * d, hh, ww).to(device)

    @staticmethod
    def kernel(z: torch.Tensor) -> torch.Tensor:
        """The flat-top bump ``exp(-2 max(z - 1/2, 0)^2)``."""
        return torch.exp(-2 * (z - 0.5).clamp(min=0) ** 2)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        # (masks, neighbours, H, W) temporaries: a few masks at a time stay in the CPU's cache (3x faster
        # than all at once at 128 px); the result does not depend on the chunk
        per = max(1, self.chunk_elements // self.weight.numel())
        return torch.cat([self._generate(p[i:i + per]) for i in range(0, p.shape[0], per)])

    chunk_elements: int = 2_000_000

    def _generate(self, p: torch.Tensor) -> torch.Tensor:
        n = p.shape[0]
        d, s = 2 * self.radius + 1, self.step
        nb = torch.nn.functional.unfold(p, d, padding=self.radius).view(n, d * d, *self.grid)
        nb = nb.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)  # each pixel sees its cell's neighbours
        v = nb * self.weight
        m = (v * torch.softmax(self.coldness * v, dim=1)).sum(dim=1, keepdim=True)
        return m[:, :, : self.size[0], : self.size[1]]


def area_reference(areas: Sequence[float], n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``r_a`` for every area (K, n): ``int(n (1 - a))`` zeros followed by ones (ascending order)."""
    ref = torch.ones(len(areas), n, device=device)
    for i, a in enumerate(areas):
        ref[i, : int(n * (1 - a))] = 0
    return ref


def ranking_area_loss(m: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``R_a(m) = mean_j (sort(m)_j - r_a,j)^2`` per mask: ``m`` (B, K, H, W), reference (K, H*W) or
    (B, K, H*W) -> (B, K)."""
    srt = m.flatten(2).sort(dim=2).values
    return ((srt - reference) ** 2).mean(dim=2)


def class_reward(logits: torch.Tensor, target: torch.Tensor, kind: str = "simple") -> torch.Tensor:
    """``y_c`` (simple) or ``y_c - max_{c' != c} y_c'`` (contrastive), per row; logits (N, C), target (N,)."""
    yc = logits.gather(1, target.view(-1, 1)).squeeze(1)
    if kind == "simple":
        return yc
    if kind == "contrastive":
        others = logits.scatter(1, target.view(-1, 1), float("-inf"))
        return yc - others.max(dim=1).values
    raise ValueError(f"reward: expected one of {REWARDS}, got {kind!r}")


def variant_reward(f: nn.Module, pert: Perturbation, m: torch.Tensor, target: torch.Tensor, variant: str,
                   reward: str, flip: bool = False) -> torch.Tensor:
    """The variant's reward for masks ``m`` (B, K, H, W) of images whose targets are ``target`` (B,) -> (B, K).

    preserve: ``r(perturb(x, m))``; delete: ``-r(perturb(x, 1 - m))``; dual: the difference of both.
    ``flip``: mirror the perturbed images horizontally before ``f`` (jitter).
    """
    b, k = m.shape[:2]
    parts = {"preserve": [m], "delete": [1 - m], "dual": [m, 1 - m]}[variant]
    xs = torch.cat([pert.apply(p) for p in parts], dim=1).flatten(0, 1)  # (B * K * P, 3, H, W), image-major
    if flip:
        xs = xs.flip(dims=(3,))
    tgt = target.repeat_interleave(k * len(parts))
    r = class_reward(f(xs), tgt, reward).view(b, len(parts), k)
    if variant == "preserve":
        return r[:, 0]
    if variant == "delete":
        return -r[:, 0]
    return r[:, 0] - r[:, 1]


def achieved_area(masks: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Area each mask achieves, (B, K) from masks (B, K, H, W): the mean value (``threshold=None``) or the
    fraction of pixels above ``threshold``. Compare with the requested areas: ``achieved - requested``."""
    if threshold is None:
        return masks.flatten(2).mean(dim=2)
    return (masks.flatten(2) > threshold).float().mean(dim=2)


# ------------------------------------------------------------------------------------------- optimiser --
def _check_choice(value: str, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_objective(variant: str, reward: str, baseline: str | None = None) -> None:
    """ValueError for a ``variant`` not in :data:`VARIANTS`, a ``reward`` not in :data:`REWARDS` or (when
    given) a ``baseline`` that :func:`explainer.core.masking.check_baseline` refuses, in that order."""
    _check_choice(variant, VARIANTS, "variant")
    _check_choice(reward, REWARDS, "reward")
    if baseline is not None:
        check_baseline(baseline)


def ascent_step(opt: torch.optim.Optimizer, f: nn.Module, pert: Perturbation, m: torch.Tensor,
                target: torch.Tensor, ref: torch.Tensor, lam: float, variant: str, reward: str, flip: bool) -> None:
    """One step of ``opt`` up the energy ``reward - lam * R_a(m)`` of masks ``m`` (B, K, H, W), summed over
    the batch (``ref``: :func:`area_reference` of their areas; ``flip``: the jitter of this step)."""
    r = variant_reward(f, pert, m, target, variant, reward, flip=flip)
    energy = r - lam * ranking_area_loss(m, ref)
    opt.zero_grad(set_to_none=True)
    (-energy.sum()).backward()
    opt.step()


REDUCTIONS = ("sum", "first")


def reduce_masks(m: torch.Tensor, reduce: str) -> torch.Tensor:
    """The attribution of K area masks (B, K, H, W): their sum (``"sum"``) or the first area's (``"first"``)."""
    return m.sum(dim=1, keepdim=True) if reduce == "sum" else m[:, :1]


def extremal_perturbation(f: nn.Module, x: torch.Tensor, target: TargetLike = None,
                          areas: float | Sequence[float] = (0.05, 0.1, 0.2, 0.3), *, variant: str = "preserve",
                          reward: str = "simple", max_iter: int = 800, lr: float = 0.01, momentum: float = 0.9,
                          lambda0: float = 300.0, lambda_growth: float = 1.0035, step: int | None = None,
                          sigma: float | None = None, num_levels: int = 8, max_blur: float | None = None,
                          baseline: str = "blur", jitter: bool = True, init: float | torch.Tensor = 1.0,
                          batch_size: int | None = None, progress: bool = False,
                          blur_style: str = "reflect") -> torch.Tensor:
    """Extremal perturbation masks (B, K, H, W), one per image and requested area (see the module docstring).

    Args:
        f: the explanandum; x: images (B, 3, H, W) in [0, 1]; target: int | list | LongTensor (B,) | None.
        areas: K requested areas in (0, 1), optimised jointly in one batch.
        variant: ``"preserve"``, ``"delete"`` or ``"dual"``; reward: ``"simple"`` or ``"contrastive"``.
        max_iter, lr, momentum, lambda0, lambda_growth: the optimisation (paper: 800, 0.01, 0.9, 300, 1.0035).
        step, sigma, max_blur: mask grid step, bump width and largest blur in pixels (default: scaled
            from 7, 21, 20 at 224 px); num_levels: blur pyramid levels (8).
        baseline: ``"blur"`` (the pyramid) or a fill of :mod:`explainer.core.masking` (``"mean"``, ``"black"``).
        jitter: flip the perturbed batch horizontally on every other iteration.
        init: initial parameter value in [0, 1] (TorchRay: 1, the whole image kept), or a warm start
            (B, K, gh, gw) on the coarse grid (``SmoothMask(...).grid``).
        batch_size: images optimised together (default all); progress: a tqdm bar over iterations.
        blur_style: the pyramid's blur, ``"reflect"`` (the project's) or ``"torchray"`` (TorchRay's zero
            padding of the normalised image; see :func:`explainer.core.masking.blur`).
    """
    f = load_explanandum(f)
    check_images(x)
    areas = check_areas(areas)
    check_objective(variant, reward)
    _check_choice(blur_style, BLUR_STYLES, "blur_style")
    max_iter = check_steps(max_iter, "max_iter")
    if not isinstance(init, torch.Tensor) and not 0.0 <= init <= 1.0:
        raise ValueError(f"init: expected a value in [0, 1], got {init!r}")
    x = x.detach()
    t = resolve_targets(f, x, target)
    d_step, d_sigma, d_blur = default_scales(x.shape[-2:])
    gen = SmoothMask(x.shape[-2:], step or d_step, sigma or d_sigma, device=x.device)
    k, n_pix = len(areas), x.shape[-2] * x.shape[-1]
    ref = area_reference(areas, n_pix, x.device)
    out = []
    with no_validation(f), torch.enable_grad():
        for s in chunks(x.shape[0], batch_size or x.shape[0]):
            xb, tb = x[s], t[s]
            b = xb.shape[0]
            pert = Perturbation(xb, baseline, num_levels, d_blur if max_blur is None else max_blur,
                                mean=f.mean.flatten(), blur_style=blur_style)
            if isinstance(init, torch.Tensor):
                if init.shape != (x.shape[0], k, *gen.grid):
                    raise ValueError(f"init: expected a warm start of shape {(x.shape[0], k, *gen.grid)}, "
                                     f"got {tuple(init.shape)}")
                p = init[s].detach().to(x.device, torch.float32).clamp(0, 1).reshape(b * k, 1, *gen.grid)
                p.requires_grad_(True)
            else:
                p = torch.full((b * k, 1, *gen.grid), float(init), device=x.device, requires_grad=True)
            opt = torch.optim.SGD([p], lr=lr, momentum=momentum, dampening=momentum)
            lam = lambda0
            for it in progress_bar(range(max_iter), progress, "extremal perturbation"):
                m = gen(p).view(b, k, *x.shape[-2:])
                ascent_step(opt, f, pert, m, tb, ref, lam, variant, reward, flip=jitter and it % 2 == 0)
                with torch.no_grad():
                    p.clamp_(0, 1)
                lam *= lambda_growth
            with torch.no_grad():
                out.append(gen(p).view(b, k, *x.shape[-2:]))
    return torch.cat(out)


@register("extremal_perturbation")
class ExtremalPerturbation(Method):
    """Extremal perturbations as a :class:`Method` (options: those of :func:`extremal_perturbation`).

    ``attribute`` returns the *sum* of the K area masks (``reduce="sum"``, as TorchRay's benchmark does:
    pixels kept at small areas rank highest), or the first area's mask (``reduce="first"``);
    :meth:`masks` returns all (B, K, H, W). Passes per image: ``max_iter`` forward+backward on K images
    (2K for ``dual``); ``internal_batch_size`` bounds images x areas in one pass.
    """

    def __init__(self, f: nn.Module | str, *, areas: float | Sequence[float] = (0.05, 0.1, 0.2, 0.3),
                 reduce: str = "sum", variant: str = "preserve", reward: str = "simple", max_iter: int = 800,
                 lr: float = 0.01, momentum: float = 0.9, lambda0: float = 300.0, lambda_growth: float = 1.0035,
                 step: int | None = None, sigma: float | None = None, num_levels: int = 8,
                 max_blur: float | None = None, baseline: str = "blur", jitter: bool = True, init: float = 1.0,
                 blur_style: str = "reflect", **common):
        super().__init__(f, **common)
        self.areas = check_areas(areas)
        self.reduce = _check_choice(reduce, REDUCTIONS, "reduce")
        check_objective(variant, reward, baseline)
        _check_choice(blur_style, BLUR_STYLES, "blur_style")
        self.options = dict(variant=variant, reward=reward, max_iter=check_steps(max_iter, "max_iter"), lr=lr,
                            momentum=momentum, lambda0=lambda0, lambda_growth=lambda_growth, step=step,
                            sigma=sigma, num_levels=num_levels, max_blur=max_blur, baseline=baseline,
                            jitter=jitter, init=init, blur_style=blur_style)

    def masks(self, x: torch.Tensor, target: TargetLike = None) -> torch.Tensor:
        """All area masks (B, K, H, W) for ``self.areas``."""
        per = 2 if self.options["variant"] == "dual" else 1
        return extremal_perturbation(self.f, x, target, self.areas, progress=self.progress,
                                     batch_size=max(1, self.internal_batch_size // (len(self.areas) * per)),
                                     **self.options)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        m = self.masks(x, target)
        return reduce_masks(m, self.reduce)
