"""Issue 5 section 4: do INR extremal-perturbation masks behave better w.r.t. the imposed area than classic EP?

The claims of Byra & Skibbe (WACV 2025) measured here (docs/METHODS.md sections 3 and 4), classic extremal
perturbation (``extremal_perturbation``, all areas optimised jointly) against the INR reconstruction
(``inr_extremal_perturbation``, one area-conditioned network per image, evaluated at the same areas):

* area: ``|achieved - requested|`` per requested area, achieved = fraction of mask pixels > 0.5; also the
  mean mask value (:func:`explainer.methods.extremal.achieved_area`);
* nesting: for consecutive requested areas ``a_i < a_{i+1}``, the fraction of the pixels of ``m_{a_i} > 0.5``
  that are also in ``m_{a_{i+1}} > 0.5`` (1 = perfectly nested), averaged over pairs and images;
* smoothness: mean total variation of the soft masks, ``mean_pixels(|d_y m| + |d_x m|)`` (anisotropic,
  per pixel; a mask's TV grows with its perimeter, so compare methods at the same area);
* class score: the target's probability (``f.probabilities``) of the preserved image, (i) with the soft mask
  through the methods' own perturbation (:class:`explainer.methods.extremal.Perturbation`, the blur pyramid
  whose every level pair is :func:`explainer.core.masking.apply_mask`), and (ii) with the binarised mask
  (> 0.5) through ``apply_mask(x, m, "blur", blur_sigma=max_blur)`` -- the pyramid's rule for a binary mask.

and for the iterative multi-mask method (:func:`explainer.methods.inr_extremal.multiple_masks`, K masks of
area ``--mm-area``, default 0.05: the synthetic objects cover ~4% of the image, so a 0.05 mask can sit on
the object alone), on images of a spurious-context tree (``--spurious-root``, generated when absent):

* pairwise overlap: IoU of the thresholded masks (should be ~0 by construction);
* the class score recovered by each successive mask: the preserved image's probability and the method's
  own gain (preserved reward minus the fully perturbed image's, in logits; NaN once an image stopped);
* the fraction of each mask (> 0.5) lying outside the ground-truth pixels of the target class (VOC void
  band pixels excluded from both counts), with the smallest such fraction a mask of that size could have
  (``max(0, 1 - |object| / |mask|)``), the share of the object each mask covers, and the object's share of
  the image (the outside fraction of a random mask is one minus it).

Images: ``--images`` seeded test images of each tree; target: the first present class of each image.
Only the methods' public API is used; nothing is re-implemented.

    python benchmarks/bench_inr_claims.py --images 6 --max-iter 300 --out docs/INR_CLAIMS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import explainer  # noqa: E402
from explainer.core.masking import apply_mask  # noqa: E402
from explainer.data import SyntheticDataModule  # noqa: E402
from explainer.methods.extremal import Perturbation, achieved_area, default_scales  # noqa: E402
from explainer.methods.inr_extremal import multiple_masks  # noqa: E402

VOID = 255


# --------------------------------------------------------------------------------------------- data --
def load_images(dm: SyntheticDataModule, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """``n`` seeded test images: images (n, 3, H, W), targets (n,), segmentation (n, H, W), dataset indices."""
    ds = dm.dataset("test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    items = [ds[i] for i in idx]
    x = torch.stack([it["image"] for it in items])
    t = torch.tensor([int(it["labels"].nonzero()[0, 0]) for it in items])
    seg = torch.stack([it["mask"] for it in items])
    return x, t, seg, idx


# ------------------------------------------------------------------------------------------ metrics --
@torch.no_grad()
def class_probability(f, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Probability of class ``t`` (B,) for images (B, 3, H, W) -> (B,)."""
    return f.probabilities(f(x)).gather(1, t.view(-1, 1)).squeeze(1)


@torch.no_grad()
def blurred_probability(f, x: torch.Tensor, t: torch.Tensor, max_blur: float) -> torch.Tensor:
    """Probability of class ``t`` for the fully perturbed images (mask 0: the most blurred level) -> (B,)."""
    zero = torch.zeros(x.shape[0], 1, *x.shape[-2:])
    return class_probability(f, Perturbation(x, "blur", 8, max_blur).apply(zero).flatten(0, 1), t)


