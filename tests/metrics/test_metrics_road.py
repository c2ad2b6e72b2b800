"""ROAD and the noisy linear fill: a plain dense re-implementation, axioms, the AUC over actual fractions, a peer.

The peer is pytorch-grad-cam (``pip install grad-cam``, in the dev extras), whose ``metrics.road`` is a
copy of the ROAD authors' imputation code; its tests skip cleanly when it cannot be imported.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import explainer
from explainer import metrics as M
from explainer.core.masking import baseline_image
from explainer.metrics import road as R

# the 8-neighbourhood of ROAD, written out: edge neighbours 1/6, corner neighbours 1/12
OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def weight(dy, dx):
    return 1 / 12 if dy and dx else 1 / 6


def slow_impute(img: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Plain dense linear imputation of one image (C, H, W), pixel by pixel, np.linalg.solve."""
    c, h, w = img.shape
    removed = [(r, q) for r in range(h) for q in range(w) if not keep[r, q]]
    var = {p: k for k, p in enumerate(removed)}
    a = np.zeros((len(removed), len(removed)))
    b = np.zeros((len(removed), c))
    for k, (r, q) in enumerate(removed):
        # x_rq * (total weight of its neighbours inside the image) = sum of weighted neighbours
        for dy, dx in OFFSETS:
            rr, qq = r + dy, q + dx
            if 0 <= rr < h and 0 <= qq < w:
                a[k, k] += weight(dy, dx)
                if keep[rr, qq]:
                    b[k] += weight(dy, dx) * img[:, rr, qq]
                else:
                    a[k, var[(rr, qq)]] -= weight(dy, dx)
    out = img.copy()
    if removed:
        sol = np.linalg.solve(a, b)
        for k, (r, q) in enumerate(removed):
            out[:, r, q] = sol[k]
    return out


