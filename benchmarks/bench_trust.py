"""Trust scores and selective refinement: what they cost and what they recover (issue 24).

    python benchmarks/bench_trust.py --checkpoint checkpoints/synthetic_explainer.safetensors \
        [--images 100] [--val-images 60] [--repeats 3] [--plot docs/img/refinement.png] [--json FILE]

One run, test images of the embedded benchmark, one mask per (image, ground-truth class):

* cost: ``explanation(x, top_k=2, trust=True)`` against ``explanation(x, top_k=2)`` on a batch of 32 (best of
  ``--repeats``), the ratio (goal <= 3);
* trust: AUROC of low trust for the bad masks (IoU < 0.2 at the explainer's threshold chosen on ``--val-images``
  validation images, or the peak off the object), share of good masks among those of trust >= 0.8;
* refinement curve: every mask refined per image once (``refine_masks``, which treats each mask on its own, so
  ``explanation(refine=r)`` gives exactly the masks of this curve), then for each fraction ``r`` the ``r`` of
  lowest trust replaced: mean IoU and insertion AUC (mean fill, and the blur fill the refinement never trains
  with) against ``r``, beside a random order and the
  oracle order (bad masks first, from the ground truth); the wall time of ``explanation(refine=r)`` for 0.2
  and 1.0 measured on the same images. Goal: ``refine=0.2`` recovers >= 60 % of the gain of ``refine=1.0`` in
  <= 30 % of its time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from bench_explainer import _time as _best  # best of n after a warm-up (run from the repository root)


def main() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="checkpoints/synthetic_explainer.safetensors")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--val-images", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plot", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--cost-only", action="store_true")
    a = p.parse_args()

    import explainer
    from explainer.data import SyntheticDataModule
    from explainer.explainers.refine import refine_masks
    from explainer.explainers.trust import mask_rows, trust_auroc
    from explainer.explainers.trust_refine import lowest_trust
    from explainer.metrics import bad_masks, choose_threshold, insertion_auc, iou

    e = explainer.load(a.checkpoint)
    dm = SyntheticDataModule(root="data/synthetic", num_images={"train": 6000, "val": 500, "test": 1000},
                             num_workers=0)
    out: dict = {"checkpoint": a.checkpoint, "trust_model": e.trust_model is not None}

    def load_split(split, n):
        ds = dm.dataset(split, train_transform=False)
        items = [ds[i] for i in range(n)]
        x = torch.stack([it["image"] for it in items])
        classes = [torch.nonzero(it["labels"] > 0.5)[:, 0] for it in items]
        return x, classes, torch.stack([it["mask"] for it in items])

    if not a.skip_cost:
        x, _, _ = load_split("test", 32)
        base = _best(lambda: e.explanation(x, top_k=2), a.repeats)
        trusted = _best(lambda: e.explanation(x, top_k=2, trust=True), a.repeats)
        out["cost"] = {"explanation_s_per_image": base / 32, "with_trust_s_per_image": trusted / 32,
                       "ratio": trusted / base}
        print(f"explanation(top_k=2) {base / 32 * 1000:.2f} ms/image; with trust {trusted / 32 * 1000:.2f} ms/image; "
              f"ratio {trusted / base:.2f} (goal <= 3)", flush=True)

    if a.cost_only:
        print(json.dumps(out, indent=1))
        return
    # the explainer's threshold, chosen on validation images
    xv, cv, gv = load_split("val", a.val_images)
    rows_v, _ = mask_rows(cv)
    with torch.no_grad():
        vmaps = torch.cat(e.selected_masks(xv, cv))[:, None]
    threshold = choose_threshold(vmaps, gv[rows_v], torch.cat(cv))
    out["threshold"] = threshold

    x, classes, g = load_split("test", a.images)
    rows, cls = mask_rows(classes)
    r0 = e.explanation(list(x), classes=[c.tolist() for c in classes], trust=True)
    trust = torch.cat(list(r0.trust))
    maps0 = torch.cat(list(r0.masks))[:, None]
    t = time.perf_counter()
    maps1 = refine_masks(e, x[rows], cls)
    full_refine_s = time.perf_counter() - t
    gt = g[rows]
    bad = bad_masks(maps0, gt, cls, threshold) > 0.5
    iou0 = iou(maps0, gt, cls, threshold)
    # each measure before / after refinement, per mask; the blur fill is one the refinement never trains with (its
    # objective removes pixels with the mean colour)
    per_mask = {"iou": (iou0, iou(maps1, gt, cls, threshold))}
    for key, fill in (("insertion", "mean"), ("insertion_blur", "blur")):
        per_mask[key] = tuple(insertion_auc(e.explanandum, x[rows], m, cls, baseline=fill, steps=32)
                              for m in (maps0, maps1))
    out["trust"] = {"masks": len(cls), "bad_share": float(bad.float().mean()), "auroc": trust_auroc(trust, bad),
                    "share_trust_ge_0.8": float((trust >= 0.8).float().mean()),
                    "good_among_trust_ge_0.8": float((~bad[trust >= 0.8]).float().mean())
                    if (trust >= 0.8).any() else float("nan")}
    print(f"trust: {out['trust']}", flush=True)

    fractions = [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
    orders = {"trust": torch.argsort(trust, stable=True),
              "random": torch.randperm(len(cls), generator=torch.Generator().manual_seed(0)),
              "oracle": torch.argsort(-(bad.double() + (1 - iou0.nan_to_num(1.0)) * 1e-3), stable=True)}
    curves = {}
    for name, order in orders.items():
        rows_out = []
        for r in fractions:
            pick = order[:len(lowest_trust(trust, r))]
            sel = torch.zeros(len(cls), dtype=torch.bool)
            sel[pick] = True
            rows_out.append({"r": r, **{key: float(torch.where(sel, after, before).nanmean())
                                        for key, (before, after) in per_mask.items()}})
        curves[name] = rows_out
    out["curves"] = curves
    xs = [x[i] for i in range(len(x))]
    lists = [c.tolist() for c in classes]
    times = {}
    for r in (0.2, 1.0):
        t = time.perf_counter()
        e.explanation(xs, classes=lists, trust=True, refine=r)
        times[str(r)] = time.perf_counter() - t
    out["seconds"] = {"explanation_refine_0.2": times["0.2"], "explanation_refine_1.0": times["1.0"],
                      "refine_masks_all": full_refine_s}
    c = {row["r"]: row for row in curves["trust"]}
    for metric in per_mask:
        gain = c[1.0][metric] - c[0.0][metric]
        part = c[0.2][metric] - c[0.0][metric]
        out[f"recovered_{metric}_at_0.2"] = part / gain if gain else float("nan")
    out["time_share_at_0.2"] = times["0.2"] / times["1.0"]
    print(json.dumps({k: v for k, v in out.items() if k != "curves"}, indent=1))
    print("| r | " + " | ".join(f"{m} ({n})" for m in per_mask for n in orders) + " |\n|---:|"
          + "---:|" * (len(per_mask) * len(orders)))
    for i, r in enumerate(fractions):
        print(f"| {r:.2f} | " + " | ".join(f"{curves[n][i][m]:.3f}" for m in per_mask for n in orders) + " |")
    if a.json:
        from explainer.core.io import atomic_write_text

        atomic_write_text(a.json, json.dumps(out, indent=1))
    if a.plot:
        from explainer.core.viz import plot_curves

        plot_curves({f"{name} order": curves[name] for name in ("trust", "random", "oracle")}, "r",
                    [("iou", "mean IoU (val. threshold)"), ("insertion", "insertion AUC (mean fill)"),
                     ("insertion_blur", "insertion AUC (blur fill)")], a.plot,
                    title=f"Selective refinement, {len(cls)} test masks ({Path(a.checkpoint).stem})",
                    xlabel="fraction of masks refined per image (r)", styles=["o-", "s--", "^:"])


if __name__ == "__main__":
    main()
