"""The masking rule, stated once: ``x_m = m * x + (1 - m) * b``.

``b`` is the *baseline* image, a named choice recorded in every checkpoint and
results file because metrics are not comparable across baselines:

* ``"mean"``: the dataset mean colour, i.e. the explanandum's normalisation
  mean (zero after normalisation; the Explainer paper's choice);
* ``"black"``: zeros (the LTX paper's choice);
* ``"blur"``: a Gaussian blur of ``x`` (extremal perturbations' fill).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from explainer.core.constants import IMAGENET_MEAN

BASELINES = ("mean", "black", "blur")


def check_baseline(kind: str) -> str:
    if kind not in BASELINES:
        raise ValueError(f"baseline: expected one of {BASELINES}, got {kind!r}")
    return kind


BLUR_STYLES = ("reflect", "torchray")


def kernel_length(sigma: float, size: Sequence[int]) -> int:
    """Taps of the project's reflect-padded Gaussian: ``2 round(3 sigma) + 1``, shortened (odd, >= 3) when an
    image of ``size`` (H, W) is too small to reflect it."""
    k = int(2 * round(3 * sigma) + 1)
    k = min(k, 2 * (min(size) - 1) - 1) if k >= min(size) * 2 - 1 else k
    return max(3, k | 1)


def blur(x: torch.Tensor, sigma: float, style: str = "reflect",
         fill: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian blur of (B, 3, H, W) with standard deviation ``sigma`` pixels.

    ``style="reflect"`` (the project's): torchvision's ``gaussian_blur`` on the [0, 1] image, reflect
    padding, a kernel of ``2 round(3 sigma) + 1`` taps (shortened when the image is too small for it).
    ``style="torchray"``: TorchRay's ``imsmooth`` as its extremal perturbations use it, on images it receives
    normalised: a separable kernel of ``2 ceil(4 sigma) + 1`` taps and zero padding *in normalised space*,
    i.e. the image padded with the colour ``fill`` (the normalisation mean, given here; None: black) in
    [0, 1] space. The two differ near the border (reflected image vs the mean colour leaking in) and,
    slightly, in the kernel's tails.
    """
    if style not in BLUR_STYLES:
        raise ValueError(f"style: expected one of {BLUR_STYLES}, got {style!r}")
    if sigma <= 0:
        return x
    if style == "torchray":
        return _blur_zero_padded(x, sigma, fill)
    k = kernel_length(sigma, x.shape[-2:])
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


