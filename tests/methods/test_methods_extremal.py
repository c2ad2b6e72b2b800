"""Extremal perturbations and their INR reconstruction: pieces and the batched optimiser against slow plain
versions, achieved against requested area, one network per image, non-overlapping multiple masks."""

from __future__ import annotations

import math

import pytest
import torch

import explainer.methods as M
from explainer.core.masking import apply_mask, blur
from explainer.methods.extremal import (
    Perturbation,
    SmoothMask,
    achieved_area,
    class_reward,
    extremal_perturbation,
)
from explainer.methods.inr_extremal import fit_inr_masks, multiple_masks
from explainer.nets.inr import AreaConditionedINR, pixel_coordinates

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- slow, plain versions --
def slow_levels(x, num_levels, max_blur):
    return [blur(x, max_blur * (1 - lv / (num_levels - 1))) for lv in range(num_levels)]


def slow_perturb(levels, m):
    """Per level: pixels whose ``m (L-1)`` falls in [l, l+1) interpolate levels l and l+1 (m = 1: the image)."""
    n = len(levels)
    w = m * (n - 1)
    out = torch.zeros_like(levels[0])
    for lv in range(n - 1):
        sel = ((w >= lv) & (w < lv + 1)) | ((lv == n - 2) & (w >= n - 1))
        t = w - lv
        out = out + sel * ((1 - t) * levels[lv] + t * levels[lv + 1])
    return out


def slow_mask_tables(size, step, sigma):
    """For every pixel, the flat indices of its (2R+1)^2 neighbouring control points (-1 outside the grid)
    and their bump weights, by plain loops over pixels and neighbours."""
    h, w = size
    gh, gw = math.ceil(h / step), math.ceil(w / step)
    r = 1 + math.ceil(sigma / step)
    idx, wt = [], []
    for y in range(h):
        for x in range(w):
            ci, cj = y // step, x // step
            row_i, row_w = [], []
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    i, j = ci + di, cj + dj
                    cy, cx = i * step + (step - 1) / 2, j * step + (step - 1) / 2
                    z = math.hypot(y - cy, x - cx) / sigma
                    row_w.append(math.exp(-2 * max(z - 0.5, 0.0) ** 2))
                    row_i.append(i * gw + j if 0 <= i < gh and 0 <= j < gw else -1)
            idx.append(row_i)
            wt.append(row_w)
    return torch.tensor(idx), torch.tensor(wt), (gh, gw)


def slow_mask(p, tables, size):
    idx, wt, _ = tables
    flat = torch.cat([p.flatten(), torch.zeros(1)])  # index -1 -> the appended zero
    v = flat[idx] * wt
    return (v * torch.softmax(20 * v, dim=1)).sum(dim=1).view(*size)


def slow_ep(f, x, target, area, variant, reward, iters, step, sigma, max_blur, init):
    """One image, one area, its own optimiser: the extremal-perturbation loop written out."""
    size = x.shape[-2:]
    tables = slow_mask_tables(size, step, sigma)
    levels = slow_levels(x, 8, max_blur)
    p = init.clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=0.01, momentum=0.9, dampening=0.9)
    n = size[0] * size[1]
    ref = torch.cat([torch.zeros(int(n * (1 - area))), torch.ones(n - int(n * (1 - area)))])
    lam = 300.0

    def r(img, flip):
        logits = f(img.flip(dims=(3,)) if flip else img)
        if reward == "simple":
            return logits[0, target]
        others = [logits[0, c] for c in range(logits.shape[1]) if c != target]
        return logits[0, target] - torch.stack(others).max()

    for it in range(iters):
        m = slow_mask(p, tables, size)
        flip = it % 2 == 0
        keep, drop = slow_perturb(levels, m), slow_perturb(levels, 1 - m)
        if variant == "preserve":
            score = r(keep, flip)
        elif variant == "delete":
            score = -r(drop, flip)
        else:
            score = r(keep, flip) - r(drop, flip)
        energy = score - lam * ((m.flatten().sort().values - ref) ** 2).mean()
        opt.zero_grad()
        (-energy).backward()
        opt.step()
        with torch.no_grad():
            p.clamp_(0, 1)
        lam *= 1.0035
    with torch.no_grad():
        return slow_mask(p, tables, size)


