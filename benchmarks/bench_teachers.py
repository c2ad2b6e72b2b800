"""Seconds per (image, class) map of each distillation teacher on the embedded benchmark, at the settings the
distillation configs use and at the papers' settings, one run on the same images.

    python benchmarks/bench_teachers.py --images 8

Images: the first ``--images`` training images of data/synthetic (128 px), one map per present class; the
explanandum is checkpoints/synthetic_classifier.safetensors. The cost of a cache over N training images is
about N x (maps per image, 1.5 here) x these figures.
"""

from __future__ import annotations

import argparse
import time

import torch

import explainer

TEACHERS = {
    "dix": ("dix", {}),
    "rise (4000 masks, paper)": ("rise", {"n_masks": 4000}),
    "rise (1000 masks)": ("rise", {"n_masks": 1000}),
    "extremal_perturbation (800 it., 4 areas, paper)": ("extremal_perturbation", {}),
    "extremal_perturbation (150 it., 3 areas)": ("extremal_perturbation",
                                                  {"max_iter": 150, "areas": [0.05, 0.1, 0.2]}),
    "ltx (validated, 10 steps)": ("ltx", {"checkpoint": "checkpoints/synthetic_ltx.safetensors"}),
    "gradcam": ("gradcam", {}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--skip", nargs="*", default=[])
    a = p.parse_args()
    f = explainer.load_explanandum("checkpoints/synthetic_classifier.safetensors")
    dm = explainer.data.SyntheticDataModule(root="data/synthetic", num_images={"train": 6000, "val": 500,
                                                                              "test": 1000}, num_workers=0)
    ds = dm.dataset("train", train_transform=False)
    samples = [ds[i] for i in range(a.images)]
    x = torch.stack([s["image"] for s in samples])
    nz = (torch.stack([s["labels"] for s in samples]) > 0.5).nonzero()
    xp, t = x[nz[:, 0]], nz[:, 1]
    print(f"{a.images} images, {len(t)} maps, {torch.get_num_threads()} threads\n")
    print("| teacher | s/map | s/image |\n|---|---:|---:|")
    for label, (name, opts) in TEACHERS.items():
        if (a.only and not any(o in label for o in a.only)) or any(s in label for s in a.skip):
            continue
        m = explainer.methods.get(name, f, **opts)
        n = len(t) if "extremal" not in name else min(len(t), 2)
        t0 = time.perf_counter()
        m.attribute(xp[:n], t[:n])
        dt = (time.perf_counter() - t0) / n
        print(f"| {label} | {dt:.4g} | {dt * len(t) / a.images:.4g} |", flush=True)


if __name__ == "__main__":
    main()
