"""explainer.metrics: each metric against a plain per-image loop, void handling, directions, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import explainer
from explainer import metrics as M
from explainer.core.masking import baseline_image


# --------------------------------------------------------------------------- helpers
class LinearPixelModel(nn.Module):
    """logit_c(x) = sum_{k,i,j} W[c,k,i,j] x[k,i,j] + b_c: every pixel's contribution is known exactly."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]) if bias is None else bias.clone())

    def forward(self, x):
        return torch.einsum("bkhw,ckhw->bc", x, self.weight) + self.bias


def linear_explanandum(weight, bias=None, multilabel=True):
    return explainer.Explanandum(LinearPixelModel(weight, bias), weight.shape[0], multilabel=multilabel,
                                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def contributions(f, x, target):
    """The exact per-pixel contribution of each pixel to the target logit (the perfect map), (N, 1, H, W)."""
    w = f.model.weight[torch.as_tensor(target)]
    return (w * x).sum(1, keepdim=True)


def rand_maps(n, h, w, seed=1):
    return torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))


def slow_rise(f, x, maps, target, mode, steps, baseline):
    """RISE's CausalMetric, one image and one step at a time (numpy ordering, in-place pixel copies)."""
    out = []
    hw = x.shape[-1] * x.shape[-2]
    step = math.ceil(hw / steps)
    n = math.ceil(hw / step)
    base = baseline_image(x, baseline, f.mean.flatten())
    for i in range(x.shape[0]):
        order = np.argsort(-maps[i].flatten().numpy(), kind="stable")
        if mode == "del":
            start, finish = x[i].clone(), base[i].clone()
        else:
            start, finish = base[i].clone(), x[i].clone()
        scores = []
        for k in range(n + 1):
            with torch.no_grad():
                scores.append(float(f.probabilities(f(start[None]))[0, target[i]]))
            if k < n:
                idx = torch.from_numpy(order[k * step:(k + 1) * step].copy())
                start.view(3, -1)[:, idx] = finish.view(3, -1)[:, idx]
        # trapezoid over the actual removed fractions (the last step may be shorter; issue 14)
        out.append(np.trapezoid(scores, np.minimum(np.arange(n + 1) * step, hw) / hw))
    return torch.tensor(out)