# ------------------------------------------------------------------------------------------------ tests --
def test_perturbation_pyramid_matches_plain_interpolation(images):
    pert = Perturbation(images, "blur", num_levels=5, max_blur=3.0)
    levels = slow_levels(images, 5, 3.0)
    m = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    m[:, 0, :4] = 1.0
    m[:, 0, 4:8] = 0.0
    out = pert.apply(m)
    for k in range(3):
        assert torch.allclose(out[:, k], slow_perturb(levels, m[:, k:k + 1]), atol=1e-6)
    assert torch.allclose(out[:, 0, :, :4], images[:, :, :4])  # m = 1 keeps the image
    assert torch.allclose(out[:, 0, :, 4:8], levels[0][:, :, 4:8])  # m = 0 is the most blurred level
    two = Perturbation(images, "blur", num_levels=2, max_blur=3.0).apply(m)
    assert torch.allclose(two[:, 1], apply_mask(images, m[:, 1:2], "blur", blur_sigma=3.0), atol=1e-6)


def test_smooth_mask_matches_plain_loops():
    size, step, sigma = (10, 14), 3, 4.0
    gen = SmoothMask(size, step, sigma)
    tables = slow_mask_tables(size, step, sigma)
    assert gen.grid == tables[2] == (4, 5)
    p = torch.rand(3, 1, *gen.grid, generator=torch.Generator().manual_seed(2))
    fast = gen(p)
    assert fast.shape == (3, 1, 10, 14) and 0 <= fast.min() and fast.max() <= 1
    for i in range(3):
        assert torch.allclose(fast[i, 0], slow_mask(p[i], tables, size), atol=1e-6)
    gen.chunk_elements = 1  # one mask at a time: the same masks
    assert torch.equal(gen(p), fast)


def test_contrastive_reward():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    t = torch.tensor([1, 2])
    assert torch.allclose(class_reward(logits, t, "simple"), torch.tensor([3.0, 0.0]))
    assert torch.allclose(class_reward(logits, t, "contrastive"), torch.tensor([1.0, -0.5]))


