"""Deletion / insertion AUC: the batched metrics against RISE's per-image loop, same values, speed ratio.

The reference is RISE's ``CausalMetric.single_run`` done plainly: one image at
a time, one forward pass per step, pixels copied in place in numpy order.
The batched version (:func:`explainer.metrics.deletion_auc` and
``insertion_auc``) builds all perturbed images of all images on the fly and
feeds them ``max_batch`` at a time. The benchmark asserts both give the same
AUCs (within 1e-4), then reports the times and the speed ratio (goal: >= 10x).

Run (2 CPU cores, a training job running beside it):

    python benchmarks/bench_metrics.py --images 32 --size 64 --steps 32 --arch explainer_resnet_tiny

Measured once (CPU, torch 2.14, 2 cores shared with a training job, load average ~5):

    images=32 size=64 steps=32 arch=explainer_resnet_tiny max_batch=256
    per-image loop: 2112 forward passes in 70.86 s
    batched:        2112 images in 3.95 s
    max |AUC difference| 1e-07; speed ratio 18.0x
"""

from __future__ import annotations

import argparse
import math
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
from explainer import metrics as M  # noqa: E402
from explainer.core.masking import baseline_image  # noqa: E402


@torch.no_grad()
def per_image_loop(f, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, mode: str, steps: int,
                   baseline: str) -> torch.Tensor:
    """RISE's causal metric, one image and one step (one forward pass) at a time."""
    hw = x.shape[-1] * x.shape[-2]
    step = math.ceil(hw / steps)
    n = math.ceil(hw / step)
    base = baseline_image(x, baseline, f.mean.flatten())
    aucs = []
    for i in range(x.shape[0]):
        order = torch.from_numpy(np.argsort(-maps[i].flatten().cpu().numpy(), kind="stable").copy())
        start, finish = (x[i].clone(), base[i].clone()) if mode == "deletion" else (base[i].clone(), x[i].clone())
        scores = []
        for k in range(n + 1):
            scores.append(float(f.probabilities(f(start[None]))[0, target[i]]))
            if k < n:
                idx = order[k * step:(k + 1) * step]
                start.view(3, -1)[:, idx] = finish.reshape(3, -1)[:, idx]
        # trapezoid over the actual removed fractions (the last step may be shorter)
        aucs.append(np.trapezoid(scores, np.minimum(np.arange(n + 1) * step, hw) / hw))
    return torch.tensor(aucs)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--arch", default="explainer_resnet_tiny")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--baseline", default="mean")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    f = explainer.load_explanandum(f"timm:{a.arch}", num_classes=8, multilabel=True).to(a.device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.images, 3, a.size, a.size, generator=g).to(a.device)
    maps = torch.rand(a.images, 1, a.size, a.size, generator=g).to(a.device)
    target = torch.randint(0, 8, (a.images,), generator=g).to(a.device)

    t0 = time.perf_counter()
    slow = {m: per_image_loop(f, x, maps, target, m, a.steps, a.baseline) for m in ("deletion", "insertion")}
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = {"deletion": M.deletion_auc(f, x, maps, target, baseline=a.baseline, steps=a.steps,
                                       max_batch=a.max_batch),
            "insertion": M.insertion_auc(f, x, maps, target, baseline=a.baseline, steps=a.steps,
                                         max_batch=a.max_batch)}
    if x.is_cuda:
        torch.cuda.synchronize()
    t_batch = time.perf_counter() - t0
    diff = max(float((fast[m].double().cpu() - slow[m].double()).abs().max()) for m in fast)
    if diff > 1e-4:
        raise AssertionError(f"batched and per-image AUCs differ by {diff:.3g}")
    n_pass = 2 * a.images * len(M.rise_counts(a.size * a.size, a.steps))
    print(f"images={a.images} size={a.size} steps={a.steps} arch={a.arch} max_batch={a.max_batch}")
    print(f"per-image loop: {n_pass} forward passes in {t_loop:.2f} s")
    print(f"batched:        {n_pass} images in {t_batch:.2f} s")
    print(f"max |AUC difference| {diff:.2g}; speed ratio {t_loop / t_batch:.1f}x")
    return {"loop_s": t_loop, "batched_s": t_batch, "ratio": t_loop / t_batch, "max_diff": diff}


if __name__ == "__main__":
    main()
