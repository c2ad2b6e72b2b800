"""Trust scores (explainer.explainers.trust) and the bad-mask labels they are fitted to:

* the keep / remove / other / prob / flip signals against a plain per-mask loop; the matrix blur against the
  separable one; Grad-CAM with one classifier pass per image (or the pass ``explanation()`` makes for the
  probabilities) against GradCAM.attribute per mask;
* the greedy selection within a cost budget against a plain selection among the affordable features;
* the logistic fit against scikit-learn's LogisticRegression with the same penalty (a peer);
* ``explanation(trust=True)`` gives the signals and trust of each mask shaped as its classes, for batches and
  for lists of images of different sizes; the fitted model travels in the safetensors export;
* ``peak_off_object`` and ``bad_masks`` against a plain loop over pixels; ``depth``, ``top2`` and ``colour``
  against brute force and on shapes whose values are known;
* the ``trust`` verb fits, writes a new file and never touches the checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import explainer
from explainer import cli
from explainer.core.masking import blur
from explainer.explainers.export import export_safetensors
from explainer.explainers.trust import (
    FEATURE_COST,
    FEATURES,
    TRUST_BLUR_SIGMA,
    TrustModel,
    cam_pass,
    design_matrix,
    feature_cost,
    fit_trust_model,
    gradcam_maps,
    mask_rows,
    peak_colour,
    peak_depth,
    select_features,
    top_share,
    trust_auroc,
    trust_signals,
)
from explainer.metrics import bad_masks, iou, peak_off_object

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "checkpoints" / "synthetic_explainer.safetensors"


@pytest.fixture(scope="module")
def model():
    return explainer.load(CKPT)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 128, 128, generator=g)


def plain_signals(model, x, classes):
    """Per mask: its own image, the blur by hand, the classifier on kept / removed images, Grad-CAM and the
    rival classes' masks one at a time."""
    f = model.explanandum
    cam = explainer.methods.get("gradcam", f)
    rows = []

    def soft_iou(a, b):
        return float(torch.minimum(a, b).sum() / torch.maximum(a, b).sum())

    for i, cs in enumerate(classes):
        xi = x[i:i + 1]
        every = model.explain(xi)[0]  # (C, S, S)
        for c in cs.tolist():
            m = model.explain(xi, [c])  # (1, 1, S, S)
            b = blur(xi, TRUST_BLUR_SIGMA)
            core = (m > 0.5 * m.max()).float()
            with torch.no_grad():
                p = f.probabilities(f(xi))[0]
                kept = f.probabilities(f(m * xi + (1 - m) * b))[0]
                removed = f.probabilities(f((1 - m) * xi + m * b))[0]
                cored = f.probabilities(f(core * xi + (1 - core) * b))[0]
            mirror = model.explain(xi.flip(-1), [c]).flip(-1)
            g = cam.attribute(xi, [c]).detach()
            g = (g - g.min()) / (g.max() - g.min()) if g.max() > g.min() else torch.zeros_like(g)  # flat: no agreement
            order = sorted(range(len(p)), key=lambda k: (-float(p[k]), k))[:4]
            rivals = [k for k in order if k != c][:3]
            others = [float(kept[k]) for k in range(len(kept)) if k != c]
            rows.append({"keep": float(kept[c]), "remove": float(removed[c]), "other": max(others),
                         "prob": float(p[c]), "flip": soft_iou(m, mirror), "area": float(m.mean()),
                         "peak": float(m.max()), "crisp": float((2 * m - 1).abs().mean()),
                         "core": float(cored[c]), "confusion": max(soft_iou(m[0, 0], every[k]) for k in rivals),
                         "gradcam": soft_iou(m[0], g[0]), "depth": plain_depth(m[0, 0]),
                         "top2": plain_top_share(m[0, 0], 0.02), "colour": plain_colour(xi[0], m[0, 0], 3)})
    return rows


