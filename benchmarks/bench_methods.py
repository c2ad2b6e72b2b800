"""Seconds per image of every attribution method on the same explanandum and the same batch, one run.

Every method of :func:`explainer.methods.available` runs on the same images (synthetic benchmark scenes
rendered in memory) and the same targets (the predicted top-1); the time of ``attribute`` divided by the
number of images is reported as a markdown table. The extremal methods also report the mean
``|achieved - requested|`` area of their masks (threshold 0.5, :func:`explainer.methods.achieved_area`).
The amortized explainers run only when given ``--amortized NAME=CHECKPOINT``.

Run (defaults: ``checkpoints/synthetic_classifier.safetensors`` if it exists, else a randomly initialised
``timm:explainer_resnet_small`` with 8 classes; 128 px; the papers' settings):

    python benchmarks/bench_methods.py --images 8
    python benchmarks/bench_methods.py --images 2 --size 64 --quick       # a smoke run in about a minute

``--quick`` cuts the iterative methods' budgets (EP/INR 100 steps, RISE 500 masks, IG 16 steps, IIA 4
steps) and says so in the table; full settings are each method's defaults.

Measured once (CPU, torch 2.14, one thread, two cores shared with training jobs; random-init
``explainer_resnet_small``, 8 classes; seconds per image; last column mean |achieved - requested| area):

    --images 2 --size 64 (full budgets)          --images 4 --size 128 --quick
    dix                        0.014              0.011
    extremal_perturbation     23.3   0.011        9.26  (100 it.)  0.314
    gradcam                    0.040              0.018
    gradcam++                  0.003              0.003
    iia                        0.031              0.023 (steps 4)
    inr_extremal_perturbation 23.9   0.003        6.94  (100 it.)  0.011
    integrated_gradients       0.094              0.069 (16 steps)
    occlusion                  0.117              0.365
    rise                       2.02               0.943 (500 masks)
    saliency                   0.006              0.005
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

import explainer  # noqa: E402
import explainer.methods as M  # noqa: E402

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "synthetic_classifier.safetensors"
EXTREMAL = ("extremal_perturbation", "inr_extremal_perturbation")
AREAS = (0.05, 0.1, 0.2, 0.3)

QUICK = {
    "integrated_gradients": {"steps": 16},
    "rise": {"n_masks": 500},
    "extremal_perturbation": {"max_iter": 100},
    "inr_extremal_perturbation": {"max_iter": 100},
    "iia": {"steps": 4},
}


def scenes(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` synthetic benchmark scenes (n, 3, size, size) in [0, 1], rendered in memory."""
    from explainer.data.synthetic import render

    rng = np.random.default_rng(seed)
    imgs = [render(rng, size)[0] for _ in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


def load(spec: str | None) -> explainer.Explanandum:
    if spec:
        return explainer.load_explanandum(spec)
    if DEFAULT_CHECKPOINT.is_file():
        return explainer.load_explanandum(str(DEFAULT_CHECKPOINT))
    torch.manual_seed(0)
    return explainer.load_explanandum("timm:explainer_resnet_small", num_classes=8, multilabel=True)


def needs_checkpoint(name: str) -> bool:
    """Whether the registered method cannot be built without ``checkpoint=`` (the amortized explainers)."""
    from explainer.methods.base import _REGISTRY

    p = inspect.signature(_REGISTRY[name]).parameters.get("checkpoint")
    return p is not None and p.default is inspect.Parameter.empty


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="explanandum spec (default: see the module docstring)")
    ap.add_argument("--images", type=int, default=8, help="number of images (one batch)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--methods", default=None, help="comma-separated names (default: all available)")
    ap.add_argument("--quick", action="store_true", help="reduced budgets for the iterative methods")
    ap.add_argument("--internal-batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amortized", action="append", default=[], metavar="NAME=CHECKPOINT",
                    help="run an amortized method (explainer, ltx, ...) from its checkpoint; repeatable")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    f = load(args.checkpoint).to(args.device)
    x = scenes(args.images, args.size).to(args.device)
    with torch.no_grad():
        target = f(x).argmax(dim=1)
    names = args.methods.split(",") if args.methods else M.available()
    amortized = dict(a.split("=", 1) for a in args.amortized)
    rows = []
    for name in names:
        options: dict = {"internal_batch_size": args.internal_batch_size}
        if name in amortized:
            options = {"checkpoint": amortized[name]}
        elif needs_checkpoint(name):
            print(f"# {name}: skipped (give --amortized {name}=CHECKPOINT)", file=sys.stderr)
            continue
        if args.quick:
            options.update(QUICK.get(name, {}))
        if name in EXTREMAL:
            options["areas"] = AREAS
        method = M.get(name, f, **options)
        t0 = time.perf_counter()
        maps = method.attribute(x, target)
        seconds = (time.perf_counter() - t0) / x.shape[0]
        row = {"method": name, "seconds_per_image": seconds,
               "options": ", ".join(f"{k}={v}" for k, v in options.items() if k not in ("internal_batch_size",
                                                                                     "areas", "checkpoint")),
               "area_error": None}
        if name in EXTREMAL:
            masks = method.masks(x, target) if name == "extremal_perturbation" else method.fit(x, target).masks(AREAS)
            err = (M.achieved_area(masks, threshold=0.5) - torch.tensor(AREAS, device=masks.device)).abs().mean()
            row["area_error"] = float(err)
        assert maps.shape == (x.shape[0], 1, *x.shape[-2:])
        rows.append(row)
        print(f"# {name}: {seconds:.3f} s/image", file=sys.stderr, flush=True)

    print(f"\nexplanandum: {f.spec or type(f.model).__name__}, images: {x.shape[0]} x {args.size} px, "
          f"device: {args.device}, threads: {torch.get_num_threads()}, budgets: {'quick' if args.quick else 'full'}\n")
    print("| method | seconds / image | options | mean abs(achieved - requested area) |")
    print("|---|---:|---|---:|")
    for r in rows:
        err = "" if r["area_error"] is None else f"{r['area_error']:.3f}"
        print(f"| {r['method']} | {r['seconds_per_image']:.3f} | {r['options'] or 'defaults'} | {err} |")
    return rows


if __name__ == "__main__":
    main()