class LinearPixelModel(nn.Module):
    """logit_c(x) = sum W[c] * x + b_c: the exact per-pixel contributions are known."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, x):
        return torch.einsum("bkhw,ckhw->bc", x, self.weight) + self.bias


def direction_case(h=20, w=20, n=3):
    """Class 0 driven up by the left half of the image, down by the right half; the exact map of class 0."""
    torch.manual_seed(0)
    wt = torch.zeros(2, 3, h, w)
    wt[0, :, :, : w // 2] = torch.rand(3, h, w // 2) * 0.08
    wt[0, :, :, w // 2:] = -torch.rand(3, h, w - w // 2) * 0.04
    wt[1] = -wt[0]
    f = explainer.Explanandum(LinearPixelModel(wt, torch.tensor([-3.0, 3.0])), 2, multilabel=False,
                              mean=(0.5, 0.4, 0.3), std=(1.0, 1.0, 1.0))
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    perfect = (f.model.weight[0] * x).sum(1, keepdim=True)
    return f, x, perfect


def region_case(n=2):
    """logit_0 = 40 * (mean red in a 6 x 6 square) - 10 on a black image with a red square; the square as map.

    Neighbour imputation keeps the square red while enough of it is kept, and black once it is removed,
    so a map that points at the square is better than its negation under the noisy linear fill too.
    """
    h = w = 16
    wt = torch.zeros(2, 3, h, w)
    wt[0, 0, 5:11, 4:10] = 40 / 36
    f = explainer.Explanandum(LinearPixelModel(wt, torch.tensor([-10.0, 0.0])), 2, multilabel=False,
                              mean=(0.5, 0.4, 0.3), std=(1.0, 1.0, 1.0))
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(2)) * 0.1
    x[:, 0, 5:11, 4:10] = 0.9 + x[:, 0, 5:11, 4:10]
    good = torch.zeros(n, 1, h, w)
    good[:, :, 5:11, 4:10] = 1
    good = good + 0.01 * torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(3))
    return f, x, good


def random_keep(n, h, w, frac, seed=0):
    return torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed)) >= frac


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=4, multilabel=False)


# --------------------------------------------------------------------------- the imputation
def test_linear_impute_matches_dense_plain_solve():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 7, 9, generator=g, dtype=torch.float64)
    keep = random_keep(3, 7, 9, 0.6)
    keep[1, 0, 2:6, 3:8] = False  # a blob: removed pixels with only removed neighbours
    got = M.linear_impute(x, keep)
    for i in range(3):
        ref = slow_impute(x[i].numpy(), keep[i, 0].numpy())
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-12, rtol=0)


def test_imputed_pixel_is_the_weighted_mean_of_its_neighbours():
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = random_keep(1, 12, 10, 0.7, seed=4)
    out = M.linear_impute(x, keep)[0].numpy()
    k = keep[0, 0].numpy()
    for r in range(12):
        for q in range(10):
            if k[r, q]:
                continue
            nb = [(weight(dy, dx), out[:, r + dy, q + dx]) for dy, dx in OFFSETS
                  if 0 <= r + dy < 12 and 0 <= q + dx < 10]
            mean = sum(wt * v for wt, v in nb) / sum(wt for wt, _ in nb)
            np.testing.assert_allclose(out[:, r, q], mean, atol=1e-12)


def test_axioms_kept_unchanged_constant_image_range_and_noise_level():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    keep = random_keep(2, 32, 32, 0.5)
    g = torch.Generator().manual_seed(1)
    noisy = M.noisy_linear_impute(x, keep, noise=0.01, generator=g)
    k = keep.expand_as(x)
    assert torch.equal(noisy[k], x[k])  # kept pixels bit for bit
    const = torch.full((1, 3, 16, 16), 0.3)
    const[:, 1] = 0.7
    out = M.noisy_linear_impute(const, random_keep(1, 16, 16, 0.8), noise=0.0)
    torch.testing.assert_close(out, const, atol=1e-6, rtol=0)
    # noise-free: a weighted mean never leaves the range of the kept values (maximum principle)
    lin = M.linear_impute(x, keep)
    for i in range(2):
        for c in range(3):
            kept = x[i, c][keep[i, 0]]
            assert lin[i, c].min() >= kept.min() - 1e-6 and lin[i, c].max() <= kept.max() + 1e-6
    # the noise is N(0, noise^2) on the removed pixels only (no clamping in [0.2, 0.8])
    resid = (noisy - lin)[~k]
    assert abs(float(resid.std()) - 0.01) < 0.0005 and abs(float(resid.mean())) < 0.0005
    # seeded: the same generator seed gives the same images
    again = M.noisy_linear_impute(x, keep, noise=0.01, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)


def test_batches_threads_and_edge_cases():
    x = torch.rand(4, 3, 16, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keep = random_keep(4, 16, 12, 0.6)
    keep[2] = True  # nothing removed
    whole = M.linear_impute(x, keep)
    assert torch.equal(whole[2], x[2])
    threads = torch.get_num_threads()
    try:  # one thread: the images solved one after the other, the same result
        torch.set_num_threads(1)
        torch.testing.assert_close(M.linear_impute(x, keep), whole, atol=1e-12, rtol=0)
    finally:
        torch.set_num_threads(threads)
    for i in range(4):
        torch.testing.assert_close(M.linear_impute(x[i:i + 1], keep[i:i + 1]), whole[i:i + 1], atol=1e-12, rtol=0)
    keep[3] = False  # nothing kept: undetermined
    with pytest.raises(ValueError, match=r"keep: image\(s\) \[3\] keep no pixel"):
        M.linear_impute(x, keep)
    empty = torch.full_like(x, 0.25)
    out = M.linear_impute(x, keep, empty=empty)
    assert torch.equal(out[3], empty[3]) and torch.equal(out[:3], M.linear_impute(x[:3], keep[:3]))
    with pytest.raises(ValueError, match="keep: expected a mask of shape"):
        M.linear_impute(x, keep[:, :, :8])
    with pytest.raises(ValueError, match="keep: expected a binary mask"):
        M.linear_impute(x, keep.double() * 0.5)
    with pytest.raises(ValueError, match="noise"):
        M.noisy_linear_impute(x, keep, noise=-1.0)


# --------------------------------------------------------------------------- ROAD
def slow_road(f, x, maps, target, order, percentiles):
    """ROAD with noise 0, one image and one percentile at a time (numpy ordering, dense solve)."""
    hw = x.shape[-1] * x.shape[-2]
    out = np.zeros((x.shape[0], len(percentiles)))
    for i in range(x.shape[0]):
        m = maps[i].flatten().numpy()
        rank_order = np.argsort(-m if order == "morf" else m, kind="stable")
        for k, p in enumerate(percentiles):
            keep = np.ones(hw, bool)
            keep[rank_order[:int(round(p / 100 * hw))]] = False
            img = slow_impute(x[i].double().numpy(), keep.reshape(x.shape[-2:]))
            with torch.no_grad():
                out[i, k] = float(f.probabilities(f(torch.from_numpy(img).float()[None]))[0, target[i]])
    return out


def test_road_matches_slow_loop_and_directions():
    f, x, perfect = direction_case()
    pct = (10, 30, 50, 70, 90)
    for order in ("morf", "lerf"):
        v, curves = R.road(f, x, perfect, [0, 0, 0], order=order, percentiles=pct, noise=0.0, max_batch=4,
                           return_curves=True)
        ref = slow_road(f, x, perfect, [0, 0, 0], order, pct)
        np.testing.assert_allclose(curves.numpy(), ref, atol=1e-5)
        np.testing.assert_allclose(v.numpy(), ref.mean(1), atol=1e-5)
    # the map of the evidence beats its negation in both directions (default noise)
    f, x, good = region_case()
    assert (M.road_morf(f, x, good, 0) < M.road_morf(f, x, -good, 0) - 0.1).all()
    assert (M.road_lerf(f, x, good, 0) > M.road_lerf(f, x, -good, 0) + 0.1).all()
    assert M.get("road_morf").direction == "lower" and M.get("road_lerf").direction == "higher"


def test_road_noise_follows_content_not_position(small_cnn):
    x = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(3, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    kw = dict(percentiles=(20, 60), noise=0.05, return_curves=True)
    runs = [R.road(small_cnn, x, maps, [0, 1, 2], max_batch=b, **kw)[1] for b in (1, 4, 100)]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(runs[0], runs[2], atol=1e-6, rtol=0)
    # the noise follows the image and the removed set, not the position of the pair in the call
    perm = [2, 0, 1]
    moved = R.road(small_cnn, x[perm], maps[perm], [2, 0, 1], **kw)[1]
    torch.testing.assert_close(moved, runs[0][perm], atol=1e-6, rtol=0)
    other = R.road(small_cnn, x, maps, [0, 1, 2], **{**kw, "seed": 1})[1]
    quiet = R.road(small_cnn, x, maps, [0, 1, 2], **{**kw, "noise": 0.0})[1]
    assert (runs[0] - other).abs().max() > 1e-4 and (runs[0] - quiet).abs().max() > 1e-4
    with pytest.raises(ValueError, match="order"):
        R.road(small_cnn, x, maps, 0, order="up")
    with pytest.raises(ValueError, match="percentiles"):
        R.road(small_cnn, x, maps, 0, percentiles=(50, 20))
    with pytest.raises(ValueError, match="seed"):
        R.road(small_cnn, x, maps, 0, seed=-1)


# --------------------------------------------------------------------------- deletion / insertion fills
def slow_causal(f, x, maps, target, mode, steps, fill):
    """Deletion/insertion one image and step at a time, integrated over the actual fractions (issue 14).

    ``fill``: a baseline name, or "nli" (noise 0, dense solve; every pixel removed -> the mean colour).
    """
    hw = x.shape[-1] * x.shape[-2]
    step = math.ceil(hw / steps)
    n = math.ceil(hw / step)
    counts = [min(k * step, hw) for k in range(n + 1)]
    base = None if fill == "nli" else baseline_image(x, fill, f.mean.flatten())
    out = []
    for i in range(x.shape[0]):
        order = np.argsort(-maps[i].flatten().numpy(), kind="stable")
        scores = []
        for c in counts:
            keep = np.ones(hw, bool)
            if mode == "del":
                keep[order[:c]] = False
            else:
                keep[order[c:]] = False
            keep = keep.reshape(x.shape[-2:])
            if fill != "nli":
                img = torch.where(torch.from_numpy(keep), x[i], base[i])
            elif keep.any():
                img = torch.from_numpy(slow_impute(x[i].double().numpy(), keep)).float()
            else:
                img = f.mean.reshape(3, 1, 1).expand(3, *x.shape[-2:])
            with torch.no_grad():
                scores.append(float(f.probabilities(f(img[None]))[0, target[i]]))
        out.append(np.trapezoid(scores, np.array(counts) / hw))
    return torch.tensor(out)


def test_auc_integrates_over_actual_fractions_issue_14():
    # 20 x 20 = 400 px in 12 steps: 11 steps of 34 px and a last one of 26
    f, x, perfect = direction_case(20, 20)
    assert M.rise_counts(400, 12)[-2:].tolist() == [374, 400]
    for mode, fn in (("del", M.deletion_auc), ("ins", M.insertion_auc)):
        for fill in ("black", "mean"):
            got, curves = fn(f, x, perfect, 0, baseline=fill, steps=12, return_curves=True)
            ref = slow_causal(f, x, perfect, [0, 0, 0], mode, 12, fill)
            torch.testing.assert_close(got.double(), ref.double(), atol=1e-6, rtol=0)
            # the old even spacing differs by more than the tolerance: this test sees the bug
            even = (curves.sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2) / (curves.shape[1] - 1)
            assert (even.double() - ref.double()).abs().max() > 1e-4


def test_deletion_insertion_with_nli_fill():
    f, x, perfect = direction_case(12, 12, n=2)
    for mode, fn in (("del", M.deletion_auc), ("ins", M.insertion_auc)):
        got = fn(f, x, perfect, 0, baseline="nli", noise=0.0, steps=10, max_batch=7)
        ref = slow_causal(f, x, perfect, [0, 0], mode, 10, "nli")
        torch.testing.assert_close(got.double(), ref.double(), atol=1e-5, rtol=0)
    # with noise: the same for any chunking
    d = [M.deletion_auc(f, x, perfect, 0, baseline="nli", steps=10, max_batch=b) for b in (1, 5, 1000)]
    torch.testing.assert_close(d[0], d[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(d[0], d[2], atol=1e-6, rtol=0)
    # the map of the evidence beats its negation
    g, xr, good = region_case()
    assert (M.deletion_auc(g, xr, good, 0, baseline="nli", steps=16)
            < M.deletion_auc(g, xr, -good, 0, baseline="nli", steps=16) - 0.1).all()
    assert (M.insertion_auc(g, xr, good, 0, baseline="nli", steps=16)
            > M.insertion_auc(g, xr, -good, 0, baseline="nli", steps=16) + 0.1).all()
    # the default fill is unchanged: the mean baseline
    assert torch.equal(M.deletion_auc(f, x, perfect, 0, steps=10), M.deletion_auc(f, x, perfect, 0, baseline="mean",
                                                                                    steps=10))
    with pytest.raises(ValueError, match="noise: only used by the noisy linear imputation"):
        M.deletion_auc(f, x, perfect, 0, baseline="black", noise=0.1)
    with pytest.raises(ValueError, match="baseline: expected one of"):
        M.insertion_auc(f, x, perfect, 0, baseline="inpaint")


def test_registry_road_and_fill_option():
    f, x, perfect = direction_case(12, 12, n=4)
    t = torch.zeros(4, dtype=torch.long)
    names = ["road_morf", "road_lerf", "deletion_auc", "insertion_auc"]
    opts = {"road_morf": {"percentiles": [25, 75], "seed": 3}, "road_lerf": {"noise": 0.0},
            "deletion_auc": {"fill": "nli", "steps": 6, "seed": 5}, "insertion_auc": {"steps": 6}}
    tr = M.MetricTracker(names, opts)
    for sl in (slice(0, 1), slice(1, 4)):
        tr.update(M.PairBatch(f, x[sl], perfect[sl], t[sl], torch.arange(4)[sl], baseline="black", max_batch=3))
    vals, skipped = tr.compute()
    assert not skipped
    expect = {"road_morf": R.road(f, x, perfect, t, percentiles=[25, 75], seed=3),
              "road_lerf": R.road(f, x, perfect, t, order="lerf", noise=0.0),
              "deletion_auc": M.deletion_auc(f, x, perfect, t, baseline="nli", steps=6, seed=5),
              "insertion_auc": M.insertion_auc(f, x, perfect, t, baseline="black", steps=6)}
    for k, v in expect.items():
        assert vals[k] == pytest.approx(float(v.double().mean()), abs=1e-6), k
    # the seed option reaches the metric (a different seed, a different value)
    assert vals["deletion_auc"] != pytest.approx(float(M.deletion_auc(f, x, perfect, t, baseline="nli", steps=6)
                                                       .double().mean()), abs=1e-9)
    spec = M.describe(names, opts)
    assert "noisy linear imputation" in spec["road_morf"]["baseline"]
    assert "noisy linear imputation" in spec["deletion_auc"]["baseline"]
    assert "fill" in spec["insertion_auc"]["baseline"] and "nli" in M.describe(["insertion_auc"])["insertion_auc"][
        "baseline"]


def test_fixed_fill_metrics_equal_the_fill_option():
    """deletion_auc_blur / insertion_auc_nli ... are deletion and insertion with that fill, whatever the
    configured baseline."""
    f, x, perfect = direction_case(12, 12, n=4)
    t = torch.zeros(4, dtype=torch.long)
    names = ["deletion_auc_blur", "insertion_auc_blur", "deletion_auc_nli", "insertion_auc_nli"]
    tr = M.MetricTracker(names, {n: {"steps": 6} for n in names})
    tr.update(M.PairBatch(f, x, perfect, t, torch.arange(4), baseline="black", max_batch=3))
    vals, _ = tr.compute()
    for n in names:
        fn = M.deletion_auc if n.startswith("deletion") else M.insertion_auc
        want = fn(f, x, perfect, t, baseline=n.rsplit("_", 1)[1], steps=6)
        assert vals[n] == pytest.approx(float(want.double().mean()), abs=1e-6), n
    assert M.get("deletion_auc_blur").direction == "lower" and M.get("insertion_auc_nli").direction == "higher"


# --------------------------------------------------------------------------- peer: pytorch-grad-cam
def _gradcam_road():
    try:
        from pytorch_grad_cam.metrics import road as peer
    except Exception as err:  # noqa: BLE001  (an import of cv2 etc. can fail in many ways)
        pytest.skip(f"pytorch_grad_cam.metrics.road cannot be imported: {err!r}")
    return peer


def test_imputation_matches_pytorch_grad_cam():
    peer = _gradcam_road()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 24, generator=g)
    keep = random_keep(2, 20, 24, 0.5)
    keep[1, 0, 3:15, 4:20] = False
    ours = M.linear_impute(x, keep)
    for i in range(2):
        theirs = peer.NoisyLinearImputer(noise=0.0)(x[i], keep[i, 0].float())
        torch.testing.assert_close(ours[i], theirs, atol=1e-6, rtol=0)
    # the noise of both is N(0, 0.01^2) on the removed pixels (values inside [0.2, 0.8]: no clamping)
    xs = x[:1] * 0.6 + 0.2
    torch.manual_seed(0)
    theirs = peer.NoisyLinearImputer(noise=0.01)(xs[0], keep[0, 0].float()) - M.linear_impute(xs, keep[:1])[0]
    ours = M.noisy_linear_impute(xs, keep[:1], noise=0.01, generator=g)[0] - M.linear_impute(xs, keep[:1])[0]
    removed = ~keep[0].expand(3, -1, -1)
    assert abs(float(theirs[removed].std()) - float(ours[removed].std())) < 0.002


def test_road_matches_pytorch_grad_cam(small_cnn):
    peer = _gradcam_road()
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        AveragerAcrossThresholds,
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    h = w = 20  # 400 px: every percentile removes a whole number of pixels under both conventions
    x = torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(0))
    # distinct values exact in float32, also after 1 - map (their LeRF): no ties at any threshold
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(1))
    maps = torch.stack([perm.roll(s) for s in (0, 7, 99)]).float().div(512).view(3, 1, h, w)
    t = [0, 1, 3]
    targets = [ClassifierOutputSoftmaxTarget(c) for c in t]
    with torch.no_grad():
        intact = small_cnn.probabilities(small_cnn(x))[torch.arange(3), torch.tensor(t)].numpy()
    pct = (10, 40, 90)
    for order, remove in (("morf", RemoveMostRelevantFirst), ("lerf", RemoveLeastRelevantFirst)):
        v, curves = R.road(small_cnn, x, maps, t, order=order, percentiles=pct, noise=0.0, return_curves=True)
        for k, p in enumerate(pct):
            # their percentile q keeps the pixels below the q-th percentile: it removes 100 - q percent
            metric = PerturbationConfidenceMetric(remove(100 - p, peer.NoisyLinearImputer(noise=0.0)))
            diff = metric(x, maps[:, 0].numpy(), targets, small_cnn)
            np.testing.assert_allclose(curves[:, k].numpy() - intact, diff, atol=1e-5)
        avg = AveragerAcrossThresholds(lambda q, remove=remove: PerturbationConfidenceMetric(
            remove(q, peer.NoisyLinearImputer(noise=0.0))), [100 - p for p in pct])
        np.testing.assert_allclose(v.numpy() - intact, avg(x, maps[:, 0].numpy(), targets, small_cnn), atol=1e-5)
    # the authors' default noise std (kept by the peer) is ours
    assert peer.ROADMostRelevantFirst(percentile=50).perturbation.imputer.noise == pytest.approx(R.DEFAULT_NOISE)
