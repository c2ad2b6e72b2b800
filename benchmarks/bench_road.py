"""ROAD and the noisy linear fill: where the time goes (sparse solves against forward passes).

Times, on random images and maps, (1) the noisy linear imputation alone at
10%, 50% and 90% of the pixels removed (against the same systems solved by
``scipy.sparse.linalg.spsolve`` with its defaults, one image at a time), (2) ROAD MoRF + LeRF over the
default percentiles 10..90, and (3) deletion + insertion AUC with the
``"nli"`` fill against the ``"mean"`` fill (same steps, same forward passes).

Run under the shared lock (2 CPU cores):

    flock /tmp/heavy.lock python benchmarks/bench_road.py --images 8 --size 64 --steps 50
    flock /tmp/heavy.lock python benchmarks/bench_road.py --images 8 --size 128 --steps 50
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from scipy.sparse.linalg import spsolve  # noqa: E402

import explainer  # noqa: E402
from explainer import metrics as M  # noqa: E402
from explainer.metrics import road as R  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def reference_impute(x: torch.Tensor, keep: torch.Tensor) -> list:
    """The solve the project used before: the same systems, ``spsolve`` (SuperLU defaults), one image at a time."""
    kp = keep[:, 0].numpy()
    values = x.double().numpy()
    return [spsolve(*R._system(values[k:k + 1], kp[k:k + 1])[:2]) for k in range(x.shape[0])]


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--arch", default="explainer_resnet_tiny")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    f = explainer.load_explanandum(f"timm:{a.arch}", num_classes=8, multilabel=False)
    g = torch.Generator().manual_seed(0)
    n, s = a.images, a.size
    x = torch.rand(n, 3, s, s, generator=g)
    # smooth maps: the removed set is a blob, as for real attribution maps
    maps = torch.nn.functional.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=(s, s), mode="bilinear")
    t = torch.randint(0, 8, (n,), generator=g)
    out: dict[str, float] = {}
    print(f"images={n} size={s} arch={a.arch} threads={torch.get_num_threads()}")
    ranks = M.perturbation.pixel_ranks(maps)
    for frac in (0.1, 0.5, 0.9):
        keep = ranks >= round(frac * s * s)
        _, sec = timed(lambda keep=keep: M.noisy_linear_impute(x, keep))
        _, lin = timed(lambda keep=keep: M.linear_impute(x, keep))
        _, ref = timed(lambda keep=keep: reference_impute(x, keep))
        out[f"impute_{frac}"] = sec / n
        out[f"impute_{frac}_linear"] = lin / n
        out[f"impute_{frac}_spsolve"] = ref / n
        print(f"imputation, {frac:.0%} removed: {1000 * sec / n:.1f} ms per image with the noise; the solves alone "
              f"{1000 * lin / n:.1f} ms, one thread with spsolve's defaults {1000 * ref / n:.1f} ms "
              f"({ref / lin:.2f}x)")
    _, sec = timed(lambda: (M.road_morf(f, x, maps, t), M.road_lerf(f, x, maps, t)))
    out["road"] = sec / n
    print(f"ROAD MoRF + LeRF, 9 percentiles each: {sec / n:.2f} s per image")
    for fill in ("mean", "nli"):
        _, sec = timed(lambda fill=fill: (M.deletion_auc(f, x, maps, t, baseline=fill, steps=a.steps),
                                          M.insertion_auc(f, x, maps, t, baseline=fill, steps=a.steps)))
        out[f"causal_{fill}"] = sec / n
        print(f"deletion + insertion, {a.steps} steps, fill {fill}: {sec / n:.2f} s per image")
    return out


if __name__ == "__main__":
    main()
