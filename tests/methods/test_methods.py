"""explainer.methods: the one interface, targets, layers, hooks, and the Captum-backed / rewritten baselines
checked against Captum, plain formulas and axioms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explainer
import explainer.methods as M
from explainer.methods.base import default_layers, find_layer, forward_hooks, resolve_targets

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- helpers --
class TinyCAMNet(nn.Module):
    """conv 3->4 (3x3) -> ReLU -> [layer] -> conv 1x1 4->4 -> square -> global average pool -> linear 4->3.

    The square makes the gradient at ``layer`` vary over space, so Grad-CAM++'s weights are non-trivial.
    """

    def __init__(self, square: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.mix = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)
        self.square = square
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x):
        a = self.act(self.conv(x))
        z = self.mix(a)
        z = z * z if self.square else z
        return self.fc(z.mean(dim=(2, 3)))


def hand_explanandum(model: nn.Module, classes: int = 3) -> explainer.Explanandum:
    return explainer.Explanandum(model, classes, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


# ------------------------------------------------------------------------------------------- interface --
REQUIRED = {"gradcam", "gradcam++", "integrated_gradients", "saliency", "rise", "occlusion",
            "extremal_perturbation", "inr_extremal_perturbation", "dix", "iia"}


def test_available_lists_every_method():
    names = M.available()
    assert REQUIRED <= set(names)
    assert names == sorted(names)
    assert {"explainer", "ltx", "pltx"} <= set(names)  # registered by explainer.explainers


def test_unknown_method_name_lists_the_available_ones(tiny_cnn):
    with pytest.raises(ValueError, match="available") as err:
        M.get("gradkam", tiny_cnn)
    assert "gradcam" in str(err.value) and "integrated_gradients" in str(err.value)


def test_register_refuses_a_taken_name_for_another_class():
    @M.register("_test_method")
    class A(M.Method):
        def _attribute(self, x, target):
            return x[:, :1]

    try:
        assert "_test_method" in M.available()
        with pytest.raises(ValueError, match="already registered"):
            @M.register("_test_method")
            class B(M.Method):
                pass
    finally:
        from explainer.methods.base import _REGISTRY

        _REGISTRY.pop("_test_method", None)


def test_bare_module_is_wrapped_and_maps_have_the_contract_shape(images):
    m = M.get("saliency", TinyCAMNet())
    assert isinstance(m.f, explainer.Explanandum) and m.f.num_classes == 3
    out = m.attribute(images)
    assert out.shape == (2, 1, 32, 32) and out.dtype == torch.float32 and out.device == images.device


def test_target_vocabulary_agrees(tiny_cnn, images):
    m = M.get("saliency", tiny_cnn)
    pred = tiny_cnn(images).argmax(1)
    by_none = m.attribute(images, None)
    by_tensor = m.attribute(images, pred)
    by_list = m.attribute(images, pred.tolist())
    assert torch.equal(by_none, by_tensor) and torch.equal(by_tensor, by_list)
    one = m.attribute(images, 2)
    assert torch.equal(one, m.attribute(images, torch.tensor([2, 2])))
    assert torch.equal(one, m.attribute(images, torch.tensor(2)))
    other = m.attribute(images, 1)
    assert not torch.allclose(one, other)


@pytest.mark.parametrize("target, err, pattern", [
    (4, ValueError, r"\[0, 3\]"),
    (-1, ValueError, r"\[0, 3\]"),
    ([0, 7], ValueError, r"\[0, 3\].*\[7\]"),
    ([0], ValueError, "2 class indices"),
    (torch.tensor([0, 1, 2]), ValueError, r"shape \(2,\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer"),
    ("cat", TypeError, "target"),
])
def test_bad_targets_raise_naming_the_range(tiny_cnn, images, target, err, pattern):
    with pytest.raises(err, match=pattern):
        resolve_targets(tiny_cnn, images, target)
    with pytest.raises(err, match=pattern):
        M.get("gradcam", tiny_cnn).attribute(images, target)


def test_bad_images_are_refused(tiny_cnn, images):
    m = M.get("saliency", tiny_cnn)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.attribute(images * 255)
    with pytest.raises(ValueError, match="3 RGB"):
        m.attribute(images[:, :1])
    with pytest.raises(TypeError, match="floating"):
        m.attribute((images * 255).to(torch.uint8))


# ---------------------------------------------------------------------------------------------- layers --
def test_default_layers_per_architecture(tiny_cnn):
    assert default_layers(tiny_cnn.model) == ("layer4", "layer3")

    assert default_layers(VGGish()) == ("features.8", "features.3")
    with pytest.raises(ValueError, match="no default layer"):
        default_layers(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


class VGGish(nn.Module):
    """VGG's layout: ``features`` (convs, in-place ReLUs, max-pools), average pool, linear classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def test_vgg_like_network_with_inplace_relus(images):
    from captum.attr import LayerAttribution, LayerGradCam

    f = hand_explanandum(VGGish())
    assert default_layers(f.model) == ("features.8", "features.3")
    maps = M.get("gradcam", f).attribute(images, 1)
    ref = LayerGradCam(f, f.model.features[8]).attribute(images, target=1, relu_attributions=True)
    assert torch.allclose(maps, LayerAttribution.interpolate(ref, (32, 32), "bilinear"), atol=1e-6)
    # the captured conv output is not overwritten by the in-place ReLU after it (Grad-CAM++ reads it)
    x = images.clone().requires_grad_(True)
    a = f.model.features[:9](x)
    g = torch.autograd.grad(f.model.classifier(f.model.pool(a.relu()).flatten(1))[:, 1].sum(), a)[0]
    from explainer.methods.cam import gradcam_pp_map

    want = F.interpolate(gradcam_pp_map(a.detach(), g), size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(M.get("gradcam++", f).attribute(images, 1), want, atol=1e-6)
    for name in ("dix", "iia"):
        out = M.get(name, f, steps=2).attribute(images, 1)
        assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all() and out.amax() == 1


def test_a_layer_inside_a_residual_branch_is_refused_clearly(tiny_cnn, images):
    with pytest.raises(RuntimeError, match="alone feeds the rest of the network"):
        M.get("iia", tiny_cnn, layers=["layer4.0.conv1"], steps=2).attribute(images)
    assert no_hooks_left(tiny_cnn.model)


def test_unknown_layer_name_lists_candidates(tiny_cnn):
    with pytest.raises(ValueError, match="layer4") as err:
        M.get("gradcam", tiny_cnn, layer="layer5")
    assert "closest" in str(err.value) and "top-level modules" in str(err.value)
    with pytest.raises(ValueError, match="previous_layer"):
        M.get("dix", tiny_cnn, previous_layer="nope")
    assert find_layer(tiny_cnn.model, "layer4.-1") is tiny_cnn.model.layer4[0]


def test_hooks_are_removed_also_on_error(tiny_cnn, images):
    model = tiny_cnn.model
    with pytest.raises(RuntimeError, match="boom"):
        with forward_hooks([(model.layer4, lambda *a: None)]):
            assert model.layer4._forward_hooks
            raise RuntimeError("boom")
    assert no_hooks_left(model)

    def broken(_):
        raise RuntimeError("boom in the head")

    old = model.fc.forward
    model.fc.forward = broken
    try:
        for name in ("gradcam++", "iia", "dix"):
            with pytest.raises(RuntimeError, match="boom in the head"):
                M.get(name, tiny_cnn, steps=2).attribute(images) if name != "gradcam++" else \
                    M.get(name, tiny_cnn).attribute(images)
            assert no_hooks_left(model)
    finally:
        model.fc.forward = old


# ------------------------------------------------------------------------------------------- baselines --
def test_saliency_is_the_max_abs_input_gradient(tiny_cnn, images):
    x = images.clone().requires_grad_(True)
    tiny_cnn(x)[:, 1].sum().backward()
    want = x.grad.abs().amax(dim=1, keepdim=True)
    assert torch.allclose(M.get("saliency", tiny_cnn).attribute(images, 1), want, atol=1e-6)
    assert torch.allclose(M.get("saliency", tiny_cnn, aggregate="sum").attribute(images, 1),
                          x.grad.sum(1, keepdim=True), atol=1e-6)


def test_integrated_gradients_completeness(images):
    f = hand_explanandum(TinyCAMNet(square=True))
    maps = M.get("integrated_gradients", f, steps=64, internal_batch_size=128).attribute(images, 0)
    with torch.no_grad():
        gap = f(images)[:, 0] - f(torch.zeros_like(images))[:, 0]
    # completeness: the map sums to f(x) - f(baseline) for the target logit
    assert gap.abs().min() > 0.05
    assert torch.allclose(maps.sum(dim=(1, 2, 3)), gap, rtol=1e-3, atol=1e-4)


def test_integrated_gradients_wraps_captum(tiny_cnn, images):
    from captum.attr import IntegratedGradients

    maps = M.get("integrated_gradients", tiny_cnn, steps=16).attribute(images, 0)
    ref = IntegratedGradients(tiny_cnn).attribute(images, torch.zeros_like(images), target=0, n_steps=16)
    assert torch.allclose(maps, ref.sum(1, keepdim=True), atol=1e-6)
    small = M.get("integrated_gradients", tiny_cnn, steps=16, internal_batch_size=5).attribute(images, 0)
    assert torch.allclose(small, maps, atol=1e-6)
    absolute = M.get("integrated_gradients", tiny_cnn, steps=16, aggregate="abs").attribute(images, 0)
    assert (absolute >= maps.abs() - 1e-7).all() and (absolute > maps.abs() + 1e-6).any()
    mean_base = M.get("integrated_gradients", tiny_cnn, steps=16, baseline="mean").attribute(images, 0)
    ref = IntegratedGradients(tiny_cnn).attribute(images, tiny_cnn.mean.expand_as(images), target=0, n_steps=16)
    assert torch.allclose(mean_base, ref.sum(1, keepdim=True), atol=1e-6)


def test_gradcam_equals_cam_on_a_linear_head(images):
    # after global average pooling and a linear layer dy_c/dA_k = W_ck / (hw): Grad-CAM is CAM (Zhou 2016)
    net = TinyCAMNet(square=False)
    f = hand_explanandum(net)
    maps = M.get("gradcam", f, layer="mix").attribute(images, 2)
    with torch.no_grad():
        a = net.mix(net.act(net.conv(images)))
        cam = F.relu(torch.einsum("k,bkhw->bhw", net.fc.weight[2], a)).unsqueeze(1) / a[0, 0].numel()
    assert torch.allclose(maps, cam, atol=1e-6)


def test_gradcam_matches_captum_and_plain_formula(tiny_cnn, images):
    from captum.attr import LayerAttribution, LayerGradCam

    maps = M.get("gradcam", tiny_cnn).attribute(images, 3)
    ref = LayerGradCam(tiny_cnn, tiny_cnn.model.layer4).attribute(images, target=3, relu_attributions=True)
    ref = LayerAttribution.interpolate(ref, (32, 32), "bilinear")
    assert torch.allclose(maps, ref, atol=1e-6)
    acts = {}
    h = tiny_cnn.model.layer3.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    try:
        y = tiny_cnn(images.clone().requires_grad_(True))[:, 3].sum()
        g = torch.autograd.grad(y, acts["a"])[0]
    finally:
        h.remove()
    plain = F.relu((g.mean(dim=(2, 3), keepdim=True) * acts["a"]).sum(1, keepdim=True))
    plain = F.interpolate(plain, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(M.get("gradcam", tiny_cnn, layer="layer3").attribute(images, 3), plain, atol=1e-6)


def _gradcampp_slow(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ by loops over channels and pixels, straight from the paper's Eq. 19 (one image)."""
    k_, h, w = a.shape
    out = torch.zeros(h, w, dtype=torch.float64)
    for k in range(k_):
        s = float(a[k].sum())
        wk = 0.0
        for i in range(h):
            for j in range(w):
                gij = float(g[k, i, j])
                den = 2 * gij ** 2 + s * gij ** 3
                alpha = gij ** 2 / den if den != 0 else 0.0
                wk += alpha * max(gij, 0.0)
        out += wk * a[k].double()
    return out.clamp(min=0)


def test_gradcam_plus_plus_matches_a_slow_plain_formula(images):
    net = TinyCAMNet(square=True)
    f = hand_explanandum(net)
    x = images[:, :, :8, :8].contiguous()
    maps = M.get("gradcam++", f, layer="act").attribute(x, 1)
    for b in range(x.shape[0]):
        xb = x[b:b + 1].clone().requires_grad_(True)
        a = net.act(net.conv(xb))
        z = net.mix(a)
        g = torch.autograd.grad(net.fc((z * z).mean(dim=(2, 3)))[0, 1], a)[0]
        want = _gradcampp_slow(a[0].detach(), g[0]).float()
        assert torch.allclose(maps[b, 0], want, atol=1e-5), b
    assert maps.amax() > 0


def test_gradcam_on_vit_tokens(images):
    import timm

    torch.manual_seed(0)
    vit = explainer.load_explanandum(timm.create_model(
        "vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3,
        dynamic_img_size=True))
    m = M.get("gradcam", vit)
    assert m.layer_name == "blocks.1.norm1"
    out = m.attribute(images, 0)
    blk = vit.model.blocks[1].norm1
    store = {}
    h = blk.register_forward_hook(lambda mod, i, o: store.setdefault("a", o))
    try:
        g = torch.autograd.grad(vit(images.clone().requires_grad_(True))[:, 0].sum(), store["a"])[0]
    finally:
        h.remove()
    a, g = store["a"][:, 1:], g[:, 1:]  # drop the class token: (B, 16, D) on a 4x4 grid
    plain = F.relu((g.mean(1, keepdim=True) * a).sum(-1)).view(2, 1, 4, 4)
    plain = F.interpolate(plain, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(out, plain, atol=1e-6)


def test_rise_matches_slow_loop_and_is_seeded(tiny_cnn, images):
    m = M.get("rise", tiny_cnn, n_masks=40, seed=3, internal_batch_size=16)
    out = m.attribute(images, 1)
    masks = m.masks((32, 32))
    assert masks.shape == (40, 1, 32, 32) and 0 <= masks.min() and masks.max() <= 1
    mean = tiny_cnn.mean.view(1, 3, 1, 1)
    slow = torch.zeros(2, 1, 32, 32)
    with torch.no_grad():
        for i in range(40):
            xm = masks[i] * images + (1 - masks[i]) * mean
            slow += torch.sigmoid(tiny_cnn(xm))[:, 1].view(2, 1, 1, 1) * masks[i]
    assert torch.allclose(out, slow / (40 * 0.5), atol=1e-5)
    assert torch.equal(out, m.attribute(images, 1))
    assert torch.allclose(out, M.get("rise", tiny_cnn, n_masks=40, seed=3, internal_batch_size=7).attribute(
        images, 1), atol=1e-6)
    assert not torch.allclose(out, M.get("rise", tiny_cnn, n_masks=40, seed=4).attribute(images, 1))


def test_occlusion_matches_slow_loop(tiny_cnn, images):
    x = images[:, :, :16, :16].contiguous()
    out = M.get("occlusion", tiny_cnn, window=4, stride=4).attribute(x, 2)
    mean = tiny_cnn.mean.view(1, 3, 1, 1)
    slow = torch.zeros(2, 1, 16, 16)
    with torch.no_grad():
        full = tiny_cnn(x)[:, 2]
        for i in range(0, 16, 4):
            for j in range(0, 16, 4):
                xo = x.clone()
                xo[:, :, i:i + 4, j:j + 4] = mean.expand(2, 3, 4, 4)
                slow[:, 0, i:i + 4, j:j + 4] = (full - tiny_cnn(xo)[:, 2]).view(2, 1, 1)
    assert torch.allclose(out, slow, atol=1e-5)


@pytest.mark.parametrize("name, options, pattern", [
    ("integrated_gradients", {"steps": 0}, "steps"),
    ("iia", {"steps": 0}, "steps"),
    ("dix", {"steps": 0}, "steps"),
    ("rise", {"n_masks": 0}, "n_masks"),
    ("rise", {"p": 1.0}, "p:"),
    ("extremal_perturbation", {"max_iter": 0}, "max_iter"),
    ("inr_extremal_perturbation", {"max_iter": 0}, "max_iter"),
    ("extremal_perturbation", {"areas": (0.0, 0.5)}, "areas"),
    ("extremal_perturbation", {"areas": 1.2}, "areas"),
    ("inr_extremal_perturbation", {"areas": (0.1, 1.0)}, "areas"),
    ("inr_extremal_perturbation", {"area_range": (0.0, 0.5)}, "area_range"),
    ("integrated_gradients", {"baseline": "white"}, "baseline"),
    ("iia", {"variant": "paper"}, "variant"),
    ("saliency", {"internal_batch_size": 0}, "internal_batch_size"),
])
def test_bad_options_raise_clear_value_errors(tiny_cnn, name, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        M.get(name, tiny_cnn, **options)
