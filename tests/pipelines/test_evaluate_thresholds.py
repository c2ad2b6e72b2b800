"""evaluate's validated thresholds, the region metrics end to end, and what it says about short splits."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import tiny_classifier

import explainer
from explainer import metrics as M
from explainer.data import synthetic
from explainer.metrics import regions as R
from explainer.metrics import registry
from explainer.pipelines import evaluate as E
from explainer.pipelines import quickstart

METHODS = textwrap.dedent('''
    import torch

    class Saliency:
        """|d logit_t / d x| summed over colour channels."""

        def __init__(self, f):
            self.f = f

        def attribute(self, x, target):
            x = x.detach().clone().requires_grad_(True)
            self.f(x).gather(1, torch.as_tensor(target).view(-1, 1)).sum().backward()
            return x.grad.abs().sum(1, keepdim=True)

    class Bright:
        """A model-independent map: the image's brightness."""

        def __init__(self, f):
            pass

        def attribute(self, x, target):
            return x.mean(1, keepdim=True)
''')
VAL = {"segmentation": {"threshold": "val", "void_band": 5}, "iou": {"threshold": "val"},
       "boundary_f1": {"threshold": "val"}}
REGION_METRICS = ["miou", "f1", "pixel_ap", "iou", "boundary_f1", "energy_pointing", "wrong_object"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("thr")
    (d / "methods.py").write_text(METHODS)
    return d, tiny_classifier(d / "tiny.safetensors", num_classes=len(synthetic.CLASSES))


def config(d, ckpt, tiny_voc, **kw):
    cfg = {"explanandum": str(ckpt),
           "data": {"class_path": "explainer.data.VOCDataModule",
                    "init_args": {"root": str(tiny_voc), "image_size": 32, "num_workers": 0}},
           "split": "test", "num_images": 6, "seed": 0, "target": "groundtruth",
           "methods": {"sal": {"factory": f"{d / 'methods.py'}:Saliency"},
                       "bright": {"factory": f"{d / 'methods.py'}:Bright"}},
           "metrics": REGION_METRICS, "metric_options": VAL, "threshold_images": 5,
           "batch_size": 4, "device": "cpu", "figure_images": 0}
    cfg.update(kw)
    return cfg


def _pairs(cfg, split, n, method, f):
    _, ds = E.build_dataset(cfg["data"], split, n, cfg["seed"])
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([s["image"] for s in items])
    idx, t = E.make_pairs(f, x, torch.stack([s["labels"] for s in items]), "groundtruth", 64)
    gt = torch.stack([s["mask"] for s in items])[idx]
    return x[idx], t, gt, method.attribute(x[idx], t)


def test_val_threshold_is_chosen_on_validation_and_applied(setup, tiny_voc):
    d, ckpt = setup
    cfg = config(d, ckpt, tiny_voc)
    res, _ = E.run(cfg, progress=False)
    assert res["validation_images"] == {"split": "val", "num_images": 5}
    f = explainer.load_explanandum(str(ckpt))
    mod = E.import_object(f"{d / 'methods.py'}:Bright")
    for name in ("sal", "bright"):
        entry = res["methods"][name]
        chosen = {m: entry["thresholds"][m]["threshold"] for m in ("miou", "f1", "iou", "boundary_f1")}
        assert len(set(chosen.values())) == 1 and entry["thresholds"]["iou"]["void_band"] == 5
        assert set(entry["thresholds"]) == {"miou", "f1", "iou", "boundary_f1"}  # pixel_ap uses no threshold
        # the same numbers as every metric at that fixed threshold
        fixed = {"segmentation": {"threshold": chosen["iou"], "void_band": 5}, "iou": {"threshold": chosen["iou"]},
                 "boundary_f1": {"threshold": chosen["iou"]}}
        again, _ = E.run(config(d, ckpt, tiny_voc, methods={name: cfg["methods"][name]}, metric_options=fixed),
                         progress=False)
        assert again["methods"][name]["metrics"] == pytest.approx(entry["metrics"], abs=1e-12)
        assert "thresholds" not in again["methods"][name] and "validation_images" not in again
    # the choice and the test values by hand for the model-independent method
    method = mod(f)
    _, tv, gv, mv = _pairs(cfg, "val", 5, method, f)
    t_best = R.choose_threshold(mv, gv, tv)
    assert res["methods"]["bright"]["thresholds"]["boundary_f1"]["threshold"] == t_best
    _, tt, gt, mt = _pairs(cfg, "test", 6, method, f)
    vals = res["methods"]["bright"]["metrics"]
    for key, per_map in (("iou", R.iou(mt, gt, tt, t_best)), ("boundary_f1", R.boundary_f1(mt, gt, tt, t_best)),
                         ("energy_pointing", R.energy_pointing(mt, gt, tt)),
                         ("wrong_object", R.wrong_object(mt, gt, tt))):
        assert vals[key] == pytest.approx(float(per_map[~per_map.isnan()].mean()), abs=1e-9), key
    assert res["metric_specs"]["wrong_object"]["direction"] == "lower"
    assert "threshold 'val' (one per method" in res["metric_specs"]["miou"]["description"]
    assert "void_band 5" in res["metric_specs"]["f1"]["description"]
    assert res["metric_specs"]["boundary_f1"]["direction"] == "higher"


def test_more_images_than_the_split_is_said(setup, tiny_voc):
    """Issue 22: asking for more images than the split has is said in the log and in results.json."""
    d, ckpt = setup
    cfg = config(d, ckpt, tiny_voc, num_images=50, metrics=["miou"], metric_options={},
                 methods={"bright": {"factory": f"{d / 'methods.py'}:Bright"}})
    cfg.pop("threshold_images")
    with pytest.warns(UserWarning, match="fewer than the 50 asked for"):
        res, _ = E.run(cfg, progress=False)
    assert res["num_images"] == 12 and res["num_images_requested"] == 50
    assert res["notes"] == ["split 'test' has 12 images, fewer than the 50 asked for (num_images): all 12 used"]
    assert "fewer than the 50" in E.markdown_table(res)
    exact, _ = E.run(dict(cfg, num_images=12), progress=False)
    assert "notes" not in exact and "num_images_requested" not in exact


def test_fewer_validation_images_than_asked_is_said(setup, tiny_voc):
    d, ckpt = setup
    cfg = config(d, ckpt, tiny_voc, threshold_images=40, metrics=["iou"], metric_options={"iou": {"threshold": "val"}},
                 methods={"bright": {"factory": f"{d / 'methods.py'}:Bright"}})
    with pytest.warns(UserWarning, match="threshold_images"):
        res, _ = E.run(cfg, progress=False)
    assert res["validation_images"] == {"split": "val", "num_images": 12}
    assert any("'val' has 12 images, fewer than the 40" in n for n in res["notes"])
    with pytest.warns(UserWarning, match="thresholds chosen on the evaluated split 'test' itself"):
        same, _ = E.run(dict(cfg, threshold_split="test", threshold_images=5), progress=False)
    assert same["validation_images"] == {"split": "test", "num_images": 5}


def test_val_threshold_needs_validation_and_keys_come_from_the_parser():
    tr = M.MetricTracker(["boundary_f1"], {"boundary_f1": {"threshold": "val"}})
    x = torch.rand(1, 3, 8, 8)
    batch = M.PairBatch(None, x, torch.rand(1, 1, 8, 8), torch.tensor([0]), torch.tensor([0]),
                        torch.ones(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="threshold 'val' is chosen on validation images"):
        tr.update(batch)
    with pytest.raises(ValueError, match="no validation images"):
        tr.prepare(M.MethodContext(None, None, rebuild=lambda g: None, attribute=lambda m, a, b: None))
    keys = E.config_keys()
    assert {"threshold_images", "threshold_split", "num_images", "metric_options"} <= set(keys)
    with pytest.raises(ValueError, match="unknown key.*'nope'.*threshold_images"):
        E.validate_config({"explanandum": "x", "data": {"class_path": "a.B"}, "methods": {"a": {}}, "nope": 1})


def test_group_options_reach_the_group():
    # a group name in metric_options (here the segmentation group) is accepted, and membership tests on the
    # registry answer False for unknown names instead of raising
    assert "segmentation" not in M.METRICS and ["a"] not in M.METRICS and "miou" in M.METRICS
    tr = M.MetricTracker(["miou", "f1"], {"segmentation": {"threshold": 0.3}})
    assert tr.options == {"miou": {"threshold": 0.3}, "f1": {"threshold": 0.3}}


def test_generic_code_names_no_metric():
    for src in (inspect.getsource(E), inspect.getsource(registry.MetricTracker)):
        for name in M.available():
            assert f'"{name}"' not in src and f"'{name}'" not in src, name


REPO = Path(explainer.__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["quickstart_evaluate", "results", "results_distill", "results_distill_extremal",
                                  "results_extremal", "results_faithful", "results_ltx", "results_noltx",
                                  "results_sharp", "results_sharp_baselines"])
def test_synthetic_result_configs_use_validated_thresholds(name):
    cfg = E.load_config(REPO / "configs" / "synthetic" / f"{name}.yaml")  # keys, metric names and options checked
    assert {"iou", "boundary_f1", "energy_pointing", "wrong_object", "deletion_auc_nli"} <= set(cfg["metrics"])
    opts = cfg["metric_options"]
    assert opts["segmentation"] == {"threshold": "val", "void_band": 5}
    assert opts["iou"]["threshold"] == opts["boundary_f1"]["threshold"] == "val"


def test_quickstart_table_lists_the_new_metrics_and_thresholds(setup, tiny_voc):
    d, ckpt = setup
    cfg = config(d, ckpt, tiny_voc, methods={"explainer": {"factory": f"{d / 'methods.py'}:Bright"},
                                             "sal": {"factory": f"{d / 'methods.py'}:Saliency"}})
    res, _ = E.run(cfg, progress=False)
    lines = quickstart.metrics_table(res, {"map": 0.9, "map_erased": 0.1, "chance_map": 0.2, "num_images": 6})
    head = next(line for line in lines if line.startswith("| method"))
    assert "wrong_object ↓" in head and "boundary_f1 ↑" in head and "energy_pointing ↑" in head
    row = next(line for line in lines if line.startswith("| explainer"))
    assert f"{res['methods']['explainer']['metrics']['iou']:.3f}" in row
    t = {m: res["methods"][m]["thresholds"]["iou"]["threshold"] for m in ("explainer", "sal")}
    assert lines[-1] == f"Thresholds chosen on 5 validation images (threshold: val): explainer {t['explainer']:g}, " \
                        f"sal {t['sal']:g}."
