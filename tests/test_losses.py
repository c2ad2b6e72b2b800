"""The Explainer's loss terms against slow, plain re-implementations of docs/METHODS.md section 1."""

import math

import pytest
import torch

from explainer import losses


def test_area_loss_matches_plain_loop():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 4, 10, 7, generator=g)
    select = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    a_min, a_max = 0.1, 0.4
    total = 0.0
    for b in range(3):
        per_image = 0.0
        for c in range(4):
            if not select[b, c]:
                continue
            v = sorted(s[b, c].flatten().tolist(), reverse=True)
            n = len(v)
            k1, k2 = round(a_min * n), round(a_max * n)
            pen = sum(max(0.0, 1 - t) for t in v[:k1]) + sum(max(0.0, t) for t in v[k2:])
            per_image += pen / n
        total += per_image
    expected = total / 3
    assert math.isclose(losses.area_loss(s, select, a_min, a_max).item(), expected, rel_tol=1e-5)
    # the gradient is the plain loss's: -1 on the top a_min pixels below 1, +1 on every pixel ranked past a_max
    s.requires_grad_(True)
    losses.area_loss(s, select, a_min, a_max).backward()
    n = 70
    rank = s.detach().flatten(2).argsort(2, descending=True).argsort(2).view_as(s)
    expect = ((rank >= round(a_max * n)).double() - (rank < round(a_min * n)).double()) / (n * 3)
    expect = expect * select[:, :, None, None]
    torch.testing.assert_close(s.grad.double(), expect, atol=1e-7, rtol=0)
    for a_min, a_max in ((0.0, 0.0), (0.0, 1.0), (1.0, 1.0)):  # the bounds' edge cases, same plain sum
        v = s.detach().flatten(2)[select].sort(1, descending=True).values
        k1, k2 = round(a_min * n), round(a_max * n)
        plain = ((1 - v[:, :k1]).clamp(min=0).sum() + v[:, k2:].clamp(min=0).sum()) / n / 3
        assert math.isclose(losses.area_loss(s.detach(), select, a_min, a_max).item(), plain.item(), abs_tol=1e-6)


def test_total_variation_matches_plain_loop():
    m = torch.rand(2, 1, 5, 6)
    h = sum(abs(m[b, 0, i, j] - m[b, 0, i, j + 1]) for b in range(2) for i in range(5) for j in range(5)) / (2 * 5 * 5)
    v = sum(abs(m[b, 0, i, j] - m[b, 0, i + 1, j]) for b in range(2) for i in range(4) for j in range(6)) / (2 * 4 * 6)
    assert torch.allclose(losses.total_variation(m), h + v)


def test_tail_loss_matches_plain_loop_and_pushes_only_faint_pixels():
    g = torch.Generator().manual_seed(2)
    S = (torch.randn(2, 3, 4, 5, generator=g) * 5).requires_grad_()
    select = torch.tensor([[True, False, True], [False, True, False]])
    t = 4.0
    expected = sum(min(max(S[b, c, i, j].item() + t, 0.0), t) / t for b in range(2) for c in range(3) if select[b, c]
                   for i in range(4) for j in range(5)) / 20 / 2
    loss = losses.tail_loss(S, select, t)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    loss.backward()
    faint = (S > -t) & (S < 0) & select[:, :, None, None]
    assert torch.allclose(S.grad[faint], torch.full_like(S.grad[faint], 1 / t / 20 / 2))
    assert (S.grad[~faint] == 0).all()  # on pixels and pixels already off feel nothing
    with pytest.raises(ValueError, match="tail_logit"):
        losses.tail_loss(S, select, 0.0)


def test_masked_max_and_entropy_axioms():
    S = torch.randn(2, 3, 4, 4)
    sel = torch.tensor([[True, False, True], [False, False, False]])
    mm = losses.masked_max(S, sel)
    assert torch.equal(mm[0, 0], torch.maximum(S[0, 0], S[0, 2]))
    assert torch.sigmoid(mm[1]).max() < 1e-6  # no class selected: an empty mask
    # the negative entropy is minimal (-log C) at a uniform prediction, 0 at a one-hot one
    assert math.isclose(losses.negative_entropy(torch.zeros(1, 5)).item(), -math.log(5), rel_tol=1e-6)
    assert losses.negative_entropy(torch.tensor([[100.0, 0, 0]])).item() > -1e-6


def test_counterfactual_modes():
    t = torch.tensor([[2.0, -1.0, 0.5]])
    # KL of a prediction to itself is zero, positive elsewhere (single- and multi-label)
    for ml in (False, True):
        assert abs(losses.counterfactual_loss(t, t, "kl", ml).item()) < 1e-6
        assert losses.counterfactual_loss(torch.zeros(1, 3), t, "kl", ml).item() > 0
    ce = losses.counterfactual_loss(t, t, "predicted", False)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(t, torch.tensor([0])))


def test_counterfactual_kl_of_target_classes_against_plain_formula():
    g = torch.Generator().manual_seed(0)
    t, lm = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3, torch.randn(4, 5, generator=g,
                                                                                  dtype=torch.float64) * 3
    classes = torch.zeros(4, 5)
    classes[0, 1] = classes[1, 0] = classes[1, 3] = classes[3, 4] = 1  # image 2 has none: 0
    for ml in (False, True):
        p, q = (torch.sigmoid(t), torch.sigmoid(lm)) if ml else (t.softmax(1), lm.softmax(1))
        want = torch.zeros(4, dtype=torch.float64)
        for b, c in classes.nonzero().tolist():  # binary KL of each kept class's probability
            pb, qb = float(p[b, c]), float(q[b, c])
            want[b] += pb * math.log(pb / qb) + (1 - pb) * math.log((1 - pb) / (1 - qb))
        got = losses.counterfactual_loss(lm, t, "kl", ml, reduction="none", classes=classes)
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6), (ml, got, want)
        # another class's probability moving does not count; the kept class's does
        moved = lm.clone()
        moved[0, 2] += 5
        assert torch.isclose(losses.counterfactual_loss(moved, t, "kl", True, "none", classes)[0],
                             losses.counterfactual_loss(lm, t, "kl", True, "none", classes)[0])
        assert losses.counterfactual_loss(t, t, "kl", ml, "none", classes).abs().max() < 1e-5
    with pytest.raises(ValueError, match="classes: expected multi-hot"):
        losses.counterfactual_loss(lm, t, "kl", True, classes=classes[:, :3])
