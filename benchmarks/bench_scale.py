"""Real classifiers at real sizes: what the Explainer costs for ResNet-50, ConvNeXt-T and ViT-S/16 explananda at
224 px, with 20 and with 1000 classes.

    python benchmarks/bench_scale.py [--archs timm:resnet50,torchvision:resnet50,timm:convnext_tiny,...]
        [--batch 8] [--repeats 3] [--network paper|light] [--json docs/results/scale.json]

Each explanandum is measured in its own process (so the peak memory is its own), randomly initialised (the costs
do not depend on the weights), with the Explainer of configs/voc/explainer.yaml (20 classes, multi-label) and of
configs/imagenet/explainer.yaml (1000 classes, softmax), both with ``architecture: auto`` (the paper's network for
that classifier: DeepLabV3+ on its own backbone, DPT for a ViT), channels-last as the configs run; ``--network
light``: the embedded default's decoder (FPN, 64/32 channels) on the classifier's own encoder instead, and for a ViT
DPT at a quarter of its default widths:

* training: one optimiser step of the Explainer (its network forward and backward, the classifier's passes over
  the masked images and their backward to the masks) at ``--batch``; images/s; the process's peak resident
  memory after those steps (and its growth over the models alone); the ratio of that step to one plain training
  step of the classifier (BCE, Adam; the faster of the default and channels-last layouts);
* explaining, the same batch: ``explain(x)`` for every class in one pass, ``explanation(x, top_k=5)`` (the
  classifier's pass, then the 5 classes' mask channels only), and one-class Grad-CAM of the classifier (the
  registry's, at its last block; the faster layout), each the best of ``--repeats``.

Goals (issue 23): top-5 of 1000 classes at most 1.2x top-5 of 20; all-class explain() for 20 classes at most 1.5x
a one-class Grad-CAM (ResNet-50); an Explainer training step at most 4x a plain classifier step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from bench_explainer import _time as _best  # noqa: E402  (best of ``repeats`` after a warm-up; benchmarks/ is on the path)

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["timm:resnet50", "torchvision:resnet50", "timm:convnext_tiny", "timm:vit_small_patch16_224"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


LIGHT_FPN = {"decoder_pyramid_channels": 64, "decoder_segmentation_channels": 32}
LIGHT_DPT = {"decoder_intermediate_channels": [64, 128, 256, 256], "decoder_fusion_channels": 64}


def _module(spec: str, classes: int, config: str, network: str = "paper"):
    import torch
    import yaml

    import explainer
    from explainer.explainers import ExplainerModule

    torch.manual_seed(0)
    f = explainer.load_explanandum(spec, num_classes=classes, class_names=[f"c{i}" for i in range(classes)],
                                   multilabel=classes < 1000)
    kw = yaml.safe_load((ROOT / config).read_text())["model"]["init_args"]
    kw.update(explanandum=f, architecture="auto", encoder="auto", log_images=0)
    if network == "light":  # the embedded default's decoder (FPN, 64/32 channels) on the classifier's own
        # encoder; for a ViT (no feature pyramid for FPN) DPT with a quarter of its default widths
        vit = type(ExplainerModule(**kw).net).__name__ == "DPT"
        kw.update(architecture="DPT" if vit else "FPN", decoder_kwargs=LIGHT_DPT if vit else LIGHT_FPN)
    return f, ExplainerModule(**kw)


def measure(spec: str, batch: int, repeats: int, network: str = "paper") -> dict:
    import torch
    import torch.nn.functional as F

    import explainer

    torch.manual_seed(0)
    x = torch.rand(batch, 3, 224, 224)
    y = torch.zeros(batch, 20)
    y[torch.arange(batch), torch.arange(batch) % 20] = 1
    y[torch.arange(0, batch, 2), (torch.arange(0, batch, 2) + 7) % 20] = 1
    f, m = _module(spec, 20, "configs/voc/explainer.yaml", network)
    r = {"explanandum": spec, "batch": batch, "setting": network, "network": type(m.net).__name__,
         "explainer_params_M": sum(p.numel() for p in m.net.parameters()) / 1e6,
         "classifier_params_M": sum(p.numel() for p in f.model.parameters()) / 1e6}
    # ---- training: the Explainer's step
    m.train()
    opt = torch.optim.Adam([p for p in m.net.parameters() if p.requires_grad], lr=1e-4)
    batch_dict = {"image": x, "labels": y}

    def explainer_step():
        opt.zero_grad(set_to_none=True)
        m.compute_losses(batch_dict)["loss"].backward()
        opt.step()

    rss0 = _rss_mb()
    t_exp = _best(explainer_step, repeats)
    r["train_step_s"] = t_exp
    r["train_images_per_s"] = batch / t_exp
    r["peak_rss_mb"] = _rss_mb()
    r["peak_rss_growth_mb"] = r["peak_rss_mb"] - rss0
    # ---- training: a plain step of the classifier, its faster layout
    plain = {}
    for layout in ("default", "channels_last"):
        clf = copy.deepcopy(f.model).train().requires_grad_(True)
        xin = x
        if layout == "channels_last":
            clf = clf.to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=torch.channels_last)
        copt = torch.optim.Adam(clf.parameters(), lr=1e-4)

        def plain_step(clf=clf, copt=copt, xin=xin):
            copt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(clf(xin), y).backward()
            copt.step()

        plain[layout] = _best(plain_step, repeats)
        del clf, copt
    r["plain_step_s"] = plain
    r["step_ratio"] = t_exp / min(plain.values())
    # ---- explaining, 20 classes
    m.eval()
    with torch.inference_mode():
        r["explain_all_s"] = _best(lambda: m.explain(x), repeats)
        r["explain_top5_s"] = _best(lambda: m.explanation(x, top_k=5), repeats)
    targets = f(x).argmax(1).detach()
    cams = {}
    for layout in ("default", "channels_last"):
        g = explainer.load_explanandum(copy.deepcopy(f.model), class_names=f.class_names, multilabel=True)
        xin = x
        if layout == "channels_last":
            g.model.to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=torch.channels_last)
        cam = explainer.methods.get("gradcam", g)
        cams[layout] = _best(lambda cam=cam, xin=xin: cam.attribute(xin, targets), repeats)
    r["gradcam_one_class_s"] = cams
    best_cam = min(cams.values())
    r["explain_all_over_gradcam"] = r["explain_all_s"] / best_cam
    r["explain_all_over_gradcam_default_layout"] = r["explain_all_s"] / cams["default"]
    r["explain_top5_over_gradcam"] = r["explain_top5_s"] / best_cam
    # ---- explaining, 1000 classes
    f1, m1 = _module(spec, 1000, "configs/imagenet/explainer.yaml", network)
    m1.eval()
    with torch.inference_mode():
        r["explain_top5_1000_s"] = _best(lambda: m1.explanation(x, top_k=5), repeats)
        r["explain_all_1000_s"] = _best(lambda: m1.explain(x, batch_size=2), max(1, repeats - 2))
    r["top5_1000_over_top5_20"] = r["explain_top5_1000_s"] / r["explain_top5_s"]
    r["explain_all_1000_over_gradcam"] = r["explain_all_1000_s"] / best_cam
    return r


def table(rows: list[dict]) -> str:
    head = ("| explanandum | explainer | train img/s | peak RSS MB (growth) | step / plain step | explain all 20 / "
            "Grad-CAM | top-5 / Grad-CAM | top-5 of 1000 / top-5 of 20 | all 1000 / Grad-CAM |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['explanandum']} | {r['network']} {r['explainer_params_M']:.0f}M | "
                     f"{r['train_images_per_s']:.2f} | {r['peak_rss_mb']:.0f} ({r['peak_rss_growth_mb']:.0f}) | "
                     f"{r['step_ratio']:.2f} | {r['explain_all_over_gradcam']:.2f} | "
                     f"{r['explain_top5_over_gradcam']:.2f} | {r['top5_1000_over_top5_20']:.2f} | "
                     f"{r['explain_all_1000_over_gradcam']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser()
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--network", default="paper", choices=["paper", "light"],
                   help="paper: architecture auto (DeepLabV3+ / DPT); light: FPN 64/32 on the classifier's encoder "
                        "(a ViT: DPT at a quarter of its widths)")
    p.add_argument("--json", default=None, help="write the measurements here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one explanandum
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.batch, a.repeats, a.network)))
        return
    rows = []
    for spec in a.archs.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", spec, "--batch", str(a.batch), "--repeats",
                              str(a.repeats), "--network", a.network], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"{spec}: failed\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    import torch

    record = {"network": a.network, "batch": a.batch, "repeats": a.repeats, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    if a.json:
        from explainer.core.io import atomic_write_text

        atomic_write_text(Path(a.json), json.dumps(record, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
