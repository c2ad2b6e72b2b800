"""Speed of the Explainer: all-class ``explain()`` against one-class Grad-CAM, and training throughput.

    python benchmarks/bench_explainer.py [--checkpoint runs/explainer/checkpoints/best.ckpt]
        [--batch 32] [--repeats 5] [--train-steps 30] [--precision 32|bf16-mixed]

Same explanandum, same batch of test images at 128 px, one run:

* ``explain(x)``: masks of ALL C classes, one forward pass of the explainer;
* Grad-CAM (Captum's LayerGradCam at the last block, through
  ``explainer.methods.get("gradcam")``) for ONE class per image;
* training: images/s of ``ExplainerModule`` steps with the synthetic config,
  and the share of step time spent waiting for the DataLoader;
* the surround fill of the training's inverse term (batch 16, forward and backward): its blurs as matrix products
  against the separable convolutions it used before.

Goal (issue 3): all-class ``explain()`` per image at most 2x a one-class Grad-CAM.
Results are printed as a markdown table (record them in the README with the command).

Measured (2-core CPU, idle, torch 2.14.1, fp32, FPN 64/32 channels-last explainer of
configs/synthetic/explainer.yaml, stage-3 classifier):

    python benchmarks/bench_explainer.py --checkpoint checkpoints/synthetic_explainer.safetensors \
        --train-steps 20 --repeats 3
    explain() all 8 classes 0.00138 s/image; Grad-CAM one class 0.00112 (0.00077 with the classifier in
    channels-last); Grad-CAM all 8 classes 0.00929. Ratio explain(all) / Grad-CAM(one) 1.23, and 1.78
    against the channels-last Grad-CAM (goal <= 2: met in both); Grad-CAM(all) / explain(all) 6.74;
    training 47.5 images/s at batch 16, 1.2 % of step time waiting for data.
    (Before: FPN 128/64 in the default layout, 2.83x.)

The convex-upsampled Explainer of configs/synthetic/explainer.yaml (same command, idle, one run, docs/BENCHMARKS.md):
explain() 0.00335 s/image; Grad-CAM one class 0.00165 (0.00117 channels-last): ratios 2.03 and 2.86 (goal
missed); training 38.7 images/s; surround fill 0.038 s with matrix products against 0.140 s (3.7x).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="runs/explainer/checkpoints/best.ckpt")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--precision", default="32", help="the training steps' precision: 32 or bf16-mixed")
    p.add_argument("--data-root", default="data/synthetic")
    a = p.parse_args()

    import pytorch_lightning as pl

    import explainer
    from explainer.data import SyntheticDataModule

    e = explainer.load(a.checkpoint)
    f = e.explanandum
    dm = SyntheticDataModule(root=a.data_root, num_images={"train": 6000, "val": 500, "test": 1000},
                             batch_size=a.batch, num_workers=1)
    dm.prepare_data()
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("test"), batch_size=a.batch)))
    x = batch["image"]
    target = f(x).argmax(1)
    gradcam = explainer.methods.get("gradcam", f)

    t_explain = _time(lambda: e.explain(x), a.repeats)
    t_gradcam = _time(lambda: gradcam.attribute(x, target), a.repeats)
    t_gradcam_all = _time(lambda: [gradcam.attribute(x, c) for c in range(f.num_classes)], max(1, a.repeats // 2))
    # the peer with the same memory-format trick the explainer uses (channels-last classifier and input)
    f.model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    t_gradcam_cl = _time(lambda: gradcam.attribute(x_cl, target), a.repeats)
    f.model.to(memory_format=torch.contiguous_format)

    # training throughput and data-wait share
    class Timer(pl.Callback):
        def __init__(self):
            self.wait, self.step, self.last_end, self.n = 0.0, 0.0, None, 0

        def on_train_batch_start(self, trainer, module, b, i):
            now = time.perf_counter()
            if self.last_end is not None and i > 2:
                self.wait += now - self.last_end
            self.start = now

        def on_train_batch_end(self, trainer, module, out, b, i):
            now = time.perf_counter()
            if i > 2:  # skip warm-up steps
                self.step += now - self.start
                self.n += b["image"].shape[0]
            self.last_end = now

    import inspect

    from explainer.explainers import ExplainerModule

    init = inspect.signature(ExplainerModule.__init__).parameters
    hp = {k: v for k, v in e.hparams.items() if k in init and k != "explanandum_fingerprint"}
    model = ExplainerModule(**dict(hp, explanandum=f.spec, warmup_steps=0))
    timer = Timer()
    dm_train = SyntheticDataModule(root=a.data_root, num_images={"train": 6000, "val": 500, "test": 1000},
                                   batch_size=16, num_workers=1, rotate90=True)
    pl.Trainer(max_steps=a.train_steps, precision=a.precision, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               callbacks=[timer]).fit(model, dm_train)
    busy = timer.step + timer.wait

    # the surround fill of the training's inverse term (forward and backward, a training batch): its blurs as
    # matrix products (the implementation) against the depthwise separable convolutions it replaced
    import explainer.core.masking as masking

    xs = torch.rand(16, 3, *x.shape[-2:])
    keep = torch.rand(16, 1, *x.shape[-2:], requires_grad=True)

    def fill():
        masking.surround_fill(xs, keep).sum().backward()

    t_fill = _time(fill, a.repeats)
    matrix = masking.matrix_blur
    masking.matrix_blur = masking.separable_blur
    try:
        t_fill_conv = _time(fill, a.repeats)
    finally:
        masking.matrix_blur = matrix

    B, C = x.shape[0], f.num_classes
    print(f"\n| measure (batch {B}, {tuple(x.shape[-2:])} px, {torch.get_num_threads()} threads) | value |")
    print("|---|---|")
    print(f"| explain(), all {C} classes, s/image | {t_explain / B:.5f} |")
    print(f"| Grad-CAM, one class, s/image | {t_gradcam / B:.5f} |")
    print(f"| Grad-CAM, all {C} classes, s/image | {t_gradcam_all / B:.5f} |")
    print(f"| Grad-CAM, one class, classifier in channels-last, s/image | {t_gradcam_cl / B:.5f} |")
    print(f"| ratio explain(all) / Grad-CAM(one) | {t_explain / t_gradcam:.2f} (goal <= 2) |")
    print(f"| ratio explain(all) / Grad-CAM(one, channels-last) | {t_explain / t_gradcam_cl:.2f} (goal <= 2) |")
    print(f"| ratio Grad-CAM(all) / explain(all) | {t_gradcam_all / t_explain:.2f} |")
    print(f"| training images/s (batch 16) | {timer.n / max(timer.step, 1e-9):.1f} |")
    print(f"| share of step time waiting for data | {timer.wait / max(busy, 1e-9):.1%} |")
    print(f"| surround fill, batch 16, forward + backward, s: matrix products / separable convolutions | "
          f"{t_fill:.4f} / {t_fill_conv:.4f} ({t_fill_conv / t_fill:.1f}x) |")


if __name__ == "__main__":
    main()