# --------------------------------------------------------------------------- deletion / insertion
@pytest.mark.parametrize("baseline", ["mean", "black", "blur"])
def test_deletion_insertion_match_per_image_loop(tiny_cnn, baseline):
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    maps = rand_maps(3, 20, 20)
    target = [0, 2, 3]
    slow_d = slow_rise(tiny_cnn, x, maps, target, "del", 12, baseline)
    slow_i = slow_rise(tiny_cnn, x, maps, target, "ins", 12, baseline)
    for max_batch in (1, 7, 1000):
        d = M.deletion_auc(tiny_cnn, x, maps, target, baseline=baseline, steps=12, max_batch=max_batch)
        i = M.insertion_auc(tiny_cnn, x, maps, target, baseline=baseline, steps=12, max_batch=max_batch)
        torch.testing.assert_close(d.double(), slow_d.double(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(i.double(), slow_i.double(), atol=1e-5, rtol=1e-5)


def test_rise_schedule_and_curve_ends(tiny_cnn):
    counts = M.rise_counts(400, 12)  # ceil(400/12) = 34 px per step, 12 steps
    assert counts[0] == 0 and counts[-1] == 400 and len(counts) == 13 and counts[1] == 34
    x = torch.rand(2, 3, 20, 20)
    _, curves = M.deletion_auc(tiny_cnn, x, rand_maps(2, 20, 20), 1, baseline="black", steps=12,
                               return_curves=True)
    with torch.no_grad():
        p_x = tiny_cnn.probabilities(tiny_cnn(x))[:, 1]
        p_b = tiny_cnn.probabilities(tiny_cnn(torch.zeros_like(x)))[:, 1]
    torch.testing.assert_close(curves[:, 0], p_x)  # intact image first
    torch.testing.assert_close(curves[:, -1], p_b)  # all deleted last


def test_predicted_target_is_default(tiny_cnn):
    x = torch.rand(2, 3, 16, 16)
    maps = rand_maps(2, 16, 16)
    with torch.no_grad():
        pred = tiny_cnn(x).argmax(1)
    torch.testing.assert_close(M.deletion_auc(tiny_cnn, x, maps, None, steps=8),
                               M.deletion_auc(tiny_cnn, x, maps, pred, steps=8))


# --------------------------------------------------------------------------- POS / NEG
def slow_pos_neg(f, x, maps, target, positive, fractions, score):
    out = []
    hw = x.shape[-1] * x.shape[-2]
    base = baseline_image(x, "mean", f.mean.flatten())
    for i in range(x.shape[0]):
        m = maps[i].flatten().numpy()
        order = np.argsort(-m, kind="stable") if positive else np.argsort(m, kind="stable")
        vals = []
        for r in fractions:
            img = x[i].clone()
            idx = torch.from_numpy(order[:int(round(r * hw))].copy())
            img.view(3, -1)[:, idx] = base[i].reshape(3, -1)[:, idx]
            with torch.no_grad():
                logits = f(img[None])[0]
            if score == "accuracy":
                vals.append(float(logits[target[i]] > 0) if f.multilabel else float(logits.argmax() == target[i]))
            else:
                vals.append(float(f.probabilities(logits[None])[0, target[i]]))
        out.append(100 * np.trapezoid(vals, fractions))
    return torch.tensor(out)


@pytest.mark.parametrize("score", ["accuracy", "probability"])
@pytest.mark.parametrize("multilabel", [True, False])
def test_pos_neg_match_per_image_loop(score, multilabel):
    torch.manual_seed(0)
    f = linear_explanandum(torch.randn(3, 3, 12, 12) * 0.05, multilabel=multilabel)
    x = torch.rand(4, 3, 12, 12)
    maps = rand_maps(4, 12, 12)
    t = [0, 1, 2, 1]
    fr = M.perturbation.POS_NEG_FRACTIONS
    pos = M.pos_auc(f, x, maps, t, score=score, max_batch=5)
    neg = M.neg_auc(f, x, maps, t, score=score, max_batch=5)
    torch.testing.assert_close(pos.double(), slow_pos_neg(f, x, maps, t, True, fr, score).double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(neg.double(), slow_pos_neg(f, x, maps, t, False, fr, score).double(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- ADP / PIC, saliency
def test_adp_pic_match_per_image_loop(tiny_cnn):
    x = torch.rand(4, 3, 16, 16)
    maps = torch.randn(4, 1, 16, 16)
    adp, pic = M.adp_pic(tiny_cnn, x, maps, [0, 1, 2, 3], baseline="black", max_batch=3)
    for i in range(4):
        m = maps[i]
        m = (m - m.min()) / (m.max() - m.min())
        with torch.no_grad():
            y = float(tiny_cnn.probabilities(tiny_cnn(x[i:i + 1]))[0, i])
            o = float(tiny_cnn.probabilities(tiny_cnn((x[i] * m)[None]))[0, i])
        assert adp[i].item() == pytest.approx(100 * max(0.0, y - o) / y, abs=1e-4)
        assert pic[i].item() == (100.0 if o > y else 0.0)


def test_saliency_metric_matches_formula(tiny_cnn):
    x = torch.rand(3, 3, 16, 16)
    masks = torch.rand(3, 1, 16, 16) * 0.1  # small area: the 0.05 floor matters for some
    masks[0] = 1.0
    classes = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
    got = M.saliency_metric(tiny_cnn, x, masks, classes, normalize=False)
    for i in range(3):
        a = max(float(masks[i].mean()), 0.05)
        xm = masks[i] * x[i] + (1 - masks[i]) * tiny_cnn.mean[0]
        with torch.no_grad():
            p = tiny_cnn.probabilities(tiny_cnn(xm[None]))[0]
        expect = math.log(a) - math.log(float(p[classes[i].bool()].sum()))
        assert got[i].item() == pytest.approx(expect, abs=1e-4)


# --------------------------------------------------------------------------- localisation
def slow_pointing(maps, gt, target, tol=15):
    hits, valid = [], []
    for i in range(maps.shape[0]):
        m = maps[i, 0].numpy()
        cls = gt[i].numpy() == target[i] + 1
        v = int(np.unravel_index(np.argmax(m), m.shape)[0]), int(np.unravel_index(np.argmax(m), m.shape)[1])
        hit = False
        for yy in range(m.shape[0]):
            for xx in range(m.shape[1]):
                if cls[yy, xx] and (yy - v[0]) ** 2 + (xx - v[1]) ** 2 < tol ** 2:
                    hit = True
        hits.append(hit)
        valid.append(bool(cls.any()))
    return torch.tensor(hits), torch.tensor(valid)


def random_gt(n, h, w, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    gt = torch.zeros(n, h, w, dtype=torch.long)
    for i in range(n):
        for c in range(classes):
            y0, x0 = torch.randint(0, h - 8, (2,), generator=g).tolist()
            gt[i, y0:y0 + 8, x0:x0 + 6] = c + 1
            gt[i, y0, x0:x0 + 6] = 255  # a void band on the object's edge
    return gt


def test_pointing_game_matches_loop_with_void():
    n, h, w = 6, 40, 40
    gt = random_gt(n, h, w)
    maps = rand_maps(n, h, w, seed=3)
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    hit, valid = M.pointing_game(maps, gt, t, tolerance=12)
    sh, sv = slow_pointing(maps, gt, t.tolist(), tol=12)
    assert torch.equal(hit, sh) and torch.equal(valid, sv)
    assert 0 < int(hit.sum()) < n  # a case with both hits and misses, so the comparison means something


def test_pointing_void_is_never_foreground():
    gt = torch.zeros(2, 64, 64, dtype=torch.long)
    gt[:, 50:60, 50:60] = 1  # class 0 in the lower right
    gt[:, 0:10, 0:10] = 255  # a void area far from it
    maps = torch.zeros(2, 1, 64, 64)
    maps[0, 0, 5, 5] = 1.0  # peak on void, > 15 px from the object
    maps[1, 0, 55, 55] = 1.0  # peak on the object
    hit, valid = M.pointing_game(maps, gt, 0)
    assert valid.all() and hit.tolist() == [False, True]
    # a class absent from the mask is not evaluated (neither hit nor miss)
    hit2, valid2 = M.pointing_game(maps, gt, 3)
    assert not valid2.any() and not hit2.any()
    assert M.pointing_accuracy(torch.tensor([True, False, True]), torch.tensor([True, True, True]),
                               torch.tensor([0, 0, 1])) == pytest.approx((0.5 + 1.0) / 2)


def slow_ap(score, y):
    order = np.argsort(-score, kind="stable")
    y = y[order]
    tp = np.cumsum(y)
    prec = tp / np.arange(1, len(y) + 1)
    return float((prec * y).sum() / y.sum())


def slow_auroc(score, y):
    pos, neg = score[y == 1], score[y == 0]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


def test_segmentation_matches_loop_and_ignores_void():
    n, h, w = 5, 24, 24
    gt = random_gt(n, h, w, seed=4)
    maps = torch.randn(n, 1, h, w) + 2 * (gt == 1).unsqueeze(1).float()
    t = torch.tensor([0, 0, 1, 2, 0])
    st = M.segmentation_stats(maps, gt, t)
    summ = M.segmentation_summary(st)
    tot = np.zeros(4)
    f1s, f1f, ious, aps, aucs = [], [], [], [], []
    for i in range(n):
        m = maps[i, 0].numpy().astype(np.float64)
        m = (m - m.min()) / (m.max() - m.min())
        known = gt[i].numpy() != 255
        fg = (gt[i].numpy() == t[i].item() + 1)[known]
        s = m[known]

        def counts(pred, fg=fg):
            return np.array([(pred & fg).sum(), (pred & ~fg).sum(), (~pred & ~fg).sum(), (~pred & fg).sum()])

        c = counts(s > m.mean())
        tot += c
        assert [st[k][i].item() for k in ("tp", "fp", "tn", "fn")] == c.tolist()
        assert c.sum() == known.sum()  # void pixels neither foreground nor background
        f1s.append(2 * c[0] / (2 * c[0] + c[1] + c[3]))
        f1f.append(np.mean([2 * cc[0] / (2 * cc[0] + cc[1] + cc[3]) for cc in (counts(s > th) for th in
                                                                              (0.25, 0.5, 0.75))]))
        ious.append(np.mean([cc[0] / (cc[0] + cc[1] + cc[3]) for cc in (counts(s > th) for th in
                                                                        np.arange(1, 10) / 10)]))
        aps.append(slow_ap(s, fg.astype(np.float64)))
        aucs.append(slow_auroc(s, fg.astype(np.float64)))
    tp, fp, tn, fn = tot
    assert summ["pixel_accuracy"] == pytest.approx((tp + tn) / tot.sum())
    assert summ["miou"] == pytest.approx((tp / (tp + fp + fn) + tn / (tn + fn + fp)) / 2)
    assert summ["f1"] == pytest.approx(np.mean(f1s))
    assert summ["f1_fixed"] == pytest.approx(np.mean(f1f))
    assert summ["iou_fixed"] == pytest.approx(np.mean(ious))
    assert summ["pixel_ap"] == pytest.approx(np.mean(aps), abs=1e-5)
    assert summ["pixel_auroc"] == pytest.approx(np.mean(aucs), abs=1e-5)


def test_void_band_marked_or_not_scores_the_same():
    gt = torch.zeros(1, 32, 32, dtype=torch.long)
    gt[0, 8:20, 8:20] = 255  # void band around the object
    gt[0, 10:18, 10:18] = 1
    obj = (gt == 1).float().unsqueeze(1)
    with_void = (gt != 0).float().unsqueeze(1)  # object + its void band
    for m in (obj, with_void):
        summ = M.segmentation_summary(M.segmentation_stats(m, gt, 0))
        assert summ["miou"] == pytest.approx(1.0) and summ["f1"] == pytest.approx(1.0)
        assert summ["pixel_accuracy"] == pytest.approx(1.0) and summ["pixel_ap"] == pytest.approx(1.0)


def test_pairs_without_class_pixels_are_not_evaluated():
    gt = torch.zeros(2, 16, 16, dtype=torch.long)
    gt[0, 2:6, 2:6] = 1
    st = M.segmentation_stats(rand_maps(2, 16, 16), gt, [0, 0])
    assert st["valid"].tolist() == [True, False]
    assert M.segmentation_summary({k: v[1:] for k, v in st.items()}) == {}


# --------------------------------------------------------------------------- directions
def make_direction_case(multilabel=True):
    """A linear model whose pixels push class 0 up (left half) and down (right half), and the exact map."""
    torch.manual_seed(0)
    h = w = 16
    weight = torch.zeros(2, 3, h, w)
    weight[0, :, :, : w // 2] = torch.rand(3, h, w // 2) * 0.08
    weight[0, :, :, w // 2:] = -torch.rand(3, h, w // 2) * 0.04
    weight[1] = -weight[0]
    f = linear_explanandum(weight, torch.tensor([-3.0, 3.0]), multilabel=multilabel)
    x = torch.rand(4, 3, h, w) * 0.5 + 0.5
    perfect = contributions(f, x, [0] * 4)
    return f, x, perfect, -perfect


def test_direction_of_every_perturbation_metric():
    f, x, good, bad = make_direction_case()
    kw = dict(baseline="black")
    assert (M.deletion_auc(f, x, good, 0, steps=16, **kw) < M.deletion_auc(f, x, bad, 0, steps=16, **kw)).all()
    assert (M.insertion_auc(f, x, good, 0, steps=16, **kw) > M.insertion_auc(f, x, bad, 0, steps=16, **kw)).all()
    for score in ("probability", "accuracy"):
        pg, pb = M.pos_auc(f, x, good, 0, score=score, **kw), M.pos_auc(f, x, bad, 0, score=score, **kw)
        ng, nb = M.neg_auc(f, x, good, 0, score=score, **kw), M.neg_auc(f, x, bad, 0, score=score, **kw)
        assert (pg <= pb).all() and (pg < pb).any()
        assert (ng >= nb).all() and (ng > nb).any()
    adp_g, pic_g = M.adp_pic(f, x, good, 0, **kw)
    adp_b, pic_b = M.adp_pic(f, x, bad, 0, **kw)
    assert (adp_g < adp_b).all() and pic_g.mean() > pic_b.mean()
    assert M.get("deletion_auc").direction == "lower" and M.get("insertion_auc").direction == "higher"
    assert M.get("pos_auc").direction == "lower" and M.get("neg_auc").direction == "higher"
    assert M.get("adp").direction == "lower" and M.get("pic").direction == "higher"


def region_model():
    """Two classes; logit_c = 40 * (mean red in region R_c) - 10. R_0 top-left, R_1 bottom-right."""
    h = w = 16
    weight = torch.zeros(2, 3, h, w)
    weight[0, 0, :6, :6] = 40 / 36
    weight[1, 0, 10:, 10:] = 40 / 36
    f = linear_explanandum(weight, torch.tensor([-10.0, -10.0]))
    x = torch.zeros(2, 3, h, w)
    x[:, 0, :6, :6] = 1
    x[:, 0, 10:, 10:] = 1
    r = torch.zeros(2, 1, h, w)
    r[0, 0, :6, :6] = 1
    r[1, 0, 10:, 10:] = 1
    return f, x, r


def test_direction_of_saliency_metric_and_class_specificity():
    f, x, r = region_model()
    classes = torch.tensor([0, 1])
    good = M.saliency_metric(f, x, r, classes, baseline="black")
    bad = M.saliency_metric(f, x, 1 - r, classes, baseline="black")
    assert (good < bad).all() and M.get("saliency_metric").direction == "lower"
    s_good = M.class_specificity(f, x[0], r, [0, 1], baseline="black")
    s_swap = M.class_specificity(f, x[0], r.flip(0), [0, 1], baseline="black")
    eye = torch.eye(2, dtype=torch.bool)
    assert s_good[eye].mean() - s_good[~eye].mean() > s_swap[eye].mean() - s_swap[~eye].mean()
    assert s_good[eye].min() > 0.99 and s_good[~eye].max() < 0.01
    assert M.get("class_specificity").direction == "higher"


def test_direction_of_localisation_metrics():
    gt = torch.zeros(2, 40, 40, dtype=torch.long)
    gt[:, 2:10, 2:10] = 1
    gt[:, 1, 1:11] = 255
    good = (gt == 1).float().unsqueeze(1) + 0.01 * rand_maps(2, 40, 40)
    bad = 1 - good
    hit_g, _ = M.pointing_game(good, gt, 0)
    hit_b, _ = M.pointing_game(bad, gt, 0)
    assert hit_g.all() and not hit_b.any()
    sg = M.segmentation_summary(M.segmentation_stats(good, gt, 0))
    sb = M.segmentation_summary(M.segmentation_stats(bad, gt, 0))
    for k in ("pixel_accuracy", "miou", "f1", "f1_fixed", "iou_fixed", "pixel_ap", "pixel_auroc"):
        assert sg[k] > sb[k] and M.get(k).direction == "higher", k


def test_randomisation_sanity_direction(tiny_cnn):
    """A model-independent 'explanation' fails the sanity check (correlation 1); the gradient passes it."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    class Gradient:
        def __init__(self, f):
            self.f = f

        def attribute(self, x, target):
            x = x.clone().requires_grad_(True)
            self.f(x)[torch.arange(len(x)), torch.as_tensor(target)].sum().backward()
            return x.grad.abs().sum(1, keepdim=True)

    class Edges:
        def __init__(self, f):
            pass

        def attribute(self, x, target):
            edges = (x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True)
            return torch.nn.functional.pad(edges, (0, 0, 0, 1))

    r_grad = M.model_randomization(Gradient, tiny_cnn, x, [0, 1])
    r_edge = M.model_randomization(Edges, tiny_cnn, x, [0, 1])
    torch.testing.assert_close(r_edge, torch.ones(2, dtype=torch.float64))
    assert (r_grad < 0.9).all()
    assert M.get("randomization_spearman").direction == "lower"
    # the original model is untouched and the copy differs
    g = M.randomize_explanandum(tiny_cnn, seed=1)
    p0 = dict(tiny_cnn.named_parameters())
    assert any(not torch.equal(p, p0[k]) for k, p in g.named_parameters())
    g1 = M.randomize_explanandum(tiny_cnn, cascade=1, seed=1)
    diff = [k for k, p in g1.named_parameters() if not torch.equal(p, p0[k])]
    assert diff and all(k.startswith("model.fc") for k in diff)


def test_rank_correlation_plain():
    a = rand_maps(3, 8, 8)
    b = rand_maps(3, 8, 8, seed=9)
    got = M.rank_correlation(a, b)
    for i in range(3):
        ra = np.argsort(np.argsort(a[i].flatten().numpy())).astype(float)
        rb = np.argsort(np.argsort(b[i].flatten().numpy())).astype(float)
        assert got[i].item() == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-5)
    torch.testing.assert_close(M.rank_correlation(a, -a), -torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------- errors
def test_clear_errors(tiny_cnn):
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="maps"):
        M.deletion_auc(tiny_cnn, x, torch.rand(2, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="maps"):
        M.insertion_auc(tiny_cnn, x, torch.rand(3, 1, 16, 16), 0)
    nan = torch.rand(2, 1, 16, 16)
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        M.adp_pic(tiny_cnn, x, nan, 0)
    with pytest.raises(ValueError, match="NaN"):
        M.segmentation_stats(nan, torch.zeros(2, 16, 16, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        M.get("nope")
    with pytest.raises(ValueError, match="unknown metric"):
        M.MetricTracker(["deletion_auc", "nope"])
    with pytest.raises(ValueError, match="target"):
        M.deletion_auc(tiny_cnn, x, torch.rand(2, 1, 16, 16), 7)
    with pytest.raises(ValueError, match="max_batch"):
        M.deletion_auc(tiny_cnn, x, torch.rand(2, 1, 16, 16), 0, max_batch=0)
    with pytest.raises(ValueError, match="baseline"):
        M.deletion_auc(tiny_cnn, x, torch.rand(2, 1, 16, 16), 0, baseline="white")
    with pytest.raises(ValueError, match="gt"):
        M.pointing_game(torch.rand(2, 1, 16, 16), torch.zeros(2, 8, 8, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="unknown option"):
        M.MetricTracker(["deletion_auc"], {"deletion_auc": {"stepz": 3}})


# --------------------------------------------------------------------------- tracker
def test_tracker_batches_equal_whole_and_skips_without_masks(tiny_cnn):
    x = torch.rand(4, 3, 16, 16)
    maps = rand_maps(4, 16, 16)
    gt = random_gt(4, 16, 16, classes=2)[:, :, :]
    t = torch.tensor([0, 1, 0, 1])
    names = ["deletion_auc", "pos_auc", "adp", "pic", "pointing_game", "miou", "f1", "saliency_metric"]
    opts = {"deletion_auc": {"steps": 8}, "pointing_game": {"tolerance": 3}}

    def batch(sl, with_gt=True):
        return M.PairBatch(tiny_cnn, x[sl], maps[sl], t[sl], torch.arange(4)[sl], gt[sl] if with_gt else None,
                           torch.ones(4, dtype=torch.bool)[sl], "mean", 5)

    whole = M.MetricTracker(names, opts)
    whole.update(batch(slice(0, 4)))
    parts = M.MetricTracker(names, opts)
    parts.update(batch(slice(0, 1)))
    parts.update(batch(slice(1, 4)))
    v1, s1 = whole.compute()
    v2, s2 = parts.compute()
    assert not s1 and set(v1) == set(names)
    for k in names:
        assert v1[k] == pytest.approx(v2[k], abs=1e-5), k
    assert v1["deletion_auc"] == pytest.approx(float(M.deletion_auc(tiny_cnn, x, maps, t, steps=8).mean()), abs=1e-6)

    nomask = M.MetricTracker(["miou", "pointing_game", "deletion_auc"])
    nomask.update(M.PairBatch(tiny_cnn, x, maps, t, torch.arange(4), gt, torch.zeros(4, dtype=torch.bool)))
    with pytest.warns(UserWarning, match="skipped"):
        vals, skipped = nomask.compute()
    assert set(vals) == {"deletion_auc"}
    assert set(skipped) == {"miou", "pointing_game"} and "no ground-truth" in skipped["miou"]
    assert M.describe(["miou"])["miou"]["direction"] == "higher"


def test_tracker_class_specificity_and_saliency_group_pairs_by_image(tiny_cnn):
    x1 = torch.rand(3, 3, 16, 16)
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    x = x1[ids]
    maps = rand_maps(6, 16, 16, seed=2)
    t = torch.tensor([0, 2, 1, 2, 3, 0])
    tr = M.MetricTracker(["class_specificity", "saliency_metric"])
    tr.update(M.PairBatch(tiny_cnn, x, maps, t, ids, max_batch=4))
    vals, _ = tr.compute()
    expect = []
    for g in ([0, 1], [2, 3, 4]):
        s = M.class_specificity(tiny_cnn, x[g[0]], maps[g], t[g])
        eye = torch.eye(len(g), dtype=torch.bool)
        expect.append(float(s[eye].mean() - s[~eye].mean()))
    assert vals["class_specificity"] == pytest.approx(np.mean(expect), abs=1e-6)
    sal = []
    for g in ([0, 1], [2, 3, 4], [5]):
        union = M.perturbation.minmax(maps[g]).amax(0, keepdim=True)
        sal.append(float(M.saliency_metric(tiny_cnn, x[g[0]][None], union, t[g].view(1, -1).new_zeros(1, 4)
                                           .index_fill_(1, t[g], 1), normalize=False)[0]))
    assert vals["saliency_metric"] == pytest.approx(np.mean(sal), abs=1e-5)
