"""explainer.pipelines.evaluate end to end on the tiny synthetic VOC tree, with a tiny explanandum checkpoint."""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch
import yaml

import explainer
from explainer import metrics as M
from explainer.data import synthetic
from explainer.pipelines import evaluate as E

STANDIN = textwrap.dedent('''
    import torch

    class InputGradient:
        """A stand-in attribution: |d logit_t / d x| summed over colour channels, (B, 1, H, W)."""

        def __init__(self, f, scale=1.0):
            self.f, self.scale = f, scale

        def attribute(self, x, target):
            x = x.detach().clone().requires_grad_(True)
            t = torch.as_tensor(target, device=x.device)
            self.f(x).gather(1, t.view(-1, 1)).sum().backward()
            return self.scale * x.grad.abs().sum(1, keepdim=True)

    class Centre:
        """A model-independent map: a bump in the image centre."""

        def __init__(self, f):
            pass

        def attribute(self, x, target):
            h, w = x.shape[-2:]
            yy = torch.arange(h).view(-1, 1) - h / 2
            xx = torch.arange(w).view(1, -1) - w / 2
            return (-(yy ** 2 + xx ** 2) / (h * w)).exp().expand(x.shape[0], 1, h, w).clone()

    class Bound(InputGradient):
        """Refuses any classifier but the one it was trained against (as an amortized explainer does)."""

        def __init__(self, f, fingerprint):
            if abs(float(sum(p.double().sum() for p in f.parameters())) - fingerprint) > 1e-6:
                raise ValueError("trained against another classifier")
            super().__init__(f)
''')


@pytest.fixture(scope="module")
def setup(tiny_voc, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=len(synthetic.CLASSES),
                                   multilabel=True, class_names=list(synthetic.CLASSES))
    ckpt = explainer.save_explanandum(f, d / "tiny.safetensors")
    (d / "standin.py").write_text(STANDIN)
    return d, ckpt


def config(d, ckpt, tiny_voc, methods, **kw):
    cfg = {"explanandum": str(ckpt),
           "data": {"class_path": "explainer.data.VOCDataModule",
                    "init_args": {"root": str(tiny_voc), "image_size": 32, "num_workers": 0}},
           "split": "test", "num_images": 4, "seed": 0, "target": "groundtruth", "baseline": "mean",
           "methods": methods,
           "metrics": ["deletion_auc", "insertion_auc", "pos_auc", "neg_auc", "adp", "pic", "pointing_game",
                       "miou", "f1", "pixel_ap", "saliency_metric", "class_specificity", "randomization_spearman"],
           "metric_options": {"deletion_auc": {"steps": 8}, "insertion_auc": {"steps": 8}},
           "batch_size": 3, "max_batch": 64, "device": "cpu", "figure_images": 3}
    cfg.update(kw)
    return cfg


