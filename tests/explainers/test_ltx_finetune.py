"""LTX per-instance finetuning: batched (vmap over explainer copies) == the plain per-image loop; errors."""

import copy

import pytest
import torch

from explainer.explainers import LTXModule
from explainer.explainers.ltx import finetune, finetune_loop

SMP_TINY = dict(network="smp", encoder="tu-explainer_resnet_tiny",
                decoder_kwargs={"decoder_channels": [16, 16, 8, 8, 8]})


@pytest.fixture(scope="module")
def vit(tiny_vit):
    return tiny_vit


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


SETTINGS = {"cnn-backbone": ({}, 64), "cnn-smp": (SMP_TINY, 32), "vit-backbone": ({"lambda_inverse": 1.0}, 32),
            "vit-agnostic-kl": ({"class_agnostic": True, "target": "kl"}, 32),
            "cnn-smp-kl-target-curve": ({**SMP_TINY, "target": "kl", "kl_scope": "target", "lambda_inverse": 1.0,
                                         "lambda_curve": 1.0, "curve_areas": (0.1, 0.3)}, 32)}


@pytest.mark.parametrize("which", list(SETTINGS))
def test_batched_equals_loop_and_leaves_module_unchanged(which, tiny_cnn, vit):
    kw, size = SETTINGS[which]
    torch.manual_seed(0)
    m = LTXModule(vit if which.startswith("vit") else tiny_cnn, finetuning="paper", **kw, lambda_mask=5.0)
    m.train()  # finetuning must switch the explainer to eval (BN statistics frozen) and back
    x = torch.rand(3, 3, size, size)
    t = torch.tensor([2, 0, 3])
    before, f_before = _state(m.net), _state(m.explanandum)
    pre = m.explain(x, t)
    m.train()
    batched = finetune(m, x, t, steps=3, lr=1e-2)
    loop = finetune_loop(m, x, t, steps=3, lr=1e-2)
    assert batched.shape == (3, 1, size, size)
    assert torch.allclose(batched, loop, atol=1e-4), (batched - loop).abs().max()
    assert (batched - pre).abs().max() > 1e-3  # the steps did something
    # the pretrained explainer and the explanandum are untouched, and the explainer is back in train mode
    assert all(torch.equal(v, before[k]) for k, v in m.net.state_dict().items())
    assert all(torch.equal(v, f_before[k]) for k, v in m.explanandum.state_dict().items())
    assert m.net.training and not m.explanandum.training


@pytest.mark.parametrize("which", ["cnn-backbone", "vit-backbone"])
def test_batched_equals_loop_exactly_in_float64(which, tiny_cnn, vit):
    """Exact up to rounding: in float32 AdamW turns the sign of a ~0 gradient, which rounding decides
    differently for grouped and single convolutions, into a full +-lr step, so rare pixels may differ more."""
    torch.manual_seed(0)
    f = copy.deepcopy(vit if which.startswith("vit") else tiny_cnn)  # a copy: the fixture stays float32
    m = LTXModule(f, finetuning="paper", **SETTINGS[which][0]).double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    batched = finetune(m, x, [1, 3], steps=3, lr=1e-2)
    loop = finetune_loop(m, x, [1, 3], steps=3, lr=1e-2)
    assert torch.allclose(batched, loop, atol=1e-6, rtol=0)


def test_images_are_independent_of_their_batch(tiny_cnn):
    """Chunking (batch_size) and the other images in a batch do not change an image's mask."""
    torch.manual_seed(0)
    m = LTXModule(tiny_cnn, finetuning="paper", **SMP_TINY)
    x = torch.rand(3, 3, 32, 32)
    a = finetune(m, x, [1, 2, 3], steps=2, batch_size=3)
    b = finetune(m, x, [1, 2, 3], steps=2, batch_size=1)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(finetune(m, x[1:2], 2, steps=2), a[1:2], atol=1e-5)


def test_targets_none_is_the_predicted_class(tiny_cnn):
    torch.manual_seed(0)
    m = LTXModule(tiny_cnn, finetuning="paper", **SMP_TINY, target="predicted")
    x = torch.rand(2, 3, 32, 32)
    top = tiny_cnn(x).argmax(1)
    assert torch.allclose(finetune(m, x, None, steps=1), finetune(m, x, top, steps=1), atol=1e-6)


def test_finetune_inside_inference_mode(tiny_cnn):
    m = LTXModule(tiny_cnn, finetuning="paper", **SMP_TINY)
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        out = finetune(m, x, 0, steps=1)
    assert out.shape == (1, 1, 32, 32)


