"""Black-box perturbation baselines: RISE (written here, Captum has none) and Occlusion (Captum).

Both fill removed pixels with a baseline image through :func:`explainer.core.masking.apply_mask`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from explainer.core.masking import apply_mask, baseline_image, check_baseline
from explainer.methods.base import Method, check_steps, chunks, no_validation, progress_bar, register


def rise_masks(n: int, size: tuple[int, int], grid: int = 7, p: float = 0.5, seed: int = 0,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """RISE's random smooth masks (Petsiuk et al., BMVC 2018), (n, 1, H, W) in [0, 1].

    A binary ``grid x grid`` map with cells on with probability ``p`` is upsampled bilinearly to
    ``(grid + 1) * cell`` pixels (``cell = ceil(H / grid)``) and cropped at a random shift in
    ``[0, cell)``. Deterministic given ``seed`` (a CPU generator, whatever the device).
    """
    h, w = size
    ch, cw = math.ceil(h / grid), math.ceil(w / grid)
    gen = torch.Generator().manual_seed(seed)
    cells = (torch.rand(n, 1, grid, grid, generator=gen) < p).float()
    shifts_y = torch.randint(0, ch, (n,), generator=gen)
    shifts_x = torch.randint(0, cw, (n,), generator=gen)
    up = F.interpolate(cells, size=((grid + 1) * ch, (grid + 1) * cw), mode="bilinear", align_corners=False)
    masks = torch.stack([up[i, :, int(dy):int(dy) + h, int(dx):int(dx) + w]
                         for i, (dy, dx) in enumerate(zip(shifts_y, shifts_x))])
    return masks.to(device)


@register("rise")
class RISE(Method):
    """RISE (Petsiuk et al., BMVC 2018): ``S_c = 1 / (N p) * sum_i P_c(x masked by M_i) M_i``.

    ``P_c`` is the class probability (softmax, or sigmoid for a multi-label explanandum), ``M_i`` the
    masks of :func:`rise_masks` (the same set for every image, fixed by ``seed``), masking by
    ``M x + (1 - M) b``. Passes per image: ``n_masks`` forwards, batched ``internal_batch_size`` at a time
    across masks and images.

    Args:
        n_masks: N (the paper: 4000 for ResNet-50, 8000 for VGG16).
        grid: s, cells per side of the coarse mask (7).
        p: probability that a cell is kept (0.5).
        baseline: fill of masked pixels, ``"mean"`` (default: the official code masks normalised
            images, i.e. fills with the mean colour), ``"black"`` or ``"blur"``.
    """

    def __init__(self, f: nn.Module | str, *, n_masks: int = 4000, grid: int = 7, p: float = 0.5,
                 baseline: str = "mean", **common):
        super().__init__(f, **common)
        self.n_masks = check_steps(n_masks, "n_masks")
        self.grid = check_steps(grid, "grid")
        if not 0.0 < float(p) < 1.0:
            raise ValueError(f"p: expected a probability strictly inside (0, 1), got {p!r}")
        self.p = float(p)
        self.baseline = check_baseline(baseline)

    def masks(self, size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
        """The masks this method uses at image size ``size`` (n_masks, 1, H, W)."""
        return rise_masks(self.n_masks, size, self.grid, self.p, self.seed, device)

    @torch.no_grad()
    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        masks = self.masks(tuple(x.shape[-2:]), x.device)
        fill = baseline_image(x, self.baseline, mean=self.f.mean.flatten())
        sal = torch.zeros(b, 1, *x.shape[-2:], device=x.device, dtype=x.dtype)
        per_pass = max(1, self.internal_batch_size // b)
        with no_validation(self.f):
            for s in progress_bar(chunks(self.n_masks, per_pass), self.progress, "rise",
                                  math.ceil(self.n_masks / per_pass)):
                m = masks[s]  # (n, 1, H, W)
                n = m.shape[0]
                xm = apply_mask(x[:, None], m[None], fill[:, None]).flatten(0, 1)  # (B*n, 3, H, W), image-major
                probs = self.f.probabilities(self.f(xm)).view(b, n, -1)
                pc = probs.gather(2, target.view(b, 1, 1).expand(b, n, 1)).squeeze(2)  # (B, n)
                sal += torch.einsum("bn,nhw->bhw", pc, m[:, 0]).unsqueeze(1)
        return sal / (self.n_masks * self.p)


@register("occlusion")
class Occlusion(Method):
    """Occlusion (Zeiler & Fergus, 2014) via Captum: slide a ``window x window`` patch of the baseline
    over the image with ``stride``; a pixel's value is the mean drop ``y_c(x) - y_c(x occluded)`` over the
    windows covering it (equal on the three channels, so the channel mean is taken).

    Passes per image: about ``(H / stride) * (W / stride)`` forwards, ``internal_batch_size`` at a time.

    Args:
        window: patch side in pixels (default ``max(2, min(H, W) // 8)``).
        stride: step in pixels (default ``max(1, window // 2)``).
        baseline: fill of the patch, ``"mean"`` (default), ``"black"`` or ``"blur"``.
    """

    def __init__(self, f: nn.Module | str, *, window: int | None = None, stride: int | None = None,
                 baseline: str = "mean", **common):
        super().__init__(f, **common)
        self.window = None if window is None else check_steps(window, "window")
        self.stride = None if stride is None else check_steps(stride, "stride")
        self.baseline = check_baseline(baseline)

    def sizes(self, h: int, w: int) -> tuple[int, int]:
        """(window, stride) used at image size (h, w)."""
        win = self.window or max(2, min(h, w) // 8)
        return win, self.stride or max(1, win // 2)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from captum.attr import Occlusion as _Occlusion

        win, stride = self.sizes(*x.shape[-2:])
        if win > min(x.shape[-2:]):
            raise ValueError(f"window: {win} pixels exceeds the image size {tuple(x.shape[-2:])}")
        fill = baseline_image(x, self.baseline, mean=self.f.mean.flatten())
        with no_validation(self.f):
            attr = _Occlusion(self.f).attribute(x, sliding_window_shapes=(3, win, win), strides=(3, stride, stride),
                                                baselines=fill, target=target,
                                                perturbations_per_eval=max(1, self.internal_batch_size // x.shape[0]))
        return attr.mean(dim=1, keepdim=True)
