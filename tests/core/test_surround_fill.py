"""``surround_fill``: the removed region filled from its surroundings, checked against a plain scipy
re-implementation of the multi-scale normalised convolution, and by the properties it promises."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from explainer.core.masking import SURROUND_SIGMAS, surround_fill


def plain_surround_fill(x: np.ndarray, keep: np.ndarray, sigmas=SURROUND_SIGMAS, eps=1e-6) -> np.ndarray:
    """One image (3, H, W), keep (H, W): (sum_s G_s(keep x) + mean(keep x)) / (sum_s G_s(keep) + mean(keep)), per
    channel, with scipy's filter (mode "mirror" is torch's reflect padding; the kernel truncated at round(3 sigma)
    taps as in the project)."""
    num = (keep * x).mean((1, 2), keepdims=True) + np.zeros_like(x)
    den = keep.mean() + np.zeros_like(keep)
    for s in sigmas:
        trunc = round(3 * s) / s
        den += ndimage.gaussian_filter(keep, s, mode="mirror", truncate=trunc)
        for c in range(3):
            num[c] += ndimage.gaussian_filter(keep * x[c], s, mode="mirror", truncate=trunc)
    fill = num / (den + eps)
    return keep * x + (1 - keep) * fill


def test_matches_plain_normalised_convolution():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64)
    keep = (torch.rand(2, 1, 64, 64, generator=g, dtype=torch.float64) > 0.3).double()
    keep[1, :, 20:44, 16:40] = 0  # a large hole
    out = surround_fill(x, keep)
    for i in range(2):
        ref = plain_surround_fill(x[i].numpy(), keep[i, 0].numpy())
        np.testing.assert_allclose(out[i].numpy(), ref, atol=1e-6)


def test_keeps_kept_pixels_and_fills_a_hole_with_its_surrounding_colour():
    x = torch.zeros(1, 3, 48, 48)
    x[:, 0] = 0.8  # red everywhere ...
    x[:, :, 16:32, 16:32] = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)  # ... but a blue square
    keep = torch.ones(1, 1, 48, 48)
    keep[:, :, 16:32, 16:32] = 0
    out = surround_fill(x, keep)
    assert torch.equal(out[..., keep[0, 0] > 0], x[..., keep[0, 0] > 0])
    hole = out[0, :, 16:32, 16:32]
    # the hole takes the surrounding red, no blue and no flat silhouette colour of its own
    assert torch.allclose(hole, torch.tensor([0.8, 0.0, 0.0]).view(3, 1, 1).expand_as(hole), atol=1e-4)


def test_differentiable_in_mask_and_image():
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    keep = torch.rand(1, 1, 32, 32, requires_grad=True)
    surround_fill(x, keep).sum().backward()
    assert x.grad is not None and keep.grad is not None
    assert keep.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 3, 5, 9)])
def test_small_images(shape):
    """Images smaller than the widest kernel still work (the kernel is shortened) and stay finite."""
    x = torch.rand(*shape)
    keep = torch.zeros(shape[0], 1, *shape[2:])
    keep[..., 0, 0] = 1
    out = surround_fill(x, keep)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(out[:, :, 1:, 1:], x[:, :, :1, :1].expand_as(out[:, :, 1:, 1:]), atol=1e-4)


@pytest.mark.parametrize("sigma,size", [(2.0, 32), (16.0, 128), (10.0, 20)])
def test_separable_blur_equals_blur(sigma, size):
    from explainer.core.masking import blur, separable_blur
    x = torch.rand(2, 4, size, size + 3, dtype=torch.float64)
    assert torch.allclose(separable_blur(x, sigma), blur(x, sigma), atol=1e-10)
