"""DIX and IIA: the fast batched versions against slow plain loops written from the formulas (Zennit's
pattern), IIA's reduction to Integrated Gradients (Captum), and the ViT attention probes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import explainer
import explainer.methods as M
from explainer.methods.vit import attention_probe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit():
    """A tiny timm ViT (patch 8 at 32 px: a 4x4 grid, 2 blocks, 3 heads)."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, depth=2, embed_dim=48,
                          num_heads=3, dynamic_img_size=True)
    return explainer.load_explanandum(m)


# ------------------------------------------------------------------------------------- slow, plain CNN --
def channel_min(u):
    return u.min(dim=1, keepdim=True).values.expand_as(u)


def forward_with(f, x, replace=None, capture=()):
    """f(x) with module outputs replaced (module -> tensor) and captured (outputs by module), one sample at
    a time and no batch tricks."""
    replace = replace or {}
    seen = {}
    handles = []
    for mod in set(replace) | set(capture):
        def hook(m, i, o, mod=mod):
            seen[mod] = replace.get(mod, o)
            return replace.get(mod, o)
        handles.append(mod.register_forward_hook(hook))
    try:
        y = f(x)
    finally:
        for h in handles:
            h.remove()
    return y, seen


def slow_iia(f, x, target, layers, steps, baseline):
    """IIA by explicit loops over every path point, trapezoid weights written out (one image)."""
    w = [0.5 / steps if k in (0, steps) else 1.0 / steps for k in range(steps + 1)]
    a = [k / steps for k in range(steps + 1)]
    total = 0.0

    def recurse(xi, depth, fixed, weight):
        nonlocal total
        if depth == len(layers):  # innermost reached through the input path only: IG
            xi = xi.clone().requires_grad_(True)
            y = f(xi)[0, target]
            g = torch.autograd.grad(y, xi)[0]
            total = total + weight * (x - baseline) * g
            return
        layer = layers[depth]
        with torch.no_grad():
            _, seen = forward_with(f, xi, fixed, capture=[layer])
        u = seen[layer].detach()
        r = channel_min(u)
        for k in range(steps + 1):
            v = (r + a[k] * (u - r)).detach()
            if depth == len(layers) - 1:
                v.requires_grad_(True)
                y, _ = forward_with(f, xi, {**fixed, layer: v})
                g = torch.autograd.grad(y[0, target], v)[0]
                total = total + weight * w[k] * (u - r) * g
            else:
                recurse(xi, depth + 1, {**fixed, layer: v}, weight * w[k])

    if layers:
        for k in range(steps + 1):
            recurse(baseline + a[k] * (x - baseline), 0, {}, w[k])
    else:
        for k in range(steps + 1):
            xi = (baseline + a[k] * (x - baseline)).clone().requires_grad_(True)
            g = torch.autograd.grad(f(xi)[0, target], xi)[0]
            total = total + w[k] * (x - baseline) * g
    return total.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("layers", [[], ["layer4"], ["layer3", "layer4"]])
def test_iia_fast_equals_slow_plain_loops(tiny_cnn, images, layers):
    x = images[:1]
    m = M.get("iia", tiny_cnn, layers=layers, steps=3, normalize=False, internal_batch_size=3)
    fast = m.attribute(x, 2)
    base = tiny_cnn.mean.view(1, 3, 1, 1).expand_as(x)
    slow = slow_iia(tiny_cnn, x, 2, [explainer.methods.find_layer(tiny_cnn.model, n) for n in layers], 3, base)
    slow = F.interpolate(slow, size=(32, 32), mode="bicubic", align_corners=False) if layers else slow
    assert torch.allclose(fast, slow, atol=1e-6, rtol=1e-4)
    assert fast.abs().max() > 0


def test_iia_batch_and_chunks_do_not_change_the_result(tiny_cnn, images):
    a = M.get("iia", tiny_cnn, steps=2, internal_batch_size=64, normalize=False).attribute(images, [0, 1])
    b = M.get("iia", tiny_cnn, steps=2, internal_batch_size=1, normalize=False).attribute(images, [0, 1])
    one = M.get("iia", tiny_cnn, steps=2, normalize=False).attribute(images[1:], 1)
    assert torch.allclose(a, b, atol=1e-7, rtol=1e-4) and torch.allclose(a[1:], one, atol=1e-7, rtol=1e-4)
    # layer3 is 2x2 at 32 px (layer4 is 1x1: a constant map), so the normalised map varies
    n = M.get("iia", tiny_cnn, steps=2, layers=["layer2", "layer3"]).attribute(images, [0, 1])
    assert torch.allclose(n.amin(dim=(1, 2, 3)), torch.zeros(2)) and torch.allclose(n.amax(dim=(1, 2, 3)),
                                                                                      torch.ones(2))


