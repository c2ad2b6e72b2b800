"""Per-image refinement of any kind (explainer.explainers.refine): the batched run equals the plain per-row loop and
a hand-written AdamW step; an LTX module's refinement equals LTX's finetuning; steps=0 gives the module's own masks;
the module is left unchanged; bad input is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_DECODER

from explainer.explainers import DistillModule, ExplainerModule, LTXModule
from explainer.explainers.ltx_finetune import finetune, finetune_loop
from explainer.explainers.ltx_settings import FINETUNE_PRESETS, LTXObjective
from explainer.explainers.refine import REFINE_DEFAULTS, refine_masks, refine_masks_loop, refine_settings

SMP_TINY = dict(network="smp", encoder="tu-explainer_resnet_tiny",
                decoder_kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
UNET_TINY = dict(architecture="Unet", encoder="tu-explainer_resnet_tiny", decoder_kwargs=TINY_DECODER)


def build(which: str, f):
    torch.manual_seed(0)
    if which == "explainer":
        return ExplainerModule(f, **UNET_TINY)
    if which == "distill":  # no teacher needed to build it; output_grid: the masks are smoothed at inference
        return DistillModule(f, **UNET_TINY, output_grid=4)
    if which == "ltx":
        return LTXModule(f, finetuning="paper", lambda_mask=5.0, **SMP_TINY)
    if which == "ltx-agnostic-kl":  # records the "validated" finetuning settings (curve term, mode "predicted")
        return LTXModule(f, class_agnostic=True, target="kl", **SMP_TINY)
    raise AssertionError(which)


def rows():
    """Three rows of two 32-px images: the first image twice, with two classes."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return x[torch.tensor([0, 0, 1])], torch.tensor([1, 3, 1])


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, before) -> bool:
    now = module.state_dict()
    return now.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in now.items())


@pytest.mark.parametrize("which", ["explainer", "distill"])
def test_batched_equals_loop_and_leaves_module_unchanged(which, tiny_cnn):
    m = build(which, tiny_cnn)
    x, t = rows()
    pre = m.explain(x, t)
    m.train()  # refinement must put the network in eval mode (frozen BN statistics) and back
    before = _state(m)
    got = refine_masks(m, x, t, steps=3, lr=1e-3, batch_size=2)  # two chunks: rows 0-1, then row 2
    assert _unchanged(m, before)
    assert m.net.training and not m.explanandum.training
    want = refine_masks_loop(m, x, t, steps=3, lr=1e-3)
    assert _unchanged(m, before)
    assert got.shape == (3, 1, 32, 32) and got.dtype == torch.float32
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    assert ((got > 0.05) & (got < 0.95)).float().mean() > 0.1, "degenerate masks: a weak comparison"
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (got - pre).abs().max() > 1e-3  # the steps did something
    assert (got[0] - got[1]).abs().max() > 1e-3  # the same image, another class: another mask
    # a row's result does not depend on the other rows nor on the chunking
    assert torch.allclose(refine_masks(m, x[2:], t[2:], steps=3, lr=1e-3), got[2:], atol=1e-5)


def test_one_step_by_hand(tiny_cnn):
    """One step for an Explainer with an explicit objective, written out: the objective's baseline (black), not
    the module's (mean), BCE to the row's class summed over classes (a multi-label explanandum), l_mask mean(m)."""
    m = build("explainer", tiny_cnn).eval()
    f = m.explanandum
    x, t = rows()
    obj = {"baseline": "black", "lambda_mask": 2.0, "lambda_curve": 0.0, "lambda_inverse": 0.0}
    got = refine_masks(m, x, t, steps=1, lr=1e-2, settings={"objective": obj})
    assert ((got > 0.05) & (got < 0.95)).float().mean() > 0.1, "degenerate masks: a weak comparison"
    assert (got - m.explain(x, t)).abs().max() > 1e-3  # the step did something
    for i in range(3):
        xi, c = x[i:i + 1], int(t[i])
        net = copy.deepcopy(m.net).eval()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=m.weight_decay, foreach=False)
        mask = torch.sigmoid(m.mask_logits(xi, net=net)[:, c:c + 1])
        onehot = F.one_hot(torch.tensor([c]), m.num_classes).float()
        loss = F.binary_cross_entropy_with_logits(f(mask * xi), onehot, reduction="sum") + 2.0 * mask.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            want = torch.sigmoid(m.mask_logits(xi, net=net)[:, c:c + 1])
        assert torch.allclose(got[i:i + 1], want, atol=1e-5), (got[i:i + 1] - want).abs().max()