def test_finetune_errors(tiny_cnn):
    m = LTXModule(tiny_cnn, finetuning="paper", **SMP_TINY)
    x = torch.rand(2, 3, 32, 32)
    for bad in (0, -1, 2.5, True, "3"):  # None: the preset's steps
        with pytest.raises(ValueError, match="steps"):
            finetune(m, x, 0, steps=bad)
        with pytest.raises(ValueError, match="steps"):
            finetune_loop(m, x, 0, steps=bad)
    with pytest.raises(ValueError, match="lr"):
        finetune(m, x, 0, steps=1, lr=0)
    with pytest.raises(ValueError, match="RGB"):
        finetune(m, torch.rand(2, 1, 32, 32), 0, steps=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        finetune(m, x * 255, 0, steps=1)
    with pytest.raises(TypeError, match="floating"):
        finetune(m, (x * 255).to(torch.uint8), 0, steps=1)
    with pytest.raises(ValueError, match="targets"):
        finetune(m, x, None, steps=1)  # "groundtruth" objective: the class must be given
    with pytest.raises(ValueError, match="targets"):
        finetune(m, x, [0, 9], steps=1)
    with pytest.raises(ValueError, match="mode"):
        finetune(m, x, 0, steps=1, mode="soft")
    with pytest.raises(TypeError, match="LTX"):
        finetune(torch.nn.Linear(2, 2), x, 0, steps=1)


def test_objective_override_equals_a_module_pretrained_with_it(tiny_cnn):
    """objective={...} finetunes with those settings (== a module configured with them) and restores the module."""
    torch.manual_seed(0)
    m = LTXModule(tiny_cnn, finetuning="paper", **SMP_TINY, lambda_mask=5.0, baseline="black")
    other = copy.deepcopy(m)
    other.hparams.update(lambda_mask=1.0, baseline="mean", lambda_inverse=2.0)
    x = torch.rand(2, 3, 32, 32)
    override = {"lambda_mask": 1.0, "baseline": "mean", "lambda_inverse": 2.0}
    got = finetune(m, x, [1, 3], steps=3, lr=1e-2, objective=override)
    want = finetune_loop(other, x, [1, 3], steps=3, lr=1e-2)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(finetune_loop(m, x, [1, 3], steps=3, lr=1e-2, objective=override), want, atol=1e-4)
    plain = finetune(m, x, [1, 3], steps=3, lr=1e-2)
    assert (plain - got).abs().max() > 1e-3  # the override changed the result ...
    assert (m.hparams.lambda_mask, m.hparams.baseline, m.hparams.lambda_inverse) == (5.0, "black", 0.0)  # ... only then
    for bad, match in (({"lr": 1}, "unknown"), ({"baseline": "white"}, "baseline"),
                       ({"lambda_mask": -1}, "lambda_mask"), ({"mask_penalty": "l2"}, "mask_penalty"), ([1], "dict"),
                       ({"kl_scope": "some"}, "kl_scope"), ({"lambda_curve": -1}, "lambda_curve"),
                       ({"curve_areas": [0.1, 1.0]}, "curve_areas"), ({"curve_areas": []}, "curve_areas"),
                       ({"curve_temperature": 0}, "curve_temperature")):
        with pytest.raises((ValueError, TypeError), match=match):
            finetune(m, x, 0, steps=1, objective=bad)


def test_curve_term_against_plain_computation(tiny_cnn):
    """lambda_curve adds, per area a, D(f(x masked by m_a)) + L_inv(f(x masked by 1 - m_a)), averaged over the
    areas, with m_a the soft top-a of the mask: checked against one explanandum call per masked image."""
    import torch.nn.functional as F

    from explainer import losses

    torch.manual_seed(0)
    areas = (0.1, 0.25, 0.5)
    m = LTXModule(tiny_cnn, finetuning="paper", **SMP_TINY, target="kl", kl_scope="target", baseline="mean",
                  lambda_mask=2.0, lambda_inverse=0.5, lambda_curve=3.0, curve_areas=areas,
                  curve_temperature=0.2).eval()
    f = m.explanandum
    x = torch.rand(2, 3, 32, 32)
    z = torch.randn(2, 1, 32, 32) * 2
    t = F.one_hot(torch.tensor([1, 3]), f.num_classes).float()
    with torch.no_grad():
        logits = f(x)
        out = m.objective(x, z, t, logits)
    for i in range(2):
        xi, zi, ti, li = x[i:i + 1], z[i:i + 1], t[i:i + 1], logits[i:i + 1]
        q = torch.quantile(zi.flatten(), torch.tensor([1 - a for a in areas]))
        scale = zi.flatten().std() * 0.2
        parts = []
        for j in range(len(areas)):
            ma = torch.sigmoid((zi - q[j]) / scale)
            with torch.no_grad():
                keep = f(m.mask(xi, ma))
                gone = f(m.mask(xi, 1 - ma))
            p, pk = torch.sigmoid(li[0]), torch.sigmoid(keep[0])
            c = int(ti.argmax())
            kl = p[c] * torch.log(p[c] / pk[c]) + (1 - p[c]) * torch.log((1 - p[c]) / (1 - pk[c]))
            parts.append(kl - torch.log(1 - torch.sigmoid(gone[0, c])))
            # the soft top-a mask covers about the top a of the pixels
            assert abs(float((ma > 0.5).float().mean()) - areas[j]) < 0.02
        assert torch.isclose(out["curve"][i], torch.stack(parts).mean(), rtol=1e-4, atol=1e-5)
    base = out["prediction"] + 2.0 * out["mask"] + 0.5 * out["inverse"]
    assert torch.allclose(out["loss"], base + 3.0 * out["curve"], atol=1e-5)
    # it reads only the ranking: any increasing affine map of the logits gives the same soft masks
    assert torch.allclose(losses.soft_top_area(z, 0.2, 0.1), losses.soft_top_area(3 * z - 1, 0.2, 0.1), atol=1e-5)
