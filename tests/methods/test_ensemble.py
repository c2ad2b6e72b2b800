"""The ensemble method against a plain re-implementation: per-map normalisation, weights, ranks, sharpening."""

import pytest
import torch
import torch.nn.functional as F

import explainer.methods as M
from explainer.methods.ensemble import rank_normalize


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 3, 32, 32, generator=g)


def _plain_minmax(m):
    out = torch.empty_like(m)
    for i in range(m.shape[0]):
        lo, hi = m[i].min(), m[i].max()
        out[i] = (m[i] - lo) / (hi - lo) if hi > lo else 0
    return out


def test_weighted_mean_of_minmax_maps_equals_a_plain_loop(tiny_cnn, images):
    t = torch.tensor([0, 2, 3])
    ens = M.get("ensemble", tiny_cnn, members={"gradcam": {"weight": 2.0}, "saliency": {},
                                               "ig": {"method": "integrated_gradients", "steps": 4, "weight": 0.5}})
    got = ens.attribute(images, t)
    parts = []
    for name, opts, w in (("gradcam", {}, 2.0), ("saliency", {}, 1.0), ("integrated_gradients", {"steps": 4}, 0.5)):
        m = M.get(name, tiny_cnn, **opts).attribute(images, t)
        m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)
        parts.append(w * _plain_minmax(m))
    want = sum(parts) / 3.5
    assert got.shape == (3, 1, 32, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rank_normalisation_is_a_permutation_of_the_grid_and_keeps_the_order():
    m = torch.randn(2, 1, 5, 7)
    r = rank_normalize(m)
    for i in range(2):
        vals = r[i].flatten().sort().values
        torch.testing.assert_close(vals, torch.linspace(0, 1, 35))
        order = m[i].flatten().argsort()
        assert bool((r[i].flatten()[order].diff() > 0).all())


def test_sharpen_keeps_the_pixel_order_and_shrinks_the_mean(tiny_cnn, images):
    plain = M.get("ensemble", tiny_cnn, members={"saliency": {}}).attribute(images, 1)
    sharp = M.get("ensemble", tiny_cnn, members={"saliency": {}}, sharpen=3.0).attribute(images, 1)
    torch.testing.assert_close(sharp, plain.pow(3.0))
    assert bool((sharp.flatten(1).mean(1) < plain.flatten(1).mean(1)).all())
    # a single member with rank normalisation is that member's ranks
    ranked = M.get("ensemble", tiny_cnn, members={"saliency": {}}, normalize="rank").attribute(images, 1)
    torch.testing.assert_close(ranked, rank_normalize(M.get("saliency", tiny_cnn).attribute(images, 1)))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"members": {}}, "non-empty mapping"),
    ({"members": {"gradcam": {}}, "normalize": "zscore"}, "normalize: expected one of"),
    ({"members": {"gradcam": {"weight": -1}}}, "weight: expected a number >= 0"),
    ({"members": {"gradcam": {"weight": 0}}}, "every weight is 0"),
    ({"members": {"gradcam": {}}, "sharpen": 0}, "sharpen: expected a number > 0"),
    ({"members": {"e": {"method": "ensemble"}}}, "cannot hold an ensemble"),
    ({"members": {"gradcam": []}}, "expected a mapping of options"),
])
def test_bad_settings_say_what_was_expected(tiny_cnn, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        M.get("ensemble", tiny_cnn, **kwargs)


def test_an_unknown_member_names_the_available_methods(tiny_cnn):
    with pytest.raises(ValueError, match="gradcam"):
        M.get("ensemble", tiny_cnn, members={"gradcm": {}})