@pytest.mark.parametrize("variant, reward", [("preserve", "simple"), ("dual", "contrastive")])
def test_extremal_perturbation_batched_equals_slow_plain_loop(tiny_cnn, images, variant, reward):
    areas, iters, step, sigma, max_blur = (0.1, 0.3), 8, 2, 4.0, 3.0
    # a random warm start: from the default uniform start the sorted mask has ties, and which tied pixel
    # the ranking constraint pushes up then depends on rounding in the last bit
    init = 0.5 + 0.5 * torch.rand(2, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    fast = extremal_perturbation(tiny_cnn, images, [1, 2], areas, variant=variant, reward=reward, max_iter=iters,
                                 step=step, sigma=sigma, max_blur=max_blur, init=init)
    assert fast.shape == (2, 2, 32, 32)
    for b, t in ((0, 1), (1, 2)):
        for k, a in enumerate(areas):
            slow = slow_ep(tiny_cnn, images[b:b + 1], t, a, variant, reward, iters, step, sigma, max_blur,
                           init[b, k])
            assert torch.allclose(fast[b, k], slow, atol=1e-5), (b, k)
    assert not torch.allclose(fast[:, 0], fast[:, 1])


def test_extremal_perturbation_reaches_the_requested_area(tiny_cnn, images):
    areas = (0.1, 0.3)
    m = extremal_perturbation(tiny_cnn, images[:1], 0, areas, max_iter=150, lambda_growth=1.02)
    got = achieved_area(m, threshold=0.5)[0]
    assert torch.allclose(got, torch.tensor(areas), atol=0.04), got
    assert achieved_area(m)[0, 0] < achieved_area(m)[0, 1]


def test_extremal_method_reduces_areas(tiny_cnn, images):
    opts = dict(areas=(0.2, 0.4), max_iter=4, step=2, sigma=4.0)
    method = M.get("extremal_perturbation", tiny_cnn, **opts)
    masks = method.masks(images, 0)
    assert torch.allclose(method.attribute(images, 0), masks.sum(1, keepdim=True))
    first = M.get("extremal_perturbation", tiny_cnn, reduce="first", **opts).attribute(images, 0)
    assert torch.allclose(first, masks[:, :1])
    one_per_pass = M.get("extremal_perturbation", tiny_cnn, internal_batch_size=2, **opts).masks(images, 0)
    assert torch.allclose(one_per_pass, masks, atol=1e-6)


# ------------------------------------------------------------------------------------------------- INR --
def test_inr_groups_are_independent_networks():
    net = AreaConditionedINR(groups=2, width=16, layers=2, seed=5)
    with torch.no_grad():
        for p in net.parameters():
            p[1] += 0.3 * torch.randn_like(p[1])
    single = AreaConditionedINR(groups=1, width=16, layers=2, seed=5)
    with torch.no_grad():
        for p, q in zip(single.parameters(), net.parameters()):
            p.copy_(q[1:])
    coords = pixel_coordinates(6, 7)
    areas = torch.tensor([0.1, 0.4])
    out = net(coords, areas)
    assert out.shape == (2, 2, 42)
    assert torch.allclose(out[1:], single(coords, areas), atol=1e-6)
    assert not torch.allclose(out[0], out[1])
    # FiLM: once its weights are non-zero, the area changes the mask
    assert not torch.allclose(out[1, 0], out[1, 1])
    fresh = AreaConditionedINR(groups=1, width=16, layers=2, seed=5)
    assert torch.allclose(fresh(coords, areas)[0, 0], fresh(coords, areas)[0, 1])  # starts area-agnostic
    concat = AreaConditionedINR(groups=1, width=16, layers=2, conditioning="concat")
    assert not torch.allclose(concat(coords, areas)[0, 0], concat(coords, areas)[0, 1])
    with pytest.raises(ValueError, match="conditioning"):
        AreaConditionedINR(conditioning="add")


def test_inr_batched_fit_equals_fitting_each_image_alone(tiny_cnn, images):
    opts = dict(max_iter=6, resolution=16, width=16, layers=2, seed=1)
    both = fit_inr_masks(tiny_cnn, images, [0, 3], **opts).masks((0.1, 0.3))
    alone = fit_inr_masks(tiny_cnn, images[1:], 3, **opts).masks((0.1, 0.3))
    assert both.shape == (2, 2, 32, 32)
    assert torch.allclose(both[1:], alone, atol=1e-5)
    assert not torch.allclose(both[0], both[1])
    # the seed fixes the initialisation and the sampled areas
    assert torch.equal(alone, fit_inr_masks(tiny_cnn, images[1:], 3, **opts).masks((0.1, 0.3)))
    other = fit_inr_masks(tiny_cnn, images[1:], 3, **{**opts, "seed": 2}).masks((0.1, 0.3))
    assert not torch.allclose(alone, other)


def test_inr_masks_are_well_behaved_in_the_area(tiny_cnn, images):
    fitted = fit_inr_masks(tiny_cnn, images[:1], 0, max_iter=120, resolution=16, width=32)
    areas = (0.05, 0.1, 0.2, 0.3, 0.4)
    m = fitted.masks(areas)
    got = achieved_area(m, threshold=0.5)[0]
    assert torch.allclose(got, torch.tensor(areas), atol=0.03), got  # achieved close to requested
    for i in range(len(areas) - 1):  # nested as the area grows
        assert (m[0, i] > m[0, i + 1] + 0.05).float().mean() < 0.02


def test_inr_method_and_multiple_masks_do_not_overlap(tiny_cnn, images):
    opts = dict(max_iter=8, resolution=16, width=16, layers=2)
    out = M.get("inr_extremal_perturbation", tiny_cnn, areas=(0.1, 0.2), **opts).attribute(images, 1)
    assert out.shape == (2, 1, 32, 32) and out.max() <= 2
    masks, gains = multiple_masks(tiny_cnn, images, 1, k=3, area=0.2, min_gain=float("-inf"), **opts)
    assert masks.shape == (2, 3, 32, 32) and gains.shape == (2, 3)
    binary = masks > 0.5
    assert binary[:, 0].any()
    for i in range(3):
        for j in range(i + 1, 3):
            assert not (binary[:, i] & binary[:, j]).any()
    # a gain threshold nothing reaches stops after the first mask
    masks, gains = multiple_masks(tiny_cnn, images, 1, k=3, area=0.2, min_gain=1e9, **opts)
    assert (masks == 0).all() and torch.isnan(gains).all()