def _blur_zero_padded(x: torch.Tensor, sigma: float, fill: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    width = math.ceil(4 * sigma)
    taps = torch.arange(-width, width + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (taps / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    f = torch.zeros(c, dtype=x.dtype, device=x.device) if fill is None else \
        torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1).expand(c)
    f = f.reshape(1, c, 1, 1)
    y = F.conv2d(x - f, g.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(width, 0), groups=c)
    y = F.conv2d(y, g.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, width), groups=c)
    return y + f


def baseline_image(x: torch.Tensor, kind: str = "mean", mean: Sequence[float] | torch.Tensor | None = None,
                   blur_sigma: float = 10.0) -> torch.Tensor:
    """The baseline image ``b`` for images ``x`` (B, 3, H, W), same shape and dtype."""
    check_baseline(kind)
    if kind == "black":
        return torch.zeros_like(x)
    if kind == "blur":
        return blur(x, blur_sigma)
    m = torch.as_tensor(IMAGENET_MEAN if mean is None else mean, dtype=x.dtype, device=x.device)
    return m.reshape(1, 3, 1, 1).expand_as(x)


def apply_mask(x: torch.Tensor, m: torch.Tensor, baseline: str | torch.Tensor = "mean",
               mean: Sequence[float] | torch.Tensor | None = None, blur_sigma: float = 10.0) -> torch.Tensor:
    """``m * x + (1 - m) * b``: keep the image where ``m`` is 1, the baseline where it is 0.

    Args:
        x: images (B, 3, H, W) in [0, 1].
        m: masks (B, 1, H, W) (or broadcastable) in [0, 1].
        baseline: a name of :data:`BASELINES`, or the baseline image itself.
        mean: the colour for ``"mean"`` (the explanandum's normalisation mean).
    """
    b = baseline if isinstance(baseline, torch.Tensor) else baseline_image(x, baseline, mean, blur_sigma)
    return m * x + (1 - m) * b


SURROUND_SIGMAS = (2.0, 4.0, 8.0, 16.0)


def separable_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """:func:`blur`'s reflect-padded Gaussian (the same kernel length rule) as two 1-D passes: ``2 k`` taps a
    pixel instead of ``k^2``, for the wide kernels of :func:`surround_fill` (equal to :func:`blur` up to
    rounding)."""
    k = kernel_length(sigma, x.shape[-2:])
    r = k // 2
    if r >= min(x.shape[-2:]):  # reflect padding needs the pad smaller than the image
        return blur(x, sigma)
    taps = torch.arange(k, dtype=x.dtype, device=x.device) - r
    g = torch.exp(-0.5 * (taps / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def matrix_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """:func:`separable_blur` as two matrix products ``A_h x A_w^T``, the reflect padding folded into the
    matrices (each row of ``A`` is the 1-D kernel reflected at the borders): the same result up to rounding,
    several times faster on the CPU than a depthwise convolution with a wide kernel."""
    k = kernel_length(sigma, x.shape[-2:])
    if k // 2 >= min(x.shape[-2:]):
        return blur(x, sigma)
    return _blur_matrix(x.shape[-2], k, sigma, x) @ x @ _blur_matrix(x.shape[-1], k, sigma, x).T


def _blur_matrix(n: int, k: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """(n, n): row ``i`` holds the weights of the reflect-padded Gaussian (``k`` taps) at output pixel ``i``, in
    ``like``'s dtype and on its device (built once per size, kernel and sigma: building it was 3 % of a training
    step)."""
    return _blur_matrix64(n, k, float(sigma)).to(dtype=like.dtype, device=like.device)


@functools.lru_cache(maxsize=64)
def _blur_matrix64(n: int, k: int, sigma: float) -> torch.Tensor:
    r = k // 2
    taps = torch.arange(k, dtype=torch.float64) - r
    g = torch.exp(-0.5 * (taps / sigma) ** 2)
    g = g / g.sum()
    eye = torch.eye(n, dtype=torch.float64)[:, None]  # (n inputs, 1, n): a delta at each input pixel
    response = F.conv1d(F.pad(eye, (r, r), mode="reflect"), g.view(1, 1, k))[:, 0]  # (input j, output i)
    return response.T.contiguous()


def surround_fill(x: torch.Tensor, keep: torch.Tensor, sigmas: Sequence[float] = SURROUND_SIGMAS,
                  eps: float = 1e-6) -> torch.Tensor:
    """``keep * x + (1 - keep) * fill``: the removed region filled from its surroundings, differentiably.

    ``fill`` is a multi-scale normalised convolution: with Gaussian blurs ``G_s`` (reflect padding),
    ``fill = (sum_s G_s(keep * x) + mean(keep * x)) / (sum_s G_s(keep) + mean(keep))``, the means over the whole
    image being the coarsest scale (it reaches every pixel, whatever the image size). Near the kept pixels the fine
    scales dominate, deep inside a hole only the coarse ones reach, so a hole takes the colours around it and
    keeps no flat silhouette of its own (the mean fill paints a hole in one colour, so its outline stays visible
    to the classifier).
    A differentiable stand-in for noisy linear imputation; used by the Explainer's inverse-mask terms
    (``inverse_fill="surround"``). ``x`` (B, 3, H, W); ``keep`` (B, 1, H, W) in [0, 1].
    """
    both = torch.cat([x * keep, keep.expand(-1, 1, -1, -1)], 1)
    acc = both.mean((2, 3), keepdim=True)
    for s in sigmas:
        acc = acc + matrix_blur(both, s)  # separable_blur's result as two matrix products: faster on the CPU
    fill = acc[:, :-1] / (acc[:, -1:] + eps)
    return keep * x + (1 - keep) * fill
