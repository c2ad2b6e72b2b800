"""``python -m explainer trust``: fit an explainer's trust model on validation images and write it into a copy
of its checkpoint; optionally measure it on held-out images.

The masks scored are those of each image's ground-truth classes. A mask is *bad* when its IoU against its
class's region (thresholded at the explainer's own threshold, chosen on the same validation images) is below
``--min_iou`` or its peak lies off the region (:func:`explainer.metrics.bad_masks`). The features are chosen by
greedy forward selection on the validation masks (two-fold cross-validated AUROC), among those whose extra
cost stays within ``--max_cost``, unless ``--features`` names them, and with them the L2 penalty and whether
pairwise products of the features enter (``--l2``, ``--interactions``); the logistic regression is fitted on
all validation masks (docs/TRUST.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt

from explainer.core.io import atomic_path
from explainer.data.build import build_datamodule
from explainer.explainers.export import export_safetensors
from explainer.explainers.loading import load
from explainer.explainers.trust import (
    FEATURES,
    feature_cost,
    fit_trust_model,
    select_features,
    trust_auroc,
    trust_of,
    trust_signals,
)
from explainer.metrics import bad_masks, choose_threshold
from explainer.pipelines.args import parse

SYNTHETIC = {"class_path": "explainer.data.SyntheticDataModule",
             "init_args": {"root": "data/synthetic", "num_images": {"train": 6000, "val": 500, "test": 1000},
                           "num_workers": 0}}


def collect(e: Any, dm: Any, split: str, n: int, batch_size: int = 32,
            features: Sequence[str] | None = None) -> dict[str, Any]:
    """Signals (``features``; None: all), maps (P, 1, S, S), segmentations (P, S, S) and classes (P,) of the
    ground-truth classes' masks of the first ``n`` images of ``split``, and the seconds the signals took."""
    ds = dm.dataset(split, train_transform=False)
    n = min(n, len(ds))
    signals, maps, gts, classes, seconds = [], [], [], [], 0.0
    for i in range(0, n, batch_size):
        items = [ds[j] for j in range(i, min(i + batch_size, n))]
        x = torch.stack([it["image"] for it in items]).to(e.device)
        chosen = [torch.nonzero(it["labels"] > 0.5)[:, 0] for it in items]
        with torch.no_grad():
            probs = e.class_probabilities(x)
            masks = e.selected_masks(x, chosen)
            t = time.perf_counter()
            signals.append(trust_signals(e, x, chosen, masks, probs, features))
            seconds += time.perf_counter() - t
        for it, c, m in zip(items, chosen, masks):
            maps.append(m[:, None].cpu())
            gts.append(it["mask"].expand(len(c), -1, -1))
            classes.append(c.cpu())
    if not classes or not sum(len(c) for c in classes):
        raise ValueError(f"trust: the {n} images of split {split!r} have no labelled classes to score")
    return {"signals": {k: torch.cat([s[k] for s in signals]) for k in signals[0]}, "maps": torch.cat(maps),
            "gt": torch.cat(gts), "classes": torch.cat(classes), "seconds": seconds, "images": n}


