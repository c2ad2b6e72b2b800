"""evaluate's ``trust: ...`` (``trust_auroc``) and ``refine_curve: [...]`` (issue 24):

* ``trust_auroc`` equals scikit-learn's AUROC of ``1 - trust`` (``explanation(trust=True)``) against bad-mask labels
  written out per pair (the committed explainer and its trust model, on the tiny synthetic VOC tree at 128 px);
* the curve's ``r = 0`` row is the metrics of the one-pass masks and its ``r = 1`` row those of ``refine_masks`` on
  every mask (a tiny random explainer at 32 px, so that refinement is quick); the outputs show both;
* bad values of the keys are refused with a message naming what was expected.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY_DECODER, tiny_classifier
from sklearn.metrics import roc_auc_score

import explainer
from explainer import cli
from explainer import metrics as M
from explainer.data import synthetic
from explainer.explainers import ExplainerModule
from explainer.explainers.export import export_safetensors
from explainer.explainers.refine import refine_masks
from explainer.explainers.trust import mask_rows
from explainer.pipelines import evaluate as E

ROOT = Path(__file__).resolve().parents[2]
EXPLAINER_CK = ROOT / "checkpoints" / "synthetic_explainer.safetensors"
CLASSIFIER_CK = ROOT / "checkpoints" / "synthetic_classifier.safetensors"
STANDIN = textwrap.dedent('''
    import torch

    class Centre:
        """A model-independent map (no trust score): a bump in the image centre."""

        def __init__(self, f):
            pass

        def attribute(self, x, target):
            h, w = x.shape[-2:]
            yy = torch.arange(h).view(-1, 1) - h / 2
            xx = torch.arange(w).view(1, -1) - w / 2
            return (-(yy ** 2 + xx ** 2) / (h * w)).exp().expand(x.shape[0], 1, h, w).clone()
''')


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random explainer of a tiny classifier (input size 32, the evaluated images' size), and a stand-in."""
    d = tmp_path_factory.mktemp("trust")
    clf = tiny_classifier(d / "clf.safetensors", num_classes=len(synthetic.CLASSES))
    torch.manual_seed(0)
    module = ExplainerModule(str(clf), architecture="Unet", encoder="tu-explainer_resnet_tiny",
                             decoder_kwargs=TINY_DECODER)
    module.input_size = 32
    (d / "standin.py").write_text(STANDIN)
    return d, clf, export_safetensors(module, d / "explainer.safetensors")


def config(explanandum, tiny_voc, image_size, methods, **kw):
    cfg = {"explanandum": str(explanandum),
           "data": {"class_path": "explainer.data.VOCDataModule",
                    "init_args": {"root": str(tiny_voc), "image_size": image_size, "num_workers": 0}},
           "split": "test", "num_images": 4, "seed": 0, "target": "groundtruth", "baseline": "mean",
           "methods": methods, "metrics": ["insertion_auc", "miou", "iou"],
           "metric_options": {"insertion_auc": {"steps": 8}}, "batch_size": 3, "max_batch": 64,
           "device": "cpu", "figure_images": 0, "threshold_images": 4}
    cfg.update(kw)
    return cfg


def evaluated(cfg, f):
    """The evaluated images, their (image, class) pairs and the pairs' ground truth, as evaluate forms them."""
    _, ds = E.build_dataset(cfg["data"], cfg["split"], cfg["num_images"], cfg["seed"])
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([s["image"] for s in items])
    idx, t = E.make_pairs(f, x, torch.stack([s["labels"] for s in items]), cfg["target"], 64)
    return x, idx, t, torch.stack([s["mask"] for s in items])[idx]


def per_image(idx, t, n):
    return [t[idx == i] for i in range(n)]


