"""LTX's stage 2: per-instance finetuning of a pretrained explainer (Barkan et al., 2023).

For each image, start from the pretrained explainer, take a fixed number of
optimiser steps (AdamW, fresh state, constant lr; the official code: up to 25
steps at lr 2e-3) on that image alone with the pretraining objective
(:meth:`LTXModule.objective`) for the explained class, then emit the mask.
No step is selected by labels or by an evaluation metric (the official code
picks the step that scores best on the evaluation metric itself against the
ground truth; this does not).

:func:`finetune` runs every image of a batch at once: the explainer's
parameters are stacked into one copy per image (leading dimension B), the
network runs under ``torch.func.vmap`` + ``functional_call`` (each image
through its own copy), the explanandum on the ordinary batch, and one AdamW
steps all copies. This is exact: the loss is the *sum* of the per-image
losses, so each copy's gradient is its own image's gradient, and AdamW's
update is element-wise, so one optimiser over stacked tensors equals B
independent optimisers. :func:`finetune_loop` is the plain reference (one
deep copy and one optimiser per image), kept for tests and the benchmark.

Batch norm and dropout: during finetuning the explainer network is in eval
mode, so batch norm uses its (frozen) running statistics, its affine weights
are finetuned, and dropout is off. This keeps an image's result independent
of the other images in its batch (batch statistics of a one-image batch would
also differ from pretraining) and makes vmap well defined.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from explainer.explanandum import check_images
from explainer.modules.explainer import targets_to_index
from explainer.modules.ltx import OBJECTIVE_KEYS, check_objective_settings


def check_module(module: Any) -> None:
    if getattr(module, "kind", None) != "ltx" or not hasattr(module, "objective"):
        kind = getattr(module, "kind", type(module).__name__)
        raise TypeError(f"module: expected a pretrained LTX explainer (kind 'ltx', explainer.load of an LTX "
                        f"checkpoint), got {kind!r}")


def check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1 finetuning steps, got {steps!r} (the pretrained "
                         "explainer without finetuning, pLTX, is module.explain(x, targets))")
    return steps


def check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr == float("inf"):
        raise ValueError(f"lr: expected a learning rate > 0, got {lr!r}")
    return float(lr)


def check_objective(objective: Any) -> dict:
    """Finetuning-time settings of the objective that replace the pretraining ones (None: keep them all)."""
    if objective is None:
        return {}
    if not isinstance(objective, dict):
        raise TypeError(f"objective: expected a dict of {list(OBJECTIVE_KEYS)}, got {type(objective).__name__}")
    unknown = sorted(set(objective) - set(OBJECTIVE_KEYS))
    if unknown:
        raise ValueError(f"objective: unknown key(s) {unknown}; expected among {list(OBJECTIVE_KEYS)}")
    out = {k: v for k, v in objective.items() if v is not None}
    try:
        check_objective_settings(**out)
    except ValueError as err:
        raise ValueError(f"objective: {err}") from err
    return out


@contextlib.contextmanager
def _finetuning(module, objective: dict | None = None) -> Iterator[None]:
    """Explainer in eval mode (frozen BN statistics, no dropout), explanandum checks off, the finetuning
    ``objective`` settings in place of the pretraining ones; all restored on exit."""
    net, f, hp = module.net, module.explanandum, module.hparams
    was_training, old_validate = net.training, getattr(f, "validate", True)
    objective = objective or {}
    saved = {k: hp[k] for k in objective}
    net.eval()
    f.validate = False  # the loop feeds masked images it built from checked inputs
    try:
        hp.update(objective)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        hp.update(saved)
        net.train(was_training)
        f.validate = old_validate


def _prepare(module, x: torch.Tensor, targets: Any, mode: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    check_module(module)
    check_images(x)
    mode = mode or module.hparams.target
    if mode not in ("groundtruth", "predicted", "kl"):
        raise ValueError(f"mode: expected 'groundtruth', 'predicted' or 'kl', got {mode!r}")
    x = x.detach().to(module.device).clone()
    if targets is None:
        if mode == "groundtruth":
            raise ValueError("targets: this explainer's target mode is 'groundtruth', so finetuning needs the class "
                             "to explain (targets=...), or mode='predicted' to use the classifier's top-1")
        with torch.no_grad():
            t = module.explanandum(x).argmax(1)
    else:
        t = targets_to_index(targets, x.shape[0], module.num_classes, device=x.device)
    return x, t, mode


def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach=False: the same arithmetic for stacked and per-image tensors
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def finetune(module, x: torch.Tensor, targets: Any = None, steps: int = 25, lr: float = 2e-3, *,
             mode: str | None = None, weight_decay: float | None = None, batch_size: int = 16,
             objective: dict | None = None) -> torch.Tensor:
    """LTX masks: ``steps`` AdamW steps per image from the pretrained explainer, all images at once.

    Args:
        module: a pretrained :class:`~explainer.modules.ltx.LTXModule` (left unchanged).
        x: images (B, 3, H, W) RGB in [0, 1].
        targets: the class to explain per image (int | list[int] | LongTensor (B,));
            None: the classifier's top-1 (not allowed when the objective is
            "groundtruth": the ground-truth class must be given).
        steps: optimiser steps per image (>= 1).
        lr: AdamW learning rate (constant; fresh optimiser state per image).
        mode: objective target mode; None: the one the explainer was pretrained with.
        weight_decay: AdamW weight decay; None: the pretraining value.
        batch_size: images finetuned together (memory holds one explainer copy,
            plus AdamW state, per image).
        objective: finetuning settings of the objective in place of the
            pretraining ones, among ``lambda_mask``, ``lambda_inverse``,
            ``baseline``, ``mask_penalty``, ``kl_scope``, ``lambda_curve``,
            ``curve_areas``, ``curve_temperature`` (None: the pretraining objective).

    Returns:
        masks (B, 1, H, W) in [0, 1] of the target classes, on ``x``'s device.
    """
    check_module(module)
    steps, lr = check_steps(steps), check_lr(lr)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    check_images(x)
    objective = check_objective(objective)
    wd = module.hparams.weight_decay if weight_decay is None else float(weight_decay)
    out = []
    with _finetuning(module, objective):
        xd, t, mode = _prepare(module, x, targets, mode)
        for i in range(0, xd.shape[0], batch_size):
            out.append(_finetune_batch(module, xd[i:i + batch_size], t[i:i + batch_size], steps, lr, wd, mode))
    return torch.cat(out).to(x.device)


def _finetune_batch(module, x, t, steps, lr, wd, mode) -> torch.Tensor:
    net, f = module.net, module.explanandum
    B, size = x.shape[0], x.shape[-2:]
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in net.named_parameters() if not p.requires_grad}
    fixed.update(dict(net.named_buffers()))
    stacked = {n: p.detach().unsqueeze(0).repeat(B, *([1] * p.dim())).requires_grad_(True)
               for n, p in net.named_parameters() if p.requires_grad}
    opt = _optimizer([stacked[n] for n in names], lr, wd)
    k = module.mask_channel(t)
    with torch.no_grad():
        logits = f(x).float()
        z_in = module.net_input(x)
    onehot = F.one_hot(t, module.num_classes).float()

    def one(params, zi, ki):
        S = functional_call(net, (params, fixed), (zi.unsqueeze(0),))[0]  # (K, h, w)
        return S.index_select(0, ki.reshape(1))

    def logits_of(params):
        return module.to_size(vmap(one)(params, z_in, k), size)  # (B, 1, H, W)

    for _ in range(steps):
        loss = module.objective(x, logits_of(stacked), onehot, logits, mode)["loss"].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.sigmoid(logits_of(stacked)).float()


def finetune_loop(module, x: torch.Tensor, targets: Any = None, steps: int = 25, lr: float = 2e-3, *,
                  mode: str | None = None, weight_decay: float | None = None,
                  objective: dict | None = None) -> torch.Tensor:
    """The plain reference of :func:`finetune`: one deep copy of the explainer and one AdamW per image.

    Same arguments and result as :func:`finetune` (up to floating-point rounding).
    """
    check_module(module)
    steps, lr = check_steps(steps), check_lr(lr)
    check_images(x)
    objective = check_objective(objective)
    wd = module.hparams.weight_decay if weight_decay is None else float(weight_decay)
    f = module.explanandum
    out = []
    with _finetuning(module, objective):
        xd, t, mode = _prepare(module, x, targets, mode)
        for i in range(xd.shape[0]):
            xi, ti = xd[i:i + 1], t[i:i + 1]
            net = copy.deepcopy(module.net).eval()
            opt = _optimizer([p for p in net.parameters() if p.requires_grad], lr, wd)
            k = int(module.mask_channel(ti))
            with torch.no_grad():
                logits = f(xi).float()
            onehot = F.one_hot(ti, module.num_classes).float()
            for _ in range(steps):
                z = module.mask_logits(xi, net=net)[:, k:k + 1]
                loss = module.objective(xi, z, onehot, logits, mode)["loss"].sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                out.append(torch.sigmoid(module.mask_logits(xi, net=net)[:, k:k + 1]).float())
    return torch.cat(out).to(x.device)


# ------------------------------------------------------------------------------------------ command line --
class FinetunedExplainer:
    """What :func:`explainer.inference.explain_files` needs, with LTX masks: ``explain(x) -> (B, C, H, W)``.

    The channels of each image's ``top_k`` classes (by the classifier's
    probability, the classes ``explain_files`` writes) hold finetuned masks,
    one finetuning run per rank; the other channels are zero.
    """

    def __init__(self, module, top_k: int = 1, steps: int = 25, lr: float = 2e-3, batch_size: int = 16,
                 mode: str | None = None, objective: dict | None = None):
        check_module(module)
        self.module, self.top_k, self.steps, self.lr = module, top_k, check_steps(steps), check_lr(lr)
        self.batch_size, self.mode, self.objective = batch_size, mode, check_objective(objective)
        self.explanandum = module.explanandum
        self.input_size = getattr(module, "input_size", None)

    @property
    def device(self) -> torch.device:
        return self.module.device

    def explain(self, x: torch.Tensor) -> torch.Tensor:
        f = self.explanandum
        with torch.no_grad():
            probs = f.probabilities(f(x.to(self.device)))
        k = max(1, min(self.top_k, f.num_classes))
        top = probs.topk(k, dim=1).indices.to(x.device)
        masks = torch.zeros(x.shape[0], f.num_classes, *x.shape[-2:], device=x.device)
        for j in range(k):
            m = finetune(self.module, x, top[:, j], steps=self.steps, lr=self.lr, mode=self.mode,
                         batch_size=self.batch_size, objective=self.objective)
            masks.scatter_(1, top[:, j].view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:]), m)
        return masks


def split_images(voc_root: str, split: str) -> list:
    """JPEGImages of a VOC-style tree's ``ImageSets/Main/<split>.txt`` (the synthetic benchmark is one)."""
    from pathlib import Path

    from explainer.data.voc import find_voc_root

    root = find_voc_root(voc_root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"split: {str(listing)!r} does not exist (expected ImageSets/Main/{split}.txt)")
    ids = [ln.split()[0] for ln in listing.read_text().splitlines() if ln.strip()]
    return [Path(root) / "JPEGImages" / f"{i}.jpg" for i in ids]