def labelled(d: dict[str, Any], threshold: float, min_iou: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The signals and the bad-mask labels of the masks that can be scored (their class has pixels)."""
    bad = bad_masks(d["maps"], d["gt"], d["classes"], threshold, min_iou=min_iou)
    ok = ~torch.isnan(bad)
    return {k: v[ok] for k, v in d["signals"].items()}, bad[ok] > 0.5


def summary(trust: torch.Tensor, bad: torch.Tensor, high: float = 0.8) -> dict[str, float]:
    """AUROC of low trust for bad masks, and the share of good masks among those of trust >= ``high``."""
    sure = trust >= high
    return {"masks": int(len(bad)), "bad_share": float(bad.float().mean()), "trust_auroc": trust_auroc(trust, bad),
            f"share_trust_ge_{high}": float(sure.float().mean()),
            f"good_among_trust_ge_{high}": float((~bad[sure]).float().mean()) if sure.any() else float("nan")}


def config_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m explainer trust", exit_on_error=False,
                       description="Fit a trained explainer's trust model on validation images (ground truth "
                                   "used only there) and write a copy of the checkpoint that holds it.")
    p.add_argument("--config", action="config")
    p.add_argument("--checkpoint", type=str, required=True)
    p.add_argument("--out", type=str, required=True, help="the safetensors file to write (not the checkpoint)")
    p.add_argument("--data", type=dict[str, Any] | None, default=None,
                   help="datamodule section (class_path, init_args); default: the embedded benchmark")
    p.add_argument("--split", type=str, default="val", help="the images the model is fitted on")
    p.add_argument("--num_images", "--num-images", type=PositiveInt, default=500,
                   help="the first N images of --split (500: the whole validation split of the embedded benchmark; "
                        "a fit on its first 300 generalised worse to test images, docs/TRUST.md)")
    p.add_argument("--features", type=list[str] | None, default=None,
                   help=f"features among {list(FEATURES)}; default: chosen greedily on --split")
    p.add_argument("--min_iou", "--min-iou", type=float, default=0.2, help="below it a mask is bad")
    p.add_argument("--max_cost", "--max-cost", type=float | None, default=None,
                   help="choose only features whose extra cost (explainer.explainers.trust.FEATURE_COST, in units "
                        "of explanation()'s own cost) stays within this; null: no limit")
    p.add_argument("--l2", type=list[float], default=[1e-3, 1e-2, 1e-1],
                   help="L2 penalties to choose from on --split (two-fold CV AUROC)")
    p.add_argument("--interactions", type=bool | None, default=None,
                   help="pairwise products of the features too; default: chosen on --split (two-fold CV AUROC)")
    p.add_argument("--test_split", "--test-split", type=str | None, default=None,
                   help="also measure the fitted model on this split (e.g. test)")
    p.add_argument("--test_images", "--test-images", type=PositiveInt, default=300)
    p.add_argument("--report", type=str | None, default=None, help="a JSON file for the measurements")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parse(config_parser(), argv)
    unknown = [f for f in (a.features or []) if f not in FEATURES]
    if unknown:
        raise ValueError(f"--features: unknown {unknown}; expected some of {list(FEATURES)}")
    if not a.l2 or any(not v >= 0 for v in a.l2):
        raise ValueError(f"--l2: expected one or more penalties >= 0, got {a.l2}")
    if Path(a.out).resolve() == Path(a.checkpoint).resolve():
        raise ValueError("--out: expected a new file, got the checkpoint itself (it is never overwritten)")
    e = load(a.checkpoint)
    e.trust_model = None
    dm = build_datamodule(a.data or SYNTHETIC)
    val = collect(e, dm, a.split, a.num_images, features=a.features)  # all signals when they are to be chosen
    threshold = choose_threshold(val["maps"], val["gt"], val["classes"])
    signals, bad = labelled(val, threshold, a.min_iou)
    options = [(inter, l2) for inter in ((False, True) if a.interactions is None else (a.interactions,))
               for l2 in a.l2]
    if a.features:
        features, cv = list(a.features), None
        interactions, l2 = options[0]
    else:
        tried = [(select_features(signals, ~bad, l2=l2, interactions=inter, max_cost=a.max_cost), inter, l2)
                 for inter, l2 in options]
        (features, cv), interactions, l2 = max(tried, key=lambda t: t[0][1])
        if not features:
            raise ValueError(f"trust: no feature ranks the bad masks of split {a.split!r} above chance; "
                             "nothing to fit")
    e.trust_model = fit_trust_model(signals, ~bad, features, l2,
                                    fitted_on=f"{a.split}: {val['images']} images, {len(bad)} masks, "
                                              f"IoU threshold {threshold}, min_iou {a.min_iou}, l2 {l2}",
                                    interactions=interactions)
    report = {"checkpoint": a.checkpoint, "features": features, "interactions": interactions, "l2": l2,
              "cv_auroc": cv, "max_cost": a.max_cost, "feature_cost": feature_cost(features),
              "iou_threshold": threshold,
              "fit": summary(trust_of(e, signals), bad), "model": e.trust_model.to_dict()}
    if a.test_split:
        test = collect(e, dm, a.test_split, a.test_images, features=e.trust_model.features)
        t_signals, t_bad = labelled(test, threshold, a.min_iou)
        report["test"] = {**summary(trust_of(e, t_signals), t_bad), "split": a.test_split,
                          "signals_ms_per_image": 1000 * test["seconds"] / test["images"]}
    path = export_safetensors(e, a.out)
    if a.report:
        with atomic_path(Path(a.report)) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "model"}, indent=1))
    print(f"wrote {path}")
    return 0