def test_trust_auroc_is_the_auroc_of_low_trust_for_the_bad_masks(tiny_voc, tmp_path):
    e = explainer.load(EXPLAINER_CK)
    assert e.trust_model is not None and e.input_size == 128
    threshold = 0.5
    cfg = config(CLASSIFIER_CK, tiny_voc, 128, {"explainer": {"checkpoint": str(EXPLAINER_CK)}}, num_images=6,
                 metrics=["insertion_auc", "iou"], trust=True,
                 metric_options={"insertion_auc": {"steps": 8}, "iou": {"threshold": threshold, "void_band": 0}})
    res = E.evaluate(cfg, tmp_path / "results.json", progress=False)
    entry = res["methods"]["explainer"]

    # by hand: the trust of explanation(trust=True), the bad labels one pair at a time
    x, idx, t, gt = evaluated(cfg, e.explanandum)
    classes = per_image(idx, t, x.shape[0])
    keep = [i for i, c in enumerate(classes) if len(c)]
    r = e.explanation(x[keep], classes=[classes[i] for i in keep], trust=True)
    trust = torch.cat([v.reshape(-1) for v in r.trust])
    masks = torch.cat(list(r.masks))
    labels, scores = [], []
    for k in range(len(t)):
        region, known = gt[k] == int(t[k]) + 1, gt[k] != 255
        if not region.any():
            continue
        m = masks[k]
        s = (m - m.min()) / (m.max() - m.min())
        pred = (s > threshold) & known
        inter, union = float((pred & region).sum()), float(((pred | region) & known).sum())
        peak = int(torch.argmax(m.flatten()))
        off = not bool(region.flatten()[peak])
        labels.append(int(inter / union < 0.2 or off))
        scores.append(1 - float(trust[k]))
    assert 0 < sum(labels) < len(labels)  # good and bad masks both: the AUROC is defined
    assert entry["metrics"]["trust_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert entry["trust"]["masks"] == len(labels) and entry["trust"]["threshold"] == threshold
    assert entry["trust"]["bad_share"] == pytest.approx(sum(labels) / len(labels))
    assert res["metric_specs"]["trust_auroc"]["direction"] == "higher"
    assert "refinement_curve" not in entry and "refinement" not in res
    assert "trust_auroc ↑" in (tmp_path / "results.md").read_text()
    assert not (tmp_path / "refinement.png").exists()  # no curve asked for


def test_refinement_curve_ends_are_the_one_pass_and_the_refined_masks(tiny, tiny_voc, tmp_path):
    d, clf, ck = tiny
    methods = {"explainer": {"checkpoint": str(ck)}, "centre": {"factory": f"{d / 'standin.py'}:Centre"}}
    cfg = config(clf, tiny_voc, 32, methods, trust=True, refine_curve=[1.0, 0, 0.5],
                 metric_options={"insertion_auc": {"steps": 8}, "iou": {"threshold": "val"}})
    out = tmp_path / "results.json"
    with pytest.warns(UserWarning, match="trust_auroc"):  # a random explainer's masks are all bad here
        res = E.evaluate(cfg, out, progress=False)
    entry = res["methods"]["explainer"]
    curve = entry["refinement_curve"]
    assert [row["r"] for row in curve] == [0.0, 0.5, 1.0]
    assert res["refinement"]["fractions"] == [0.0, 0.5, 1.0]
    assert [row["share_refined"] for row in curve][::2] == [0.0, 1.0] and 0.5 <= curve[1]["share_refined"] < 0.6
    assert all(row["seconds"] > 0 for row in curve)
    # a val threshold is the method's own, for the metrics, the bad masks and the curve alike
    chosen = entry["thresholds"]["iou"]["threshold"]
    assert entry["trust"]["threshold"] == chosen and entry["refinement_thresholds"] == {"miou": "mean", "iou": chosen}

    e = explainer.load(ck)
    e.explanandum.model.to(memory_format=torch.channels_last)  # as evaluate runs it (config channels_last: true)
    x, idx, t, gt = evaluated(cfg, e.explanandum)
    f = e.explanandum

    def scores(maps):
        ious = M.iou(maps, gt, t, chosen)
        return {"insertion_auc": float(M.insertion_auc(f, x[idx], maps, t, steps=8).mean()),
                "miou": M.segmentation_summary(M.segmentation_stats(maps, gt, t))["miou"],
                "iou": float(ious[~ious.isnan()].mean())}

    # r = 0: the one-pass masks of explanation(trust=True), which are the evaluated maps here (same size)
    classes = per_image(idx, t, x.shape[0])
    keep = [i for i, c in enumerate(classes) if len(c)]
    images, wanted = x[keep], [classes[i] for i in keep]
    r0 = e.explanation(images, classes=wanted, trust=True)
    one_pass = torch.cat(list(r0.masks))
    for name, value in scores(one_pass[:, None]).items():
        assert curve[0][name] == pytest.approx(value, abs=1e-6), name
        assert curve[0][name] == pytest.approx(entry["metrics"][name], abs=1e-6), name
    # r = 1: refine_masks on every mask, its rows in the order explanation() refines them (lowest trust first): the
    # batched AdamW steps of a tiny random network amplify the float rounding of another row order to ~1e-3
    rows, cls = mask_rows(wanted)
    pick = torch.argsort(torch.cat([v.reshape(-1) for v in r0.trust]), stable=True)
    refined = torch.empty(len(pick), 1, *x.shape[-2:])
    refined[pick] = refine_masks(e, images[rows[pick]], cls[pick])
    assert not torch.allclose(refined, one_pass[:, None], atol=1e-4)  # refinement changed the masks
    for name, value in scores(refined).items():
        assert curve[2][name] == pytest.approx(value, abs=1e-6), name

    # the method without trust says why; the outputs show the column, the table and the plot
    assert "not a trained explainer" in res["methods"]["centre"]["skipped_metrics"]["trust_auroc"]
    assert "refinement_curve" not in res["methods"]["centre"]
    assert "every one of the" in entry["skipped_metrics"]["trust_auroc"]
    md = out.with_suffix(".md").read_text()
    assert "trust_auroc ↑" in md and "| method | r | refined | seconds | insertion_auc ↑ | miou ↑ | iou ↑ |" in md
    assert "| explainer | 1 | 100.0% | " in md
    png = out.with_name("refinement.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.read_text())["methods"]["explainer"]["refinement_curve"] == curve
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_trust_settings_name_what_was_expected(tiny, tiny_voc, tmp_path, capsys):
    d, clf, ck = tiny
    methods = {"explainer": {"checkpoint": str(ck)}, "centre": {"factory": f"{d / 'standin.py'}:Centre"}}
    base = config(clf, tiny_voc, 32, methods)
    for curve in ([0, 1.5], [-0.1], [0.2, 0.2], [], [math.nan]):
        with pytest.raises(ValueError, match=r"refine_curve: expected distinct fractions r in \[0, 1\]"):
            E.validate_config({**base, "trust": True, "refine_curve": curve})
    with pytest.raises(ValueError, match="refine_curve: the curve is computed for the methods `trust` selects; "
                                         "expected trust: true"):
        E.validate_config({**base, "refine_curve": [0, 1]})
    with pytest.raises(ValueError, match=r"trust: expected true, false or a non-empty list of names among "
                                         r"config.methods \['explainer', 'centre'\], got \['nope'\]"):
        E.validate_config({**base, "trust": ["nope"]})
    with pytest.raises(ValueError, match="Parser key \"trust\""):
        E.validate_config({**base, "trust": 3})
    # asked for explicitly, a method without trust is an error before any work; true skips it
    with pytest.raises(ValueError, match="trust: method 'centre' has no trust score: not a trained explainer.*"
                                         "expected only trained explainers"):
        E.run({**base, "trust": ["explainer", "centre"]}, progress=False)
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(json.dumps({**base, "trust": True, "refine_curve": [0, 2]}))
    assert cli.main(["evaluate", "--config", str(cfg_path), "--out", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "refine_curve: expected distinct fractions r in [0, 1]" in err
    assert not (tmp_path / "r.json").exists()