CLI_DEFAULTS = {"checkpoint": None, "images": None, "voc_root": None, "split": "test", "limit": None, "steps": 25,
                "lr": 2e-3, "mode": None, "top_k": 1, "batch_size": 16, "size": None, "out": None, "device": "cpu",
                "explanandum": None, "progress": True, "objective": None}


def main(argv: list[str] | None = None) -> int:
    """``python finetune.py --config CONFIG.yaml [--key value ...]``: LTX masks written like the explain CLI.

    Keys (YAML or flags): checkpoint (an LTX .ckpt or export), images (a file or
    folder) or voc_root + split (+ limit: the first N of the split), steps, lr,
    mode, top_k (classes per image, each finetuned), batch_size, size (the
    resolution fed to the explainer; default its trained size), out, device,
    explanandum (override the recorded classifier), objective (finetuning settings
    of the objective: lambda_mask, lambda_inverse, baseline, mask_penalty). Writes
    ``<stem>_<class>_mask.png``, ``_overlay.png``, ``explanations.json`` and
    ``finetune.json`` (the settings and the seconds per image).
    """
    import argparse
    import json
    import time
    from pathlib import Path

    import yaml

    from explainer.amortized import load
    from explainer.inference import explain_files, list_images
    from explainer.io import atomic_write_text

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    cfg = dict(CLI_DEFAULTS)
    if known.config is not None:
        path = Path(known.config)
        if not path.is_file():
            raise FileNotFoundError(f"config: no such file {str(path)!r}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config: {str(path)!r} must hold a mapping of settings")
        unknown = sorted(set(loaded) - set(CLI_DEFAULTS))
        if unknown:
            raise ValueError(f"config: unknown keys {unknown} in {str(path)!r}; expected {sorted(CLI_DEFAULTS)}")
        cfg.update(loaded)
    p = argparse.ArgumentParser(prog="python finetune.py", description="LTX per-instance finetuning: masks of a "
                                "pretrained LTX explainer finetuned on each image (settings: a YAML --config).")
    p.add_argument("--config", default=None, help="YAML file of the settings below")
    for key, default in CLI_DEFAULTS.items():
        kind = {"steps": int, "top_k": int, "batch_size": int, "limit": int, "size": int, "lr": float,
                "objective": json.loads}.get(key, str)
        if key == "progress":
            p.add_argument("--progress", type=lambda s: str(s).lower() in ("1", "true", "yes"), default=default)
        else:
            p.add_argument(f"--{key}", type=kind, default=default)
    p.set_defaults(**cfg)
    a = p.parse_args(argv)
    if a.checkpoint is None or a.out is None:
        p.error("checkpoint and out are required (in the config or as --checkpoint/--out)")
    if (a.images is None) == (a.voc_root is None):
        p.error("give exactly one of images (a file or folder) or voc_root (+ split)")
    module = load(a.checkpoint, explanandum=a.explanandum, map_location=a.device)
    if module.kind != "ltx":
        raise ValueError(f"checkpoint: {a.checkpoint!r} holds a {module.kind!r} explainer, expected 'ltx' (an "
                         "Explainer checkpoint has nothing to finetune; use python -m explainer explain)")
    files = list_images(a.images) if a.images is not None else split_images(a.voc_root, a.split)
    if a.limit is not None:
        files = files[:int(a.limit)]
    wrapped = FinetunedExplainer(module, top_k=a.top_k, steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                                 mode=a.mode, objective=a.objective)
    t0 = time.perf_counter()
    explain_files(wrapped, files, a.out, top_k=a.top_k, batch_size=a.batch_size, size=a.size, progress=a.progress)
    seconds = time.perf_counter() - t0
    settings = {k: getattr(a, k) for k in CLI_DEFAULTS}
    settings.update({"num_images": len(files), "seconds_per_image": seconds / max(1, len(files)),
                     "objective": {k: wrapped.objective.get(k, module.hparams[k]) for k in OBJECTIVE_KEYS},
                     "target_mode": a.mode or module.hparams.target})
    atomic_write_text(Path(a.out) / "finetune.json", json.dumps(settings, indent=1))
    print(f"wrote LTX masks ({a.steps} steps) of {len(files)} image(s) to {a.out}")
    return 0
