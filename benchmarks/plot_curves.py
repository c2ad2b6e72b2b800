"""Deletion and insertion curves, mean over (image, class) pairs, as the papers plot them: one figure, four panels
(deletion and insertion, under the mean fill and under blur).

    python benchmarks/plot_curves.py --config configs/synthetic/results_faithful.yaml --images 30 \
        --methods faithful ensemble explainer gradcam dix rise integrated_gradients --out docs/img/distill_curves.png

The methods, data and explanandum come from an ``evaluate`` config; the images are the seeded test subset of
``--images`` (the first of the config's subset), one map per present class.
"""

from __future__ import annotations

import argparse

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from explainer import metrics as M
from explainer.core.io import atomic_path
from explainer.pipelines import evaluate as E


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    cfg = E.load_config(a.config)
    f = E.build_explanandum(cfg["explanandum"])
    _, ds = E.build_dataset(cfg["data"], cfg["split"], a.images, cfg["seed"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
    img, t = E.make_pairs(f, batch["image"], batch["labels"], "groundtruth", 256)
    x = batch["image"][img]
    fig = Figure(figsize=(10, 7.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for name in a.methods:
        maps = E._attribute(E.build_method(name, f, cfg["methods"][name]), x, t, 16)
        for col, fill in enumerate(("mean", "blur")):
            for row, fn in enumerate((M.deletion_auc, M.insertion_auc)):
                auc, curves = fn(f, x, maps, t, baseline=fill, steps=a.steps, return_curves=True)
                frac = torch.linspace(0, 1, curves.shape[1])
                ax = axes[row, col]
                ax.plot(frac.numpy(), curves.mean(0).numpy(), label=f"{name} ({float(auc.mean()):.3f})")
                ax.set_title(f"{'deletion' if row == 0 else 'insertion'}, {fill} fill "
                             f"({'lower' if row == 0 else 'higher'} AUC is better)", fontsize=9)
                ax.set_xlabel("fraction of pixels removed" if row == 0 else "fraction of pixels inserted", fontsize=8)
                ax.set_ylabel("probability of the class", fontsize=8)
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle(f"{len(t)} (image, class) pairs of {a.images} test images", fontsize=10)
    fig.tight_layout()
    with atomic_path(a.out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