@pytest.mark.parametrize("which", ["ltx", "ltx-agnostic-kl"])
def test_ltx_refinement_is_ltx_finetuning(which, tiny_cnn):
    m = build(which, tiny_cnn)
    x, t = rows()
    before = _state(m)
    got = refine_masks(m, x, t, steps=2, lr=1e-3)
    assert ((got > 0.05) & (got < 0.95)).float().mean() > 0.1, "degenerate masks: a weak comparison"
    assert torch.allclose(got, finetune(m, x, t, steps=2, lr=1e-3), atol=1e-6)
    assert torch.allclose(refine_masks_loop(m, x, t, steps=2, lr=1e-3), finetune_loop(m, x, t, steps=2, lr=1e-3),
                          atol=1e-6)
    # settings: a preset, and the objective replaced, as finetune takes them
    obj = {"lambda_mask": 1.0, "baseline": "mean", "lambda_inverse": 2.0}
    assert torch.allclose(refine_masks(m, x, t, steps=2, lr=1e-3, settings={"objective": obj}),
                          finetune(m, x, t, steps=2, lr=1e-3, objective=obj), atol=1e-6)
    assert torch.allclose(refine_masks(m, x, t, steps=1, settings="validated"),
                          finetune(m, x, t, steps=1, preset="validated"), atol=1e-6)
    assert _unchanged(m, before)


@pytest.mark.parametrize("which", ["explainer", "distill", "ltx", "ltx-agnostic-kl"])
def test_zero_steps_are_the_modules_own_masks(which, tiny_cnn):
    m = build(which, tiny_cnn).eval()
    x, t = rows()
    own = m.explain(x, t)
    if which != "ltx-agnostic-kl":  # one map per class: the rows of one image with two classes differ
        assert (own[0] - own[1]).abs().max() > 1e-3
    assert torch.allclose(refine_masks(m, x, t, steps=0), own, atol=1e-6)
    assert torch.allclose(refine_masks_loop(m, x, t, steps=0), own, atol=1e-6)


def test_settings_of_each_kind(tiny_cnn):
    validated = FINETUNE_PRESETS["validated"]
    st = refine_settings(build("explainer", tiny_cnn))
    assert (st.steps, st.lr, st.mode) == (validated["steps"], validated["lr"], "groundtruth")
    assert (st.steps, st.lr) == (10, 1e-4)
    assert st.objective == LTXObjective(**validated["objective"])
    assert (st.objective.baseline, st.objective.lambda_curve, st.objective.lambda_mask) == ("mean", 3.0, 50.0)
    assert REFINE_DEFAULTS["objective"] == validated["objective"]
    paper = refine_settings(build("distill", tiny_cnn), "paper", steps=0, lr=0.5)
    assert (paper.steps, paper.lr, paper.mode, paper.objective) == (0, 0.5, "groundtruth", LTXObjective())
    ltx = build("ltx", tiny_cnn)  # its own recorded settings ("paper") and its own objective (lambda_mask 5)
    st = refine_settings(ltx)
    assert (st.steps, st.lr, st.mode, st.objective.lambda_mask) == (25, 2e-3, "groundtruth", 5.0)


def test_inference_mode_and_empty_input(tiny_cnn):
    m = build("explainer", tiny_cnn)
    x, t = rows()
    with torch.inference_mode():
        out = refine_masks(m, x[:1], t[:1], steps=1, lr=1e-2)
    assert out.shape == (1, 1, 32, 32)
    assert torch.allclose(out, refine_masks_loop(m, x[:1], t[:1], steps=1, lr=1e-2), atol=1e-5)
    assert refine_masks(m, x[:0], t[:0], steps=1).shape == (0, 1, 32, 32)


@pytest.mark.parametrize("fn", [refine_masks, refine_masks_loop])
def test_errors(fn, tiny_cnn):
    m = build("explainer", tiny_cnn)
    x, t = rows()
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="steps"):
            fn(m, x, t, steps=bad)
    for bad in (0, -1e-3, float("inf")):
        with pytest.raises(ValueError, match="lr"):
            fn(m, x, t, steps=1, lr=bad)
    for bad in (torch.tensor([0, 1, 4]), torch.tensor([0, -1, 1]), torch.tensor([0, 1]), torch.zeros(3, 1).long(),
                None):
        with pytest.raises(ValueError, match="classes"):
            fn(m, x, bad, steps=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        fn(m, x[:, :1], t, steps=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        fn(m, x[0], t[:1], steps=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn(m, x * 255, t, steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        fn(m, x, t, steps=1, batch_size=0)
    with pytest.raises(ValueError, match="settings"):
        fn(m, x, t, settings="fast")
    with pytest.raises(ValueError, match="unknown"):
        fn(m, x, t, settings={"weight_decay": 0.1})
    with pytest.raises(ValueError, match="mode"):
        fn(m, x, t, settings={"mode": "soft"})
    with pytest.raises(TypeError, match="trained explainer"):
        fn(torch.nn.Linear(2, 2), x, t, steps=1)
