"""Stage 2 of LTX: per-image finetuning of a pretrained :class:`~explainer.explainers.ltx.LTXModule`.

For each image, start from the pretrained explainer, take a fixed number of optimiser steps (AdamW, fresh
state, constant lr; the official code: up to 25 steps at lr 2e-3) on that image alone with the pretraining
objective (:meth:`LTXModule.objective`) for the explained class, then emit the mask. No step is selected by
labels or by an evaluation metric (the official code picks the step that scores best on the evaluation metric
itself against the ground truth; this does not).

:func:`finetune` runs every image of a batch at once: the explainer's parameters are stacked into one copy per
image (leading dimension B), the network runs under ``torch.func.vmap`` + ``functional_call`` (each image
through its own copy), the explanandum on the ordinary batch, and one AdamW steps all copies. This is exact:
the loss is the *sum* of the per-image losses, so each copy's gradient is its own image's gradient, and
AdamW's update is element-wise, so one optimiser over stacked tensors equals B independent optimisers.
:func:`finetune_loop` is the plain reference (one deep copy and one optimiser per image), kept for tests and
the benchmark.

The machinery itself knows nothing of LTX: :func:`finetune_rows` (stacked, vmapped) and
:func:`finetune_rows_loop` (the plain loop) finetune rows (image, class, map channel) of any trained explainer
with any per-row loss. :func:`finetune` passes them LTX's objective; :mod:`explainer.explainers.refine` passes
them the same objective for every kind.

Batch norm and dropout: during finetuning the explainer network is in eval mode, so batch norm uses its
(frozen) running statistics, its affine weights are finetuned, and dropout is off. This keeps an image's
result independent of the other images in its batch (batch statistics of a one-image batch would also differ
from pretraining) and makes vmap well defined.

The module is left as it was: the finetuning objective is passed to ``LTXModule.objective`` as a value
(:class:`~explainer.explainers.ltx_settings.LTXObjective`), never written into its hyperparameters.
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from explainer.core.images import check_images
from explainer.core.targets import check_targets, predicted_classes
from explainer.explainers.ltx_settings import FINETUNE_PRESETS, TARGET_MODES, LTXObjective, check_finetuning

if TYPE_CHECKING:  # ltx.py re-exports this module's functions, so the class is imported for typing only
    from explainer.explainers.ltx import LTXModule


def check_module(module: Any) -> None:
    if getattr(module, "kind", None) != "ltx" or not hasattr(module, "objective"):
        kind = getattr(module, "kind", type(module).__name__)
        raise TypeError(f"module: expected a pretrained LTX explainer (kind 'ltx', explainer.load of an LTX "
                        f"checkpoint), got {kind!r}")


def finetune_settings(module: LTXModule, preset: str | None = None, **given: Any) -> dict[str, Any]:
    """The settings a finetuning call uses: ``preset`` (or those recorded in ``module``), then every argument
    given as not None."""
    if preset is not None and preset not in FINETUNE_PRESETS:
        raise ValueError(f"preset: expected one of {sorted(FINETUNE_PRESETS)} or None, got {preset!r}")
    base = FINETUNE_PRESETS[preset] if preset else module.hparams.get("finetuning") or FINETUNE_PRESETS["validated"]
    return check_finetuning({**base, **{k: v for k, v in given.items() if v is not None}})


@contextlib.contextmanager
def finetuning_mode(module: LTXModule) -> Iterator[None]:
    """The explainer network in eval mode (frozen BN statistics, no dropout), the explanandum's input checks
    off (the loop feeds masked images it built from checked inputs), gradients on; restored on exit."""
    net = module.net
    was_training = net.training
    net.eval()
    try:
        with module.explanandum.unchecked(), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        net.train(was_training)


def _prepare(module: LTXModule, x: torch.Tensor, targets: Any, mode: str | None
             ) -> tuple[torch.Tensor, torch.Tensor, str]:
    check_images(x)
    mode = mode or module.hparams.target
    if mode not in TARGET_MODES:
        raise ValueError(f"mode: expected 'groundtruth', 'predicted' or 'kl', got {mode!r}")
    x = x.detach().to(module.device).clone()
    if targets is None:
        if mode == "groundtruth":
            raise ValueError("targets: this explainer's target mode is 'groundtruth', so finetuning needs the class "
                             "to explain (targets=...), or mode='predicted' to use the classifier's top-1")
        with torch.no_grad():
            t = predicted_classes(module.explanandum, x)
    else:
        t = check_targets(targets, x.shape[0], module.num_classes, x.device, name="targets")
    return x, t, mode


def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach=False: the same arithmetic for stacked and per-image tensors
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def _settings(module: LTXModule, x: torch.Tensor, weight_decay: float | None, preset: str | None,
              **given: Any) -> tuple[int, float, str | None, LTXObjective, float]:
    """Checked steps, lr, mode, objective and weight decay of one finetuning call."""
    check_module(module)
    st = finetune_settings(module, preset, **given)
    check_images(x)
    wd = module.weight_decay if weight_decay is None else float(weight_decay)
    return st["steps"], st["lr"], st["mode"], module.objective_settings(**st["objective"]), wd


def finetune(module: LTXModule, x: torch.Tensor, targets: Any = None, steps: int | None = None,
             lr: float | None = None, *, mode: str | None = None, weight_decay: float | None = None,
             batch_size: int = 16, objective: dict | None = None, preset: str | None = None) -> torch.Tensor:
    """LTX masks: ``steps`` AdamW steps per image from the pretrained explainer, all images at once.

    Args:
        module: a pretrained :class:`LTXModule` (left unchanged).
        x: images (B, 3, H, W) RGB in [0, 1].
        targets: the class to explain per image (int | list[int] | LongTensor (B,));
            None: the classifier's top-1 (not allowed when the objective is
            "groundtruth": the ground-truth class must be given).
        steps: optimiser steps per image (>= 1).
        lr: AdamW learning rate (constant; fresh optimiser state per image).
        mode: objective target mode ("groundtruth", "predicted", "kl").
        weight_decay: AdamW weight decay; None: the pretraining value.
        batch_size: images finetuned together (memory holds one explainer copy,
            plus AdamW state, per image).
        objective: finetuning settings of the objective in place of the
            pretraining ones, among ``lambda_mask``, ``lambda_inverse``,
            ``baseline``, ``mask_penalty``, ``kl_scope``, ``lambda_curve``,
            ``curve_areas``, ``curve_temperature`` ({}: the pretraining objective).
        preset: where ``steps``, ``lr``, ``mode`` and ``objective`` left at None come from: None, the settings
            recorded in the checkpoint (by default the "validated" preset, chosen on validation images);
            "validated"; or "paper" (25 steps at lr 2e-3 with the pretraining objective and target mode).

    Returns:
        masks (B, 1, H, W) in [0, 1] of the target classes, on ``x``'s device.
    """
    steps, lr, mode, settings, wd = _settings(module, x, weight_decay, preset, steps=steps, lr=lr, mode=mode,
                                              objective=objective)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if x.shape[0] == 0:
        return torch.zeros(0, 1, *x.shape[-2:], device=x.device)
    with finetuning_mode(module):
        xd, t, mode = _prepare(module, x, targets, mode)
        out = finetune_rows(module, xd, t, module.mask_channel(t), steps, lr, wd, ltx_loss(module, mode, settings),
                            batch_size)
    return out.to(x.device)


# loss(x, z, onehot, logits) -> (P,): the loss of each row, from its image x (P, 3, H, W), its map's logits
# z (P, 1, H, W), its one-hot class (P, C) and the explanandum's logits on the unmasked image (P, C)
RowLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ltx_loss(module: LTXModule, mode: str, settings: LTXObjective) -> RowLoss:
    """The per-row loss of finetuning: ``module.objective`` with the finetuning ``mode`` and ``settings``."""
    def loss(x: torch.Tensor, z: torch.Tensor, onehot: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return module.objective(x, z, onehot, logits, mode, settings)["loss"]
    return loss


def finetune_rows(module: Any, x: torch.Tensor, t: torch.Tensor, channels: torch.Tensor, steps: int, lr: float,
                  wd: float, loss: RowLoss, batch_size: int | None = None) -> torch.Tensor:
    """Masks (P, 1, H, W) in [0, 1] of P rows, each finetuned on its own; ``batch_size`` rows at once (None: all).

    Row ``i`` starts from ``module.net`` (any trained explainer), takes ``steps`` AdamW steps (lr, weight decay
    ``wd``, fresh state) of ``loss`` on image ``x[i]`` alone, for class ``t[i]``, with the network's map
    ``channels[i]``, and gives that map's sigmoid. The network's parameters are stacked once per row and run
    under ``torch.func.vmap`` (module docstring); ``module`` is not changed. Call it inside
    :func:`finetuning_mode`, with checked inputs on the module's device.
    """
    n = x.shape[0] if batch_size is None else batch_size
    out = [_finetune_batch(module, x[i:i + n], t[i:i + n], channels[i:i + n], steps, lr, wd, loss)
           for i in range(0, x.shape[0], max(n, 1))]
    return torch.cat(out) if out else torch.zeros(0, 1, *x.shape[-2:], device=x.device)


def _finetune_batch(module: Any, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor, steps: int, lr: float,
                    wd: float, loss: RowLoss) -> torch.Tensor:
    net, f = module.net, module.explanandum
    B, size = x.shape[0], x.shape[-2:]
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in net.named_parameters() if not p.requires_grad}
    fixed.update(dict(net.named_buffers()))
    stacked = {n: p.detach().unsqueeze(0).repeat(B, *([1] * p.dim())).requires_grad_(True)
               for n, p in net.named_parameters() if p.requires_grad}
    opt = _optimizer([stacked[n] for n in names], lr, wd)
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
        total = loss(x, logits_of(stacked), onehot, logits).sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    with torch.no_grad():
        return torch.sigmoid(logits_of(stacked)).float()


def finetune_loop(module: LTXModule, x: torch.Tensor, targets: Any = None, steps: int | None = None,
                  lr: float | None = None, *, mode: str | None = None, weight_decay: float | None = None,
                  objective: dict | None = None, preset: str | None = None) -> torch.Tensor:
    """The plain reference of :func:`finetune`: one deep copy of the explainer and one AdamW per image.

    Same arguments and result as :func:`finetune` (up to floating-point rounding).
    """
    steps, lr, mode, settings, wd = _settings(module, x, weight_decay, preset, steps=steps, lr=lr, mode=mode,
                                              objective=objective)
    with finetuning_mode(module):
        xd, t, mode = _prepare(module, x, targets, mode)
        out = finetune_rows_loop(module, xd, t, module.mask_channel(t), steps, lr, wd,
                                 ltx_loss(module, mode, settings))
    return out.to(x.device)


def finetune_rows_loop(module: Any, x: torch.Tensor, t: torch.Tensor, channels: torch.Tensor, steps: int,
                       lr: float, wd: float, loss: RowLoss) -> torch.Tensor:
    """The plain reference of :func:`finetune_rows` (its arguments but ``batch_size``, and its result up to
    rounding): one deep copy of the network and one AdamW per row."""
    f = module.explanandum
    out = []
    for i in range(x.shape[0]):
        xi, ti = x[i:i + 1], t[i:i + 1]
        net = copy.deepcopy(module.net).eval()
        opt = _optimizer([p for p in net.parameters() if p.requires_grad], lr, wd)
        k = int(channels[i])
        with torch.no_grad():
            logits = f(xi).float()
        onehot = F.one_hot(ti, module.num_classes).float()
        for _ in range(steps):
            z = module.mask_logits(xi, net=net)[:, k:k + 1]
            total = loss(xi, z, onehot, logits).sum()
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        with torch.no_grad():
            out.append(torch.sigmoid(module.mask_logits(xi, net=net)[:, k:k + 1]).float())
    return torch.cat(out) if out else torch.zeros(0, 1, *x.shape[-2:], device=x.device)
