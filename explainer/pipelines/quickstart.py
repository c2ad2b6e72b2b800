"""The main job on the embedded default: ``python -m explainer quickstart``.

1. Generate the synthetic VOC-format benchmark (skipped when present and current).
2. Evaluate the committed classifier: test mAP, per-class AP, and mAP with the
   objects erased (it must collapse if the classifier uses the objects).
3. Train the Explainer with configs/synthetic/explainer.yaml (LightningCLI).
4. Compare it with Grad-CAM on the test split (configs/synthetic/quickstart_evaluate.yaml): mIoU, IoU, F1
   and boundary F at a threshold chosen per method on validation images, energy inside the object, peaks on
   another object, pointing game, deletion (mean and nli fills), insertion, and the mean mask of present and
   absent classes.
5. Write outputs/quickstart/: classifier.json, metrics.md, results.json, figure.png.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser

from explainer.core.io import atomic_path
from explainer.data import SyntheticDataModule
from explainer.explainers.loading import load
from explainer.explanandum import load_explanandum
from explainer.pipelines.args import parse
from explainer.pipelines.classifier_eval import evaluate_classifier
from explainer.pipelines.evaluate import main as evaluate_main
from explainer.pipelines.train import train_cli

OUT = Path("outputs/quickstart")


def _classifier_report(dm, clf_path: str, out: Path) -> dict:
    f = load_explanandum(clf_path)
    ds = dm.dataset("test")
    f.try_channels_last(ds[0]["image"][None])  # oneDNN's faster layout on the CPU, where the model can take it
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=0)
    rep = evaluate_classifier(f, loader)
    (out / "classifier.json").write_text(json.dumps(rep, indent=1))
    return rep


def _figure(out: Path) -> None:
    """figure.png: the comparison's own figure (evaluate's results.png: each test image with its class's
    ground-truth region outlined, the Explainer's and Grad-CAM's maps, a legend), copied under the quickstart's
    name."""
    src = out / "results.png"
    if src.is_file():
        with atomic_path(out / "figure.png") as tmp:
            tmp.write_bytes(src.read_bytes())


def _mask_areas(e, dm, n: int = 200) -> dict:
    """Mean mask of present and of absent classes over n test images (class-specificity at a glance)."""
    ds = dm.dataset("test")
    pres, absn = [], []
    for i in range(0, min(n, len(ds)), 32):
        batch = [ds[j] for j in range(i, min(i + 32, n, len(ds)))]
        x = torch.stack([b["image"] for b in batch])
        y = torch.stack([b["labels"] for b in batch]) > 0.5
        area = e.explain(x).flatten(2).mean(2)
        pres.append(area[y])
        absn.append(area[~y])
    return {"mean_mask_present": float(torch.cat(pres).mean()), "mean_mask_absent": float(torch.cat(absn).mean())}


def metrics_table(results: dict, rep: dict) -> list[str]:
    """metrics.md's head: the classifier line, one row per method (arrows: the better direction), the thresholds
    chosen on validation images."""
    names = list(results["methods"]["explainer"]["metrics"])
    arrow = {"higher": " ↑", "lower": " ↓"}
    specs = results.get("metric_specs", {})
    lines = ["# Quickstart results (embedded benchmark, test split)", "",
             f"Classifier: test mAP **{rep['map']:.3f}**, with objects erased "
             f"{rep.get('map_erased', float('nan')):.3f} (chance {rep['chance_map']:.3f}), "
             f"{rep['num_images']} images.", "",
             "| method | " + " | ".join(n + arrow.get(specs.get(n, {}).get("direction"), "") for n in names)
             + " | s/image |", "|---|" + "---|" * (len(names) + 1)]
    for name, r in results["methods"].items():
        vals = " | ".join(f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "n/a" for k in names)
        lines.append(f"| {name} | {vals} | {r['seconds_per_image']:.4f} |")
    chosen = {name: r["thresholds"] for name, r in results["methods"].items() if r.get("thresholds")}
    if chosen:
        val = results.get("validation_images", {})
        lines += ["", f"Thresholds chosen on {val.get('num_images', '?')} validation images (threshold: val): "
                  + ", ".join(f"{name} {next(iter(t.values()))['threshold']:g}" for name, t in chosen.items()) + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m explainer quickstart", description=__doc__)
    p.add_argument("--train-config", default="configs/synthetic/explainer.yaml")
    p.add_argument("--eval-config", default="configs/synthetic/quickstart_evaluate.yaml")
    p.add_argument("--classifier", default="checkpoints/synthetic_classifier.safetensors")
    p.add_argument("--skip-training", action="store_true", help="evaluate an existing runs/explainer checkpoint")
    p.add_argument("--out", default=str(OUT))
    a = parse(p, argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.time()
    conf = yaml.safe_load(Path(a.train_config).read_text())["data"]["init_args"]
    dm = SyntheticDataModule(root=conf["root"], num_images=conf["num_images"], num_workers=0)
    print("[1/4] generating the embedded benchmark (once) ...", flush=True)
    dm.prepare_data()
    times["generate_s"] = time.time() - t0

    print("[2/4] evaluating the committed classifier ...", flush=True)
    t = time.time()
    rep = _classifier_report(dm, a.classifier, out)
    times["classifier_eval_s"] = time.time() - t
    print(f"      test mAP {rep['map']:.3f}; objects erased {rep.get('map_erased', float('nan')):.3f}; "
          f"chance {rep['chance_map']:.3f}", flush=True)

    t = time.time()
    if not a.skip_training:
        print("[3/4] training the Explainer ...", flush=True)
        train_cli(["fit", "--config", a.train_config])
    times["train_s"] = time.time() - t
    # the end of the run: the config's objective changes for its last quarter (``sharpen``), so the checkpoint
    # best on val/miou (at a fixed 0.5 threshold) may be one from before, which is not the model it trains
    ckpt = Path("runs/explainer/checkpoints/last.ckpt")
    if not ckpt.is_file():
        ckpt = Path("runs/explainer/checkpoints/best.ckpt")

    print("[4/4] comparing with Grad-CAM on the test split ...", flush=True)
    t = time.time()
    ev = yaml.safe_load(Path(a.eval_config).read_text())
    ev["methods"]["explainer"]["checkpoint"] = str(ckpt)
    ev_path = out / "evaluate.yaml"
    ev_path.write_text(yaml.safe_dump(ev))
    evaluate_main(["--config", str(ev_path), "--out", str(out / "results.json")])
    e = load(ckpt)
    areas = _mask_areas(e, dm)
    _figure(out)
    times["evaluate_s"] = time.time() - t
    times["total_s"] = time.time() - t0

    results = json.loads((out / "results.json").read_text())
    lines = metrics_table(results, rep)
    lines += ["", f"Explainer mean mask: present classes {areas['mean_mask_present']:.3f}, "
              f"absent classes {areas['mean_mask_absent']:.3f}.", "",
              "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
    (out / "metrics.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"classifier": rep, "mask_areas": areas, "times": times,
                                                  "checkpoint": str(ckpt)}, indent=1))
    print("\n".join(lines))
    print(f"wrote {out}/metrics.md, results.json, figure.png", flush=True)
    return 0