def test_iia_with_only_the_input_path_is_integrated_gradients(tiny_cnn, images):
    from captum.attr import IntegratedGradients

    iia = M.get("iia", tiny_cnn, layers=[], steps=7, baseline="black", normalize=False).attribute(images, 3)
    ig = IntegratedGradients(tiny_cnn).attribute(images, torch.zeros_like(images), target=3, n_steps=8,
                                                 method="riemann_trapezoid")
    # Captum's "trapezoid" puts 8 points on [0, 1] but weights them 1/8 (halved at the ends), so its weights
    # sum to 7/8; IIA's trapezoid weights sum to 1
    assert torch.allclose(iia, ig.sum(dim=1, keepdim=True) * 8 / 7, atol=1e-6)


def test_iia_official_variant_is_the_degenerate_sum(tiny_cnn, images):
    x = images[:1]
    out = M.get("iia", tiny_cnn, variant="official", steps=4, normalize=False).attribute(x, 1)
    base = tiny_cnn.mean.view(1, 3, 1, 1)
    layer = tiny_cnn.model.layer4
    acc = 0
    for k in range(5):
        xi = (base + k / 4 * (x - base)).clone().requires_grad_(True)
        y, seen = forward_with(tiny_cnn, xi, capture=[layer])
        g = torch.autograd.grad(y[0, 1], seen[layer])[0]
        acc = acc + (g * seen[layer].detach().relu()).sum(dim=1, keepdim=True)
    want = F.interpolate(acc, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.allclose(out, want, atol=1e-6, rtol=1e-4)


def slow_dix(f, x, target, last, prev, steps, official):
    """DIX's two maps by loops over path points (one image), combined as in the module docstring."""
    def integrate(layer, h1):
        with torch.no_grad():
            _, seen = forward_with(f, x, capture=[layer])
        u = seen[layer]
        r = u if (official and h1) else channel_min(u)
        acc = 0
        for k in range(steps + 1):
            v = (r + k / steps * (u - r)).detach().requires_grad_(True)
            y, _ = forward_with(f, x, {layer: v})
            g = torch.autograd.grad(y[0, target], v)[0]
            if h1:
                acc = acc + g.relu() * v.detach().relu()
            else:
                acc = acc + (g * v.detach().relu() * torch.linalg.norm((v.detach() - r) / steps)).relu()
        return acc[0]

    h1, h2 = integrate(last, True), integrate(prev, False)
    # the released code's fixed grid; ours, the block before's own
    size = (1024, 28, 28) if official else (h2.shape[0], 2 * h2.shape[1], 2 * h2.shape[2])
    a = F.interpolate(h1[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    b = F.interpolate(h2[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    m = (b * a + a).sum(dim=0)[None, None]
    return F.interpolate(m, size=(32, 32), mode="bicubic", align_corners=False)


@pytest.mark.parametrize("variant", ["faithful", "official"])
def test_dix_fast_equals_slow_plain_loops(tiny_cnn, images, variant):
    x = images[1:]
    fast = M.get("dix", tiny_cnn, steps=3, variant=variant, normalize=False).attribute(x, 0)
    slow = slow_dix(tiny_cnn, x, 0, tiny_cnn.model.layer4, tiny_cnn.model.layer3, 3, variant == "official")
    assert torch.allclose(fast, slow, atol=1e-6, rtol=1e-4)
    assert fast.abs().max() > 0


def test_dix_official_last_block_is_k_plus_one_times_grad_act(tiny_cnn, images):
    from explainer.methods.dix import dix_cnn_maps

    x = images[:1]
    h1, _ = dix_cnn_maps(tiny_cnn, tiny_cnn.model.layer4, tiny_cnn.model.layer3, x, torch.tensor([2]), 4,
                         "official")
    y, seen = forward_with(tiny_cnn, x.clone().requires_grad_(True), capture=[tiny_cnn.model.layer4])
    a = seen[tiny_cnn.model.layer4]
    g = torch.autograd.grad(y[0, 2], a)[0]
    assert torch.allclose(h1, 5 * g.relu() * a.detach().relu(), atol=1e-6)
    h1f, _ = dix_cnn_maps(tiny_cnn, tiny_cnn.model.layer4, tiny_cnn.model.layer3, x, torch.tensor([2]), 4)
    assert not torch.allclose(h1f, h1)


# ---------------------------------------------------------------------------------------------- ViT --
def manual_vit(f, x, edit=None):
    """The tiny timm ViT's forward written out (no hooks), returning logits and every block's attention."""
    model, edit = f.model, edit or {}
    t = model.patch_embed((x - f.mean) / f.std)
    t = model.norm_pre(model.patch_drop(model._pos_embed(t)))
    attns = []
    for i, blk in enumerate(model.blocks):
        h = blk.norm1(t)
        b, n, c = h.shape
        at = blk.attn
        q, k, v = at.qkv(h).reshape(b, n, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q * at.scale) @ k.transpose(-2, -1), dim=-1)
        if i in edit:
            a = edit[i](a)
        attns.append(a)
        t = t + at.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        t = t + blk.mlp(blk.norm2(t))
    return model.forward_head(model.norm(t)), attns


def plain_rollout(maps):
    """Rollout by explicit steps (one image): mean heads, + I, row-normalise, multiply; class-token row."""
    joint = None
    for m in maps:
        a = m.mean(dim=0) + torch.eye(m.shape[-1])
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    return joint[0, 1:]


def test_attention_probe_captures_softmax_and_restores(vit, images):
    fused = [b.attn.fused_attn for b in vit.model.blocks]
    with attention_probe(vit.model) as att:
        logits = vit(images)
    want_logits, want = manual_vit(vit, images)
    assert torch.allclose(logits, want_logits, atol=1e-5)
    for i in range(2):
        assert torch.allclose(att[i], want[i], atol=1e-6)
    assert [b.attn.fused_attn for b in vit.model.blocks] == fused
    assert all(not m._forward_hooks for m in vit.model.modules())
    with pytest.raises(RuntimeError, match="inside"):
        with attention_probe(vit.model):
            raise RuntimeError("inside")
    assert [b.attn.fused_attn for b in vit.model.blocks] == fused
    assert all(not m._forward_hooks for m in vit.model.modules())


def _grad_maps(f, x, target, edit):
    xi = x.clone().requires_grad_(True)
    logits, attns = manual_vit(f, xi, edit)
    grads = torch.autograd.grad(logits[0, target], attns)
    return [(g * a).relu()[0].detach() for a, g in zip(attns, grads)]


def test_iia_vit_fast_equals_slow_plain_loops(vit, images):
    x, steps = images[:1], 2
    fast = M.get("iia", vit, steps=steps, normalize=False, internal_batch_size=4).attribute(x, 1)
    base = vit.mean.view(1, 3, 1, 1)
    acc, n = None, 0
    for i in range(steps + 1):
        xi = base + i / steps * (x - base)
        for j in range(steps + 1):
            maps = _grad_maps(vit, xi, 1, {1: lambda a, j=j: (j / steps * a.detach()).requires_grad_(True)})
            acc = maps if acc is None else [s + m for s, m in zip(acc, maps)]
            n += 1
    row = plain_rollout([m / n for m in acc]).view(1, 1, 4, 4)
    slow = F.interpolate(row, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(fast, slow, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("variant", ["faithful", "official"])
def test_dix_vit_fast_equals_slow_plain_loops(vit, images, variant):
    x, steps = images[1:], 3
    fast = M.get("dix", vit, steps=steps, variant=variant, normalize=False).attribute(x, 2)
    with torch.no_grad():
        _, clean = manual_vit(vit, x)
    total = 0
    for blk in (1, 0):
        acc = None
        for j in range(steps + 1):
            src = clean[1] if variant == "official" else clean[blk]
            maps = _grad_maps(vit, x, 2, {blk: lambda a, j=j, src=src: (j / steps * src).requires_grad_(True)})
            acc = maps if acc is None else [s + m for s, m in zip(acc, maps)]
        total = total + plain_rollout([m / (steps + 1) for m in acc])
    slow = F.interpolate(total.view(1, 1, 4, 4), size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(fast, slow, atol=1e-6, rtol=1e-4)


def test_vit_maps_are_normalised_and_targets_matter(vit, images):
    for name in ("dix", "iia"):
        m = M.get(name, vit, steps=2)
        a, b = m.attribute(images, 0), m.attribute(images, 3)
        assert a.shape == (2, 1, 32, 32)
        assert torch.allclose(a.amin(dim=(1, 2, 3)), torch.zeros(2)) and torch.allclose(a.amax(dim=(1, 2, 3)),
                                                                                          torch.ones(2))
        assert not torch.allclose(a, b)