@torch.no_grad()
def preserved_scores(f, x: torch.Tensor, t: torch.Tensor, masks: torch.Tensor,
                     max_blur: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Target probabilities (B, K) of the image preserved by each soft mask (blur pyramid, the methods' rule)
    and by each binarised mask (``apply_mask`` with the most blurred level as baseline)."""
    b, k = masks.shape[:2]
    pert = Perturbation(x, "blur", 8, max_blur)
    soft = pert.apply(masks).flatten(0, 1)  # (B*K, 3, H, W), image-major
    hard_m = (masks > 0.5).float().flatten(0, 1).unsqueeze(1)
    hard = apply_mask(x.repeat_interleave(k, 0), hard_m, "blur", blur_sigma=max_blur)
    tk = t.repeat_interleave(k)
    return class_probability(f, soft, tk).view(b, k), class_probability(f, hard, tk).view(b, k)


def nesting(masks: torch.Tensor) -> torch.Tensor:
    """(B, K-1): fraction of ``masks[:, i] > 0.5`` inside ``masks[:, i+1] > 0.5`` (NaN for an empty mask)."""
    m = masks > 0.5
    inter = (m[:, :-1] & m[:, 1:]).flatten(2).sum(2).float()
    size = m[:, :-1].flatten(2).sum(2).float()
    return torch.where(size > 0, inter / size.clamp_min(1), torch.full_like(size, float("nan")))


def total_variation(masks: torch.Tensor) -> torch.Tensor:
    """(B, K): ``mean_pixels(|d_y m| + |d_x m|)`` of the soft masks."""
    n = masks.shape[-2] * masks.shape[-1]
    dy = (masks[..., 1:, :] - masks[..., :-1, :]).abs().flatten(2).sum(2)
    dx = (masks[..., :, 1:] - masks[..., :, :-1]).abs().flatten(2).sum(2)
    return (dy + dx) / n


def pairwise_iou(masks: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """IoU (B,) of the thresholded masks for every pair (i, j), i < j (NaN when both are empty)."""
    m = masks > 0.5
    out = {}
    for i in range(m.shape[1]):
        for j in range(i + 1, m.shape[1]):
            inter = (m[:, i] & m[:, j]).flatten(1).sum(1).float()
            union = (m[:, i] | m[:, j]).flatten(1).sum(1).float()
            out[(i, j)] = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
    return out


def outside_fraction(masks: torch.Tensor, seg: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, K): fraction of each mask (> 0.5) outside the target class's pixels (void pixels not counted)."""
    valid = (seg != VOID).unsqueeze(1)
    obj = (seg == (t + 1).view(-1, 1, 1)).unsqueeze(1)
    m = (masks > 0.5) & valid
    size = m.flatten(2).sum(2).float()
    out = (m & ~obj).flatten(2).sum(2).float()
    return torch.where(size > 0, out / size.clamp_min(1), torch.full_like(size, float("nan")))


def object_stats(masks: torch.Tensor, seg: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) each: the share of the target object's pixels covered by each mask (> 0.5), and the smallest
    outside fraction a mask of that size could have, ``max(0, 1 - |object| / |mask|)`` (void not counted)."""
    valid = (seg != VOID).unsqueeze(1)
    obj = (seg == (t + 1).view(-1, 1, 1)).unsqueeze(1)
    m = (masks > 0.5) & valid
    n_obj = obj.flatten(2).sum(2).float()
    n_m = m.flatten(2).sum(2).float()
    covered = (m & obj).flatten(2).sum(2).float() / n_obj.clamp_min(1)
    floor = torch.where(n_m > 0, (1 - n_obj / n_m.clamp_min(1)).clamp_min(0), torch.full_like(n_m, float("nan")))
    return covered, floor


def nanmean(v: torch.Tensor) -> float:
    v = v.float().flatten()
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else float("nan")


def fmt(v: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


# ------------------------------------------------------------------------------------------- tables --
def area_table(results: dict[str, dict], areas: list[float]) -> list[str]:
    rows = ["| method | requested area | achieved (>0.5) | abs(achieved - requested) | mean mask value | "
            "nested in next area | TV | p(preserved, soft) | p(preserved, binary) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for i, a in enumerate(areas):
            nest = fmt(nanmean(r["nest"][:, i])) if i < len(areas) - 1 else "-"
            rows.append(f"| {name} | {a:g} | {fmt(nanmean(r['achieved'][:, i]))} | "
                        f"{fmt(nanmean((r['achieved'][:, i] - a).abs()))} | {fmt(nanmean(r['mean'][:, i]))} | "
                        f"{nest} | {fmt(nanmean(r['tv'][:, i]), 4)} | {fmt(nanmean(r['p_soft'][:, i]))} | "
                        f"{fmt(nanmean(r['p_hard'][:, i]))} |")
    rows += ["", "| method | mean abs(achieved - requested) | max abs(achieved - requested) | mean nesting | "
             "min nesting | mean TV | seconds / image |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        err = (r["achieved"] - torch.tensor(areas)).abs()
        nest = r["nest"][~torch.isnan(r["nest"])]
        rows.append(f"| {name} | {fmt(float(err.mean()))} | {fmt(float(err.max()))} | {fmt(nanmean(r['nest']))} | "
                    f"{fmt(float(nest.min()) if nest.numel() else float('nan'))} | {fmt(nanmean(r['tv']), 4)} | "
                    f"{r['seconds']:.1f} |")
    return rows


def multi_table(mm: dict, k: int) -> list[str]:
    rows = ["| mask k | achieved area (>0.5) | p(preserved, soft) | gain (logit, method's own) | "
            "images still active | outside target object | floor of outside for that size | "
            "target object covered |", "|---|---|---|---|---|---|---|---|"]
    for j in range(k):
        active = int((~torch.isnan(mm["gains"][:, j])).sum())
        rows.append(f"| {j + 1} | {fmt(nanmean(mm['achieved'][:, j]))} | {fmt(nanmean(mm['p_soft'][:, j]))} | "
                    f"{fmt(nanmean(mm['gains'][:, j]))} | {active}/{mm['gains'].shape[0]} | "
                    f"{fmt(nanmean(mm['outside'][:, j]))} | {fmt(nanmean(mm['floor'][:, j]))} | "
                    f"{fmt(nanmean(mm['covered'][:, j]))} |")
    rows += ["", "| mask pair | IoU (>0.5), mean | IoU, max |", "|---|---|---|"]
    for (i, j), v in mm["iou"].items():
        w = v[~torch.isnan(v)]
        top = float(w.max()) if w.numel() else float("nan")
        rows.append(f"| {i + 1}-{j + 1} | {fmt(nanmean(v), 4)} | {fmt(top, 4)} |")
    return rows


# --------------------------------------------------------------------------------------------- main --
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8, help="seeded test images per tree")
    ap.add_argument("--max-iter", type=int, default=300, help="optimisation steps of every method (and each mask)")
    ap.add_argument("--areas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--mm-k", type=int, default=3, help="masks of the multi-mask method")
    ap.add_argument("--mm-area", type=float, default=0.05,
                    help="area of each mask of the multi-mask method (objects cover ~4%% of the image)")
    ap.add_argument("--checkpoint", default="checkpoints/synthetic_classifier.safetensors")
    ap.add_argument("--root", default="data/synthetic")
    ap.add_argument("--spurious-root", default="/tmp/spurious")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    areas = sorted(args.areas)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    f = explainer.load_explanandum(args.checkpoint)
    dm = SyntheticDataModule(root=args.root, num_images={"train": 6000, "val": 500, "test": 1000}, num_workers=0)
    x, t, _, idx = load_images(dm, args.images, args.seed)
    max_blur = default_scales(x.shape[-2:])[2]
    p_full = class_probability(f, x, t)
    p_blur = blurred_probability(f, x, t, max_blur)

    results: dict[str, dict] = {}
    for name in ("extremal_perturbation", "inr_extremal_perturbation"):
        method = explainer.methods.get(name, f, areas=areas, max_iter=args.max_iter, seed=args.seed)
        start = time.perf_counter()
        masks = method.masks(x, t) if name == "extremal_perturbation" else method.fit(x, t).masks(areas)
        seconds = (time.perf_counter() - start) / len(x)
        p_soft, p_hard = preserved_scores(f, x, t, masks, max_blur)
        results[name] = {"achieved": achieved_area(masks, 0.5), "mean": achieved_area(masks), "nest": nesting(masks),
                         "tv": total_variation(masks), "p_soft": p_soft, "p_hard": p_hard, "seconds": seconds}
        print(f"{name}: {seconds:.1f} s/image", file=sys.stderr, flush=True)

    sdm = SyntheticDataModule(root=args.spurious_root, num_images={"train": 0, "val": 0, "test": 40},
                              spurious_class="star", spurious_p=1.0, num_workers=0)
    sdm.prepare_data()  # generates the tree when absent or different
    sx, st, sseg, sidx = load_images(sdm, args.images, args.seed)
    start = time.perf_counter()
    mmasks, gains = multiple_masks(f, sx, st, k=args.mm_k, area=args.mm_area, max_iter=args.max_iter, seed=args.seed)
    mm_seconds = (time.perf_counter() - start) / len(sx)
    print(f"multiple_masks: {mm_seconds:.1f} s/image", file=sys.stderr, flush=True)
    mm = {"achieved": achieved_area(mmasks, 0.5), "p_soft": preserved_scores(f, sx, st, mmasks, max_blur)[0],
          "gains": gains, "iou": pairwise_iou(mmasks), "outside": outside_fraction(mmasks, sseg, st)}
    mm["covered"], mm["floor"] = object_stats(mmasks, sseg, st)
    obj_share = (sseg == (st + 1).view(-1, 1, 1)).flatten(1).float().sum(1) / (sseg != VOID).flatten(1).sum(1)
    sp_meta = (Path(args.spurious_root) / "synthetic.json").read_text()
    grid = set(json.loads(sp_meta)["spurious_background"]["test"])
    ids = sdm.dataset("test").ids
    n_grid = sum(ids[i] in grid for i in sidx)
    sp_p_full = class_probability(f, sx, st)
    sp_p_blur = blurred_probability(f, sx, st, max_blur)
    names = f.class_names

    lines = [f"Settings: {args.images} test images of `{args.root}` (indices {idx}), targets "
             f"{[names[i] for i in t.tolist()]}; max_iter {args.max_iter} for both methods (EP: SGD, all areas in "
             f"one batch; INR: Adam, 4 sampled areas per step from (0.02, 0.5)), other options the methods' "
             f"defaults; blur baseline sigma {max_blur:.2f} px; seed {args.seed}.",
             "",
             f"Reference: p(target | full image) = {fmt(nanmean(p_full))}, p(target | fully blurred) = "
             f"{fmt(nanmean(p_blur))} (means over the images).",
             "", "### Area, nesting, smoothness, class score (EP vs INR)", ""]
    lines += area_table(results, areas)
    lines += ["", f"### Multiple non-overlapping masks (INR, K={args.mm_k}, area {args.mm_area:g} each)", "",
              f"On {args.images} test images of the spurious-context tree `{args.spurious_root}` (indices {sidx}, "
              f"{n_grid} with the grid background), targets {[names[i] for i in st.tolist()]}; "
              f"{mm_seconds:.1f} s/image. p(target | full) = {fmt(nanmean(sp_p_full))}, p(target | fully blurred)"
              f" = {fmt(nanmean(sp_p_blur))}; the target object covers {fmt(nanmean(obj_share))} of the image on "
              f"average (min {fmt(float(obj_share.min()))}), so a random mask lies {fmt(1 - nanmean(obj_share))} "
              "outside it. 'floor': the outside fraction a mask of that size has even if it covers the whole "
              "object.", ""]
    lines += multi_table(mm, args.mm_k)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from explainer.core.io import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
