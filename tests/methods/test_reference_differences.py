"""Methods against their references' details.

* a misspelt method option names the method (``methods.get``);
* DIX ``variant="official"`` combines its maps on the released code's 1024 x 28 x 28 grid;
* the TorchRay-style blur of extremal perturbations equals a plain zero-padded Gaussian (scipy).

Split from tests/test_issue14.py (issue 14, "nothing lost, nothing silently wrong"): each test failed on the
code before the refactor 3569dd4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import explainer.methods as M
from explainer.core.masking import blur
from explainer.methods.dix import dix_cnn_maps
from explainer.methods.extremal import Perturbation


# --------------------------------------------------------------------------- 5. misspelt method option --
def test_misspelt_option_names_the_method(tiny_cnn):
    with pytest.raises(TypeError) as info:
        M.get("gradcam", tiny_cnn, layre="x")
    assert "gradcam" in str(info.value) and "layre" in str(info.value)


# ------------------------------------------------------------------------------ 7. reference differences --
def resize_linear_1d(v: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Linear resize of one axis to ``n`` samples, half-pixel centres, edges clamped (align_corners=False)."""
    m = v.shape[dim]
    pos = ((torch.arange(n, dtype=torch.float64) + 0.5) * m / n - 0.5).clamp(min=0)
    lo = pos.floor().long().clamp(max=m - 1)
    hi = (lo + 1).clamp(max=m - 1)
    w = (pos - lo).to(v.dtype)
    shape = [1] * v.dim()
    shape[dim] = n
    return v.index_select(dim, lo) * (1 - w.view(shape)) + v.index_select(dim, hi) * w.view(shape)


def plain_combine(h1: torch.Tensor, h2: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(C, h, w) maps -> sum over channels of H2 H1 + H1 on ``grid``, resizing one axis at a time."""
    def resize(h):
        for dim, n in enumerate(grid):
            h = resize_linear_1d(h, dim, n)
        return h

    a, b = resize(h1), resize(h2)
    return (b * a + a).sum(0)


def test_dix_official_combines_on_the_released_grid(tiny_cnn, images):
    f = tiny_cnn
    got = M.get("dix", f, variant="official", steps=3, normalize=False).attribute(images, 1)
    for i in range(images.shape[0]):
        h1, h2 = dix_cnn_maps(f, f.model.layer4, f.model.layer3, images[i:i + 1], torch.tensor([1]), 3, "official")
        want = plain_combine(h1[0], h2[0], (1024, 28, 28))
        assert torch.allclose(F.interpolate(want[None, None], size=images.shape[-2:], mode="bicubic",
                                            align_corners=False)[0], got[i], atol=1e-6, rtol=1e-4)
        own = plain_combine(h1[0], h2[0], (h2.shape[1], 2 * h2.shape[2], 2 * h2.shape[3]))
        # on this tiny network the released grid is not the block's own: the test can tell them apart
        own_up = F.interpolate(own[None, None], size=(28, 28), mode="bilinear", align_corners=False)[0, 0]
        assert not torch.allclose(own_up / own_up.abs().max(), want / want.abs().max(), atol=1e-3)


@pytest.mark.parametrize("sigma", [0.75, 1.5, 2.25])
def test_torchray_blur_is_a_zero_padded_gaussian_in_normalised_space(sigma):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 11, 14, generator=g, dtype=torch.float64)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    got = (blur(x, sigma, "torchray", fill=mean.flatten()) - mean) / std
    # scipy's kernel reaches int(4 sigma + 0.5) taps, TorchRay's ceil(4 sigma): the same for these sigmas
    assert math.ceil(4 * sigma) == int(4 * sigma + 0.5)
    want = ndimage.gaussian_filter(((x - mean) / std).numpy(), sigma=(0, 0, sigma, sigma), mode="constant",
                                   cval=0.0, truncate=4.0)
    assert np.allclose(got.numpy(), want, atol=1e-10)
    # the project's blur reflects the image at the border instead
    assert (blur(x, sigma) - blur(x, sigma, "torchray", fill=mean.flatten())).abs().max() > 1e-3
    with pytest.raises(ValueError, match="style"):
        blur(x, sigma, "zeros")


def test_extremal_blur_style_reaches_the_pyramid(tiny_cnn):
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    mean = tiny_cnn.mean.flatten()
    pert = Perturbation(x, "blur", num_levels=3, max_blur=1.5, mean=mean, blur_style="torchray")
    for level, sigma in enumerate([1.5, 0.75]):
        want = ndimage.gaussian_filter((x - mean.view(1, 3, 1, 1)).double().numpy(), (0, 0, sigma, sigma),
                                       mode="constant", cval=0.0, truncate=4.0) + mean.view(1, 3, 1, 1).numpy()
        assert np.allclose(pert.levels[:, level].numpy(), want, atol=1e-5)
    assert torch.equal(pert.levels[:, 2], x)
    with pytest.raises(ValueError, match="blur_style"):
        M.get("extremal_perturbation", tiny_cnn, blur_style="zero")