def test_evaluate_end_to_end(setup, tiny_voc):
    d, ckpt = setup
    methods = {"grad": {"factory": f"{d / 'standin.py'}:InputGradient", "scale": 2.0},
               "centre": {"factory": f"{d / 'standin.py'}:Centre"}}
    cfg_path = d / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump(config(d, ckpt, tiny_voc, methods)))
    out = d / "out" / "results.json"
    assert E.main(["--config", str(cfg_path), "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    for key in ("explanandum", "dataset", "split", "num_images", "target", "baseline", "device", "methods"):
        assert key in res, key
    assert res["num_images"] == 4 and res["split"] == "test" and res["target"] == "groundtruth"
    assert set(res["methods"]) == {"grad", "centre"}
    # every metric spec states its direction, baseline and target
    for name, spec in res["metric_specs"].items():
        assert spec["direction"] in ("higher", "lower") and spec["baseline"] and spec["target"], name
    for name, entry in res["methods"].items():
        assert entry["seconds_per_image"] > 0
        assert entry["num_maps"] >= 4  # one map per (image, present class): at least one per image
        vals = entry["metrics"]
        for k in ("deletion_auc", "insertion_auc", "adp", "pic", "saliency_metric"):
            assert isinstance(vals[k], float), (name, k)
        assert 0 <= vals["deletion_auc"] <= 1 and 0 <= vals["insertion_auc"] <= 1
        assert 0 <= vals["pos_auc"] <= 90 and 0 <= vals["neg_auc"] <= 90
        assert 0 <= vals["miou"] <= 1 and 0 <= vals["pointing_game"] <= 1
        assert set(vals) | set(entry.get("skipped_metrics", {})) == set(res["metric_specs"])
    # the model-independent map is identical on a randomised model: it fails the sanity check
    assert res["methods"]["centre"]["metrics"]["randomization_spearman"] == pytest.approx(1.0)
    assert res["methods"]["grad"]["metrics"]["randomization_spearman"] < 0.95
    # the same maps twice through the metrics give the same numbers: recompute deletion for the stand-in
    md = (out.with_suffix(".md")).read_text()
    assert "| grad |" in md and "deletion_auc ↓" in md and "insertion_auc ↑" in md
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes left no temporaries


def test_evaluate_matches_direct_metric_calls(setup, tiny_voc):
    """The evaluator's numbers are the metric functions' numbers on the same (image, class) pairs."""
    d, ckpt = setup
    methods = {"grad": {"factory": f"{d / 'standin.py'}:InputGradient"}}
    cfg = config(d, ckpt, tiny_voc, methods, metrics=["deletion_auc", "miou"], num_images=4, target="predicted")
    res, figure = E.run(cfg, progress=False)
    f = explainer.load_explanandum(str(ckpt))
    _, ds = E.build_dataset(cfg["data"], "test", 4, 0)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    t = f(x).argmax(1)
    # the figure outlines each row's class region: the ground truth of that image and class
    for r, region in enumerate(figure["regions"]):
        assert torch.equal(region, ds[r]["mask"] == int(t[r]) + 1)
        assert figure["titles"][r] == f.class_names[int(t[r])]
    import importlib.util

    spec = importlib.util.spec_from_file_location("standin_direct", d / "standin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    maps = mod.InputGradient(f).attribute(x, t)
    expect = float(M.deletion_auc(f, x, maps, t, steps=8).mean())
    assert res["methods"]["grad"]["metrics"]["deletion_auc"] == pytest.approx(expect, abs=1e-5)
    assert res["methods"]["grad"]["num_maps"] == 4  # predicted: one map per image


def test_split_without_masks_skips_localisation(setup, tiny_voc, tmp_path):
    """Images without segmentation: miou/pointing game are left out with a reason, never filled in."""
    import shutil

    root = tmp_path / "VOC2007"
    shutil.copytree(tiny_voc, root)
    shutil.rmtree(root / "SegmentationClass")
    d, ckpt = setup
    cfg = config(d, ckpt, root, {"grad": {"factory": f"{d / 'standin.py'}:InputGradient"}},
                 metrics=["deletion_auc", "miou", "pointing_game"], num_images=3)
    with pytest.warns(UserWarning, match="skipped"):
        res, _ = E.run(cfg, progress=False)
    entry = res["methods"]["grad"]
    assert set(entry["metrics"]) == {"deletion_auc"}
    assert set(entry["skipped_metrics"]) == {"miou", "pointing_game"}
    assert "no ground-truth" in entry["skipped_metrics"]["miou"]


def test_config_errors(setup, tiny_voc):
    d, ckpt = setup
    methods = {"grad": {"factory": f"{d / 'standin.py'}:InputGradient"}}
    with pytest.raises(ValueError, match="unknown metric"):
        E.run(config(d, ckpt, tiny_voc, methods, metrics=["deletion_auc", "bogus"]), progress=False)
    with pytest.raises(ValueError, match="unknown key"):
        E.run({**config(d, ckpt, tiny_voc, methods), "nmu_images": 3}, progress=False)
    with pytest.raises(ValueError, match="target"):
        E.run(config(d, ckpt, tiny_voc, methods, target="both"), progress=False)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        E.run(config(d, ckpt, tiny_voc, {"explainer": {"checkpoint": str(d / "missing.ckpt")}}), progress=False)
    with pytest.raises(FileNotFoundError):
        E.run(config(d, d / "missing.safetensors", tiny_voc, methods), progress=False)


def test_evaluate_with_registered_methods(setup, tiny_voc, tmp_path):
    """The real registry (skipped while explainer.methods is not importable)."""
    try:
        from explainer import methods as registry
    except ImportError as err:
        pytest.skip(f"explainer.methods not importable yet: {err}")
    names = [n for n in ("saliency", "gradcam") if n in registry.available()]
    if not names:
        pytest.skip("neither 'saliency' nor 'gradcam' is registered yet")
    d, ckpt = setup
    cfg = config(d, ckpt, tiny_voc, {n: {} for n in names}, metrics=["deletion_auc", "insertion_auc", "miou"],
                 num_images=3)
    out = tmp_path / "results.json"
    res = E.evaluate(cfg, out, progress=False)
    assert set(res["methods"]) == set(names)
    for entry in res["methods"].values():
        assert set(entry["metrics"]) == {"deletion_auc", "insertion_auc", "miou"}
    assert json.loads(out.read_text())["methods"].keys() == res["methods"].keys()


def test_method_that_cannot_run_on_a_randomised_model(setup, tiny_voc):
    d, ckpt = setup
    f = explainer.load_explanandum(str(ckpt))
    fp = float(sum(p.double().sum() for p in f.parameters()))
    cfg = config(d, ckpt, tiny_voc, {"bound": {"factory": f"{d / 'standin.py'}:Bound", "fingerprint": fp}},
                 metrics=["deletion_auc", "randomization_spearman"], num_images=2)
    res, _ = E.run(cfg, progress=False)
    entry = res["methods"]["bound"]
    assert set(entry["metrics"]) == {"deletion_auc"}
    assert "randomised explanandum" in entry["skipped_metrics"]["randomization_spearman"]


def test_wrong_map_shape_names_the_method(setup, tiny_voc):
    d, ckpt = setup
    (d / "bad.py").write_text("import torch\n\nclass Small:\n    def __init__(self, f):\n        pass\n\n"
                              "    def attribute(self, x, target):\n        return torch.rand(x.shape[0], 1, 7, 7)\n")
    cfg = config(d, ckpt, tiny_voc, {"small": {"factory": f"{d / 'bad.py'}:Small"}}, metrics=["deletion_auc"],
                 num_images=2)
    with pytest.raises(ValueError, match="method 'small': maps: expected attribution maps of shape"):
        E.run(cfg, progress=False)


def test_channels_last_falls_back_for_a_model_that_cannot_take_it():
    """A classifier whose code needs contiguous feature maps (a ``view``) keeps its own format, with a warning; a
    plain convnet is converted and gives the same logits."""
    from torch import nn

    class Viewing(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(x.shape[0], -1))  # view: contiguous (N, C, H, W) only

    x = torch.rand(2, 3, 8, 8)
    f = explainer.explanandum.Explanandum(Viewing(), 2)
    before = f(x)
    with pytest.warns(UserWarning, match="channels_last: false"):
        assert f.try_channels_last(x[:1]) is False
    assert f.model.conv.weight.is_contiguous() and torch.equal(f(x), before)
    g = explainer.explanandum.Explanandum(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                                        nn.Flatten(), nn.Linear(4, 2)), 2)
    plain = g(x)
    assert g.try_channels_last(x[:1]) is True
    assert g.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g(x), plain, atol=1e-5, rtol=0)
    # a probe that fails in both formats (not the layout): no warning, the model as it was; the evaluation raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f.try_channels_last(torch.rand(1, 3, 5, 5)) is False
    assert f.model.conv.weight.is_contiguous()