def plain_colour(x, m, size):
    """The peak's patch colour (the pixels of the size x size square around it that lie in the image, averaged
    one by one) against the m- and (1 - m)-weighted mean colours, summed pixel by pixel."""
    H, W = m.shape
    k = int(m.flatten().argmax())
    py, px = k // W, k % W
    r = size // 2
    pixels = [x[:, i, j] for i in range(py - r, py + r + 1) for j in range(px - r, px + r + 1)
              if 0 <= i < H and 0 <= j < W]
    a = torch.stack(pixels).double().mean(0)
    w_in = m.double().sum()
    w_out = (1 - m.double()).sum()
    inside = sum(x[:, i, j].double() * float(m[i, j]) for i in range(H) for j in range(W)) / max(w_in, 1e-12)
    outside = sum(x[:, i, j].double() * float(1 - m[i, j]) for i in range(H) for j in range(W)) / max(w_out, 1e-12)
    d_in, d_out = float((a - inside).norm()), float((a - outside).norm())
    if w_in <= 1e-6 or w_out <= 1e-6 or d_in + d_out == 0:
        return 0.5
    return d_out / (d_in + d_out)


def plain_depth(m):
    """The peak's distance to the nearest pixel outside the core (a ring of outside pixels around the image),
    over the largest such distance of a core pixel, by brute force over every pair of pixels."""
    if float(m.max()) <= 0:
        return 0.0
    H, W = m.shape
    core = torch.zeros(H + 2, W + 2, dtype=torch.bool)
    core[1:-1, 1:-1] = m > 0.5 * m.max()
    yy, xx = torch.meshgrid(torch.arange(H + 2.0), torch.arange(W + 2.0), indexing="ij")
    inside = torch.stack([yy[core], xx[core]], 1)
    outside = torch.stack([yy[~core], xx[~core]], 1)
    dist = torch.cdist(inside.double(), outside.double()).min(1).values
    k = int(m.flatten().argmax())
    peak = torch.tensor([k // W + 1.0, k % W + 1.0], dtype=torch.float64)
    here = [i for i in range(len(inside)) if torch.equal(inside[i].double(), peak)]
    return float(dist[here[0]] / dist.max())


def plain_top_share(m, share):
    v = sorted(m.flatten().tolist(), reverse=True)
    k = max(1, math.ceil(share * len(v)))
    return sum(v[:k]) / sum(v)


def test_signals_match_a_plain_loop(model, batch):
    classes = [torch.tensor([0, 3]), torch.tensor([5, 1]), torch.tensor([2, 7])]
    probs = model.class_probabilities(batch)
    masks = model.selected_masks(batch, classes)
    s = trust_signals(model, batch, classes, masks, probs, batch_size=4)  # batches cut across images
    ref = plain_signals(model, batch, classes)
    for name in FEATURES:
        assert torch.allclose(s[name].double(), torch.tensor([r[name] for r in ref], dtype=torch.float64),
                              atol=1e-4), name


def test_explanation_with_trust(model, batch):
    r = model.explanation(batch, top_k=2, trust=True)
    assert r.trust.shape == r.keep.shape == r.remove.shape == r.classes.shape == (3, 2)
    assert ((r.trust >= 0) & (r.trust <= 1)).all()
    probs = model.class_probabilities(batch)
    s = trust_signals(model, batch, list(r.classes), model.selected_masks(batch, list(r.classes)), probs,
                      features=())
    assert torch.allclose(r.keep.flatten(), s["keep"], atol=1e-5)
    assert torch.allclose(r.remove.flatten(), s["remove"], atol=1e-5)
    # images of different sizes and different numbers of classes: lists, one entry per image
    imgs = [torch.rand(3, 57, 91), torch.rand(3, 128, 128)]
    r2 = model.explanation(imgs, classes=[[1], [0, 4]], trust=True)
    assert [t.shape for t in r2.trust] == [(1,), (2,)] and [k.shape for k in r2.keep] == [(1,), (2,)]
    # without trust nothing is added
    r3 = model.explanation(batch, top_k=2)
    assert r3.trust is None and r3.keep is None and torch.equal(r3.masks, r.masks)
    # only what is asked is computed; keep and remove always
    assert set(s) == {"keep", "remove", "other", "prob", "area", "peak", "crisp"}
    with pytest.raises(ValueError, match="features: unknown"):
        trust_signals(model, batch, list(r.classes), model.selected_masks(batch, list(r.classes)), probs,
                      features=("nope",))
    with pytest.raises(ValueError, match="trust: expected True or False"):
        model.explanation(batch, trust="yes")
    with pytest.raises(ValueError, match=r"refine: expected a fraction of the masks in \[0, 1\]"):
        model.explanation(batch, refine=1.5)


def synthetic_signals(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = {k: torch.rand(n, generator=g) * 0.98 + 0.01 for k in FEATURES}
    s["area"] = torch.rand(n, generator=g) * 0.3 + 0.01
    z = design_matrix(s, FEATURES)
    logit = 1.5 * z[:, 0] - 1.0 * z[:, 1] + 0.5 * z[:, 4] - 0.3
    good = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(logit)
    return s, good


def test_fit_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    s, good = synthetic_signals()
    l2 = 1e-2
    model = fit_trust_model(s, good, FEATURES, l2)
    z = design_matrix(s, FEATURES)
    zs = ((z - z.mean(0)) / z.std(0)).numpy()
    # mean log-loss + l2 |w|^2  ==  (sum log-loss + |w|^2 / (2 C)) / n  with  C = 1 / (2 l2 n)
    ref = LogisticRegression(C=1 / (2 * l2 * len(good)), tol=1e-10, max_iter=10_000).fit(zs, good.numpy())
    assert torch.allclose(torch.tensor(model.weights, dtype=torch.float64), torch.tensor(ref.coef_[0]), atol=1e-4)
    assert abs(model.bias - float(ref.intercept_[0])) < 1e-4
    trust = model.score(s)
    assert torch.allclose(trust.double(), torch.tensor(ref.predict_proba(zs)[:, 1]), atol=1e-4)
    # with pairwise products: the same against scikit-learn on the expanded columns
    three = ("keep", "remove", "flip")
    quad = fit_trust_model(s, good, three, l2, interactions=True)
    u = design_matrix(s, three)
    u = ((u - u.mean(0)) / u.std(0)).numpy()
    expanded = np.concatenate([u] + [u[:, [i]] * u[:, [j]] for i in range(3) for j in range(i, 3)], 1)
    ref2 = LogisticRegression(C=1 / (2 * l2 * len(good)), tol=1e-10, max_iter=10_000).fit(expanded, good.numpy())
    assert len(quad.weights) == 9
    assert torch.allclose(torch.tensor(quad.weights, dtype=torch.float64), torch.tensor(ref2.coef_[0]), atol=1e-4)
    assert torch.allclose(quad.score(s).double(), torch.tensor(ref2.predict_proba(expanded)[:, 1]), atol=1e-4)
    assert TrustModel.from_dict(quad.to_dict()) == quad
    assert trust_auroc(trust, ~good) > 0.7
    # greedy selection finds the informative features first
    chosen, cv = select_features(s, good)
    assert chosen[0] == "keep" and set(chosen) >= {"keep", "remove"} and cv > 0.7
    with pytest.raises(ValueError, match="good and bad masks"):
        fit_trust_model(s, torch.ones(len(good), dtype=torch.bool))


def test_matrix_blur_matches_the_separable_blur():
    from explainer.core.masking import matrix_blur, separable_blur

    g = torch.Generator().manual_seed(3)
    for shape, sigma in (((2, 3, 128, 128), 10.0), ((1, 3, 57, 91), 10.0), ((2, 1, 40, 33), 3.0),
                         ((1, 3, 12, 12), 10.0)):  # the last: kernel wider than the image (blur's fallback)
        x = torch.rand(*shape, generator=g)
        assert torch.allclose(matrix_blur(x, sigma), separable_blur(x, sigma), atol=1e-5), (shape, sigma)
    x = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64)
    assert matrix_blur(x, 2.0).dtype == torch.float64


def test_gradcam_maps_match_the_method_per_mask(model, batch):
    """One classifier pass per image, a backward pass per class slot: the maps of GradCAM.attribute run on
    each (image, class) on its own, for masks in any order and batches that cut across images."""
    classes = [torch.tensor([0, 3, 6]), torch.tensor([5]), torch.tensor([2, 2])]  # a class twice: two masks
    rows, cls = mask_rows(classes)
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    rows, cls = rows[order], cls[order]
    got = gradcam_maps(model.explanandum, batch, rows, cls, batch_size=2)
    ref = explainer.methods.get("gradcam", model.explanandum).attribute(batch[rows], cls)[:, 0]
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
    assert not any(p.requires_grad for p in model.explanandum.parameters())
    assert not model.explanandum.model.layer4._forward_hooks  # the hook is removed
    # the pass explanation() makes for the probabilities, kept: the same probabilities, the same maps
    probs, kept = cam_pass(model.explanandum, batch)
    assert torch.equal(probs, model.class_probabilities(batch))
    assert torch.allclose(gradcam_maps(model.explanandum, batch, rows, cls, kept=kept), ref, atol=1e-5)
    # explanation(trust=True) of a trust model with gradcam uses it: the trust of trust_signals' own passes (the
    # committed Explainer's model has gradcam; the faithful explainer's does not)
    e = explainer.load("checkpoints/synthetic_explainer.safetensors")
    assert "gradcam" in e.trust_model.features
    r = e.explanation(batch, top_k=2, trust=True)
    chosen = list(r.classes)
    sig = trust_signals(e, batch, chosen, e.selected_masks(batch, chosen), e.class_probabilities(batch),
                        e.trust_model.features)
    assert torch.allclose(r.trust.flatten(), e.trust_model.score(sig).float(), atol=1e-5)
    assert torch.equal(r.probabilities, e.explanation(batch, top_k=2).probabilities)


def test_select_features_within_a_cost_budget():
    s, _ = synthetic_signals()
    g = torch.Generator().manual_seed(5)
    z = design_matrix(s, FEATURES)
    logit = 1.5 * z[:, 0] - z[:, 1] + 8 * (s["flip"].double() - 0.5) + 4 * (s["gradcam"].double() - 0.5)
    good = torch.rand(len(logit), generator=g, dtype=torch.float64) < torch.sigmoid(logit)
    assert feature_cost(["keep", "remove"]) == 0 and feature_cost(["gradcam", "flip", "gradcam"]) == pytest.approx(
        FEATURE_COST["gradcam"] + FEATURE_COST["flip"])
    # a budget that admits one feature of cost <= 0.5 (gradcam) and none dearer: the same as a plain selection
    # among the free features and gradcam
    free = [f for f in FEATURES if f not in FEATURE_COST]
    for inter in (False, True):
        got = select_features(s, good, l2=1e-2, interactions=inter, max_cost=0.5)
        ref = select_features(s, good, [*free, "gradcam"], l2=1e-2, interactions=inter)
        assert got == ref and "gradcam" in got[0] and "flip" not in got[0]
    # flip carries the most signal here: with no budget it is chosen, with a zero budget nothing costly is
    unlimited, _ = select_features(s, good)
    assert {"flip", "gradcam"} <= set(unlimited)
    cheap, _ = select_features(s, good, max_cost=0.0)
    assert "flip" not in cheap and feature_cost(cheap) == 0 and set(cheap) >= {"keep", "remove"}


def test_trust_model_travels_in_the_export(model, batch, tmp_path):
    s, good = synthetic_signals()
    fitted = fit_trust_model(s, good, ("keep", "remove", "flip"), fitted_on="synthetic")
    m = explainer.load(CKPT)
    m.trust_model = fitted
    path = export_safetensors(m, tmp_path / "with_trust.safetensors")
    back = explainer.load(path)
    assert back.trust_model == fitted
    r = back.explanation(batch, classes=[[0], [1], [2]], trust=True)
    probs = back.class_probabilities(batch)
    classes = [torch.tensor([0]), torch.tensor([1]), torch.tensor([2])]
    sig = trust_signals(back, batch, classes, back.selected_masks(batch, classes), probs)
    assert torch.allclose(r.trust.flatten(), fitted.score(sig).float(), atol=1e-5)
    with pytest.raises(ValueError, match="unknown features"):
        TrustModel.from_dict({**fitted.to_dict(), "features": ["keep", "nope", "flip"]})


def test_peak_off_object_and_bad_masks_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    gt = torch.zeros(6, 16, 16, dtype=torch.long)
    gt[:, 2:8, 2:8] = 1
    gt[:, 9:14, 9:14] = 2
    maps = torch.rand(6, 1, 16, 16, generator=g) * 0.1
    maps[0, 0, 4, 4] = 1  # on its object
    maps[1, 0, 10, 10] = 1  # on the other object
    maps[2, 0, 0, 15] = 1  # on background
    maps[3, 0, 2:8, 2:8] = 1  # the whole object
    maps[4, 0, 2:4, 2:4] = 1  # a corner of it: low IoU, peak inside
    maps[5, 0, 2:8, 2:8] = 0.9
    maps[5, 0, 12, 12] = 1  # right region, peak elsewhere
    target = torch.zeros(6, dtype=torch.long)
    off = peak_off_object(maps, gt, target, void_band=0)
    ious = iou(maps, gt, target, 0.5, void_band=0)
    for i in range(6):
        m = maps[i, 0]
        y, x = divmod(int(m.flatten().argmax()), 16)
        assert off[i] == float(gt[i, y, x] != 1)
        pred = (m - m.min()) / (m.max() - m.min()) > 0.5
        inter = (pred & (gt[i] == 1)).sum()
        union = (pred | (gt[i] == 1)).sum()
        assert abs(float(ious[i]) - int(inter) / int(union)) < 1e-9
    bad = bad_masks(maps, gt, target, 0.5, min_iou=0.2, void_band=0)
    assert bad.tolist() == [float(ious[i] < 0.2 or off[i] > 0) for i in range(6)]
    assert bad[3] == 0 and bad[1] == 1 and bad[4] == 1 and bad[5] == 1


def test_trust_verb_fits_and_writes_a_new_file(tiny_voc, tmp_path, capsys):
    ckpt = tmp_path / "e.safetensors"
    ckpt.write_bytes(CKPT.read_bytes())
    before = ckpt.read_bytes()
    out, report = tmp_path / "trusted.safetensors", tmp_path / "trust.json"
    data = {"class_path": "explainer.data.SyntheticDataModule",
            "init_args": {"root": str(tiny_voc), "num_images": {"train": 24, "val": 12, "test": 12},
                          "image_size": 64, "num_workers": 0}}
    rc = cli.main(["trust", "--checkpoint", str(ckpt), "--out", str(out), "--data", json.dumps(data),
                   "--num_images", "12", "--features", "[keep, remove]", "--min_iou", "0.5",
                   "--test_split", "test", "--test_images", "12", "--report", str(report)])
    assert rc == 0 and ckpt.read_bytes() == before
    rep = json.loads(report.read_text())
    back = explainer.load(out)
    assert back.trust_model is not None and list(back.trust_model.features) == ["keep", "remove"]
    assert rep["features"] == ["keep", "remove"] and 0 <= rep["test"]["bad_share"] <= 1
    assert rep["max_cost"] is None and rep["feature_cost"] == 0
    assert cli.main(["trust", "--checkpoint", str(ckpt), "--out", str(ckpt)]) == 1
    assert "never overwritten" in capsys.readouterr().err and ckpt.read_bytes() == before


def test_request_trust_field_is_checked():
    from explainer.serving.schema import RequestError, parse_request

    ok = parse_request({"image": "aGVsbG8=", "trust": True}, ["a", "b"])
    assert ok.trust is True and parse_request({"image": "aGVsbG8="}, ["a", "b"]).trust is False
    with pytest.raises(RequestError, match="trust: expected true or false") as err:
        parse_request({"image": "aGVsbG8=", "trust": "yes"}, ["a", "b"])
    assert err.value.status == 400


def test_form_trust_field():
    from explainer.serving.guard import form_to_payload
    from explainer.serving.schema import RequestError, parse_request

    assert form_to_payload([("image", b"x"), ("trust", "true")])["trust"] is True
    assert form_to_payload([("image", b"x"), ("trust", " False ")])["trust"] is False
    with pytest.raises(RequestError, match="trust: expected true or false"):
        parse_request(form_to_payload([("image", b"x"), ("trust", "maybe")]), ["a", "b"])


def test_refine_replaces_the_least_trusted_masks(model, batch):
    """explanation(refine=r): the ceil(r P) masks of lowest trust are refine_masks' masks of those rows, the others
    are the one-pass masks; the refined ones are flagged and scored again."""
    from explainer.explainers.refine import refine_masks

    base = model.explanation(batch, top_k=2, trust=True)
    r = model.explanation(batch, top_k=2, refine=0.5)
    flat_trust = base.trust.flatten()
    pick = torch.argsort(flat_trust, stable=True)[:3]  # ceil(0.5 * 6)
    assert r.refined.flatten().nonzero()[:, 0].sort().values.tolist() == pick.sort().values.tolist()
    rows, cls = pick // 2, base.classes.flatten()[pick]
    expected = refine_masks(model, batch[rows], cls)[:, 0]
    got = r.masks.flatten(0, 1)
    assert torch.allclose(got[pick], expected, atol=1e-5)
    keep = torch.ones(6, dtype=torch.bool)
    keep[pick] = False
    assert torch.equal(got[keep], base.masks.flatten(0, 1)[keep])
    assert torch.equal(r.trust.flatten()[keep], flat_trust[keep])
    assert not torch.allclose(got[pick], base.masks.flatten(0, 1)[pick], atol=1e-3)  # refinement changed them
    assert model.explanation(batch, top_k=1, refine=1.0).refined.all()


def test_depth_and_top_share_of_known_shapes():
    m = torch.zeros(3, 20, 20)
    m[:, 5:14, 5:14] = 0.8  # a 9 x 9 core: its centre lies 5 pixels from the nearest outside pixel
    m[0, 9, 9] = 1.0  # peak at the centre
    m[1, 5, 5] = 1.0  # peak at a corner: 1 pixel from outside
    m[2] = 0  # empty
    d = peak_depth(m)
    assert torch.allclose(d, torch.tensor([1.0, 0.2, 0.0]))
    edge = torch.zeros(1, 20, 20)
    edge[0, :4, :4] = 1.0  # the image's border counts as the core's edge
    assert float(peak_depth(edge)[0]) == pytest.approx(0.5)  # first maximum (0, 0): 1 from the border, 2 at best
    t = top_share(m, 0.02)  # 8 of 400 pixels
    assert torch.allclose(t[:2], torch.tensor([(1.0 + 7 * 0.8) / (1.0 + 80 * 0.8)] * 2)) and float(t[2]) == 0.0


def test_colour_of_known_images():
    x = torch.zeros(3, 3, 20, 20)
    x[:, 0] = 0.2  # a dark background
    x[:, 0, 5:14, 5:14] = 0.9  # a bright square object
    m = torch.zeros(3, 20, 20)
    m[:, 5:14, 5:14] = 0.8
    m[0, 9, 9] = 1.0  # peak inside the object, away from its edge: its patch is the object's colour
    m[1, 2, 2] = 1.0  # peak on the background: its patch is the background's colour
    m[2] = 0.5  # a flat mask over a flat image: both distances 0
    x[2] = 0.3
    c = peak_colour(x, torch.arange(3), m)
    # only the red channel differs; mask 0 lies on the object alone, so its inside colour is the object's
    outside = (0.9 * 0.2 * 80 + 0.2 * 319) / (0.2 * 80 + 319)  # 80 object pixels at 1 - 0.8, the peak at 0
    assert float(c[0]) == pytest.approx((0.9 - outside) / (0.0 + (0.9 - outside)), abs=1e-5)  # = 1
    inside1 = (0.9 * 0.8 * 81 + 0.2 * 1.0) / (0.8 * 81 + 1.0)  # mask 1: the object at 0.8, a background peak at 1
    outside1 = (0.9 * 0.2 * 81 + 0.2 * 318) / (0.2 * 81 + 318)
    assert float(c[1]) == pytest.approx((outside1 - 0.2) / ((inside1 - 0.2) + (outside1 - 0.2)), abs=1e-5)
    assert float(c[1]) < 0.2 < 0.8 < float(c[0])  # the background peak looks like the mask's surroundings
    assert float(c[2]) == 0.5
    # rows pick each mask's image, across the 32-mask chunks: 70 masks of 3 images against one call per mask
    g = torch.Generator().manual_seed(0)
    xs, ms = torch.rand(3, 3, 20, 20, generator=g), torch.rand(70, 20, 20, generator=g)
    rows = torch.arange(70) % 3
    one_by_one = torch.cat([peak_colour(xs[rows[i]][None], torch.zeros(1, dtype=torch.long), ms[i:i + 1])
                            for i in range(70)])
    assert torch.allclose(peak_colour(xs, rows, ms), one_by_one, atol=1e-6)
    # an empty batch gives an empty signal
    assert peak_colour(x, torch.zeros(0, dtype=torch.long), m[:0]).shape == (0,)
    # nothing to compare: an empty mask, a mask over the whole image
    flat = torch.stack([torch.zeros(20, 20), torch.ones(20, 20)])
    assert peak_colour(x[:2], torch.arange(2), flat).tolist() == [0.5, 0.5]
