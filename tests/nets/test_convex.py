"""Image-guided convex upsampling of an explainer's coarse masks (explainer.nets.convex): the fast batched form
against a plain per-pixel loop, its starting point (the 3 x 3 box mean of the parents), and an Explainer built
with it through explain() at odd sizes, a safetensors round trip and ONNX Runtime."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_classifier

from explainer.explainers import ExplainerModule
from explainer.explainers.export import export
from explainer.explainers.loading import load
from explainer.nets.convex import ConvexUpsampledNet, convex_upsample
from explainer.nets.segmentation import build_mask_net

FPN = {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}


def plain_convex_upsample(L, w, padding="replicate"):
    B, C, h, wd = L.shape
    H, W = w.shape[-2:]
    f = H // h
    P = torch.zeros(B, C, h + 2, wd + 2, dtype=L.dtype)
    for i in range(h + 2):
        for j in range(wd + 2):
            inside = 1 <= i <= h and 1 <= j <= wd
            if inside or padding == "replicate":  # the nearest cell of the grid
                P[:, :, i, j] = L[:, :, min(max(i - 1, 0), h - 1), min(max(j - 1, 0), wd - 1)]
    out = torch.zeros(B, C, H, W, dtype=L.dtype)
    for y in range(H):
        for x in range(W):
            i, j = y // f, x // f
            for k in range(9):
                dy, dx = k // 3 - 1, k % 3 - 1
                out[:, :, y, x] += w[:, k, y, x, None] * P[:, :, i + 1 + dy, j + 1 + dx]
    return out


@pytest.mark.parametrize("padding", ["replicate", "zero"])
def test_convex_upsample_matches_a_plain_loop(padding):
    g = torch.Generator().manual_seed(0)
    L = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(2, 9, 16, 20, generator=g, dtype=torch.float64), 1)
    out = convex_upsample(L, w, padding)
    assert torch.allclose(out, plain_convex_upsample(L, w, padding), atol=1e-12)
    # a convex combination stays within the range of the neighbourhood's values
    low, high = (L.min(), L.max()) if padding == "replicate" else (L.min().clamp(max=0), L.max().clamp(min=0))
    assert out.max() <= high + 1e-12 and out.min() >= low - 1e-12
    with pytest.raises(ValueError, match="integer multiple"):
        convex_upsample(L, w[..., :15, :])
    with pytest.raises(ValueError, match="padding expected one of"):
        convex_upsample(L, w, "reflect")


def test_replicate_padding_leaves_no_border_strip():
    # a mask that is off everywhere stays off at the border too (zero padding mixes in logit 0: sigmoid 0.5)
    L = torch.full((1, 1, 4, 4), -8.0)
    w = torch.full((1, 9, 16, 16), 1 / 9)
    assert torch.sigmoid(convex_upsample(L, w)).max() < 1e-3
    assert torch.sigmoid(convex_upsample(L, w, "zero"))[..., 0, :].max() > 0.01


def test_starts_as_the_box_mean_of_the_parents():
    torch.manual_seed(0)
    net = build_mask_net("FPN", "tu-explainer_resnet_tiny", 5, None, FPN, upsampling="convex").eval()
    assert isinstance(net, ConvexUpsampledNet)
    z = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        L, _, _ = net.coarse(z)
        box = F.avg_pool2d(F.pad(L, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # the border cells replicated
        ref = box.repeat_interleave(4, 2).repeat_interleave(4, 3)
        assert torch.allclose(net(z), ref, atol=1e-5)


def test_only_for_heads_that_upsample():
    with pytest.raises(ValueError, match="does not upsample"):
        build_mask_net("Unet", "tu-explainer_resnet_tiny", 5, None, {"decoder_channels": [16, 8, 8, 8, 8]},
                       upsampling="convex")
    with pytest.raises(ValueError, match="upsampling"):
        build_mask_net("FPN", "tu-explainer_resnet_tiny", 5, None, FPN, upsampling="nearest")


def test_explainer_with_convex_upsampling_explains_exports_and_runs_in_onnx(tmp_path):
    clf = tiny_classifier(tmp_path / "clf.safetensors")
    torch.manual_seed(0)
    m = ExplainerModule(str(clf), architecture="FPN", encoder="tu-explainer_resnet_tiny", decoder_kwargs=FPN,
                        upsampling="convex", inverse_fill="surround")
    with torch.no_grad():  # weights away from their zero start, so the guide matters
        m.net.weights.weight.normal_(0, 0.5)
    x = torch.rand(3, 3, 57, 91)
    masks = m.explain(x)
    assert masks.shape == (3, m.num_classes, 57, 91) and 0 <= masks.min() and masks.max() <= 1
    ckpt = tmp_path / "e.ckpt"
    import pytorch_lightning as pl

    trainer = pl.Trainer(max_epochs=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(ckpt)
    e = load(ckpt)
    assert e.hparams.upsampling == "convex"
    assert torch.allclose(e.explain(x), masks, atol=1e-6)
    st = export(ckpt, "safetensors", tmp_path / "e.safetensors")
    assert torch.allclose(load(st).explain(x), masks, atol=1e-6)
    onnx_path = export(ckpt, "onnx", tmp_path / "e.onnx", input_size=64)
    import onnxruntime as ort

    x64 = torch.rand(2, 3, 64, 64)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x64.numpy()})[0]
    assert np.abs(out - e.explain(x64).numpy()).max() < 1e-4


def test_forward_equals_the_concatenated_guide_formula():
    """The forward pass mixes the guide's parts down before upsampling them; it equals the docstring's formula,
    softmax(weights(cat[z, image_guide(z), up(stem_proj(stem)), up(decoder_proj(d))]))."""
    torch.manual_seed(0)
    net = build_mask_net("FPN", "tu-explainer_resnet_tiny", 5, None, FPN, upsampling="convex").eval()
    with torch.no_grad():
        net.weights.weight.normal_(0, 0.5)
        net.weights.bias.normal_(0, 0.5)
        z = torch.randn(2, 3, 64, 96)
        L, feats, d = net.coarse(z)
        up = dict(size=(64, 96), mode="bilinear", align_corners=False)
        guide = torch.cat([z, net.image_guide(z), F.interpolate(net.stem_proj(feats[1]), **up),
                           F.interpolate(net.decoder_proj(d), **up)], 1)
        ref = plain_convex_upsample(L, torch.softmax(net.weights(guide), 1))
        assert torch.allclose(net(z), ref, atol=1e-5)
