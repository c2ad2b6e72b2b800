"""LTX, "Learning to Explain" (Barkan et al., 2023): an explainer trained with the counterfactual objective.

An explainer network produces mask logits ``z``; the mask ``m = sigmoid(z)``
must keep the frozen explanandum's prediction (docs/METHODS.md section 2)::

    L = D(f(x masked by m), target) + l_mask R(m) [+ l_inv L_inv(f(x masked by 1 - m))]

in two stages: pretraining on a dataset (pLTX; this module with the Trainer)
and a fixed number of finetuning steps per test image from the pretrained
weights (LTX; :func:`finetune` below).

* ``D`` (``target``): ``"groundtruth"`` (the official default; CE/BCE to the
  labels), ``"predicted"`` (CE/BCE to the classifier's own hard prediction on
  the unmasked image) or ``"kl"`` (KL to its full predicted distribution);
  see :func:`explainer.losses.counterfactual_loss`.
  ``kl_scope="target"`` keeps only the explained class's probability (a
  Bernoulli KL of that class) instead of the whole distribution, so that a
  class-specific mask need not also keep the other classes' evidence.
* ``R(m)`` (``mask_penalty``): the mean of the mask; ``"softplus"`` is the
  official code's ``mean(softplus(sigmoid(z)))``, practically an L1 with a
  slope of about 0.6 (:func:`explainer.losses.mask_sparsity`).
* ``L_inv`` (``lambda_inverse`` > 0): the target classes must get no
  probability from what lies outside the mask
  (:func:`explainer.losses.inverse_mask_loss`).
* ``L_curve`` (``lambda_curve`` > 0; not in the paper, an option of this
  project): the same two conditions on the soft top ``a`` of the mask for
  each area ``a`` of ``curve_areas`` (:func:`explainer.losses.soft_top_area`),
  ``D(f(x masked by m_a)) + L_inv(f(x masked by 1 - m_a))`` averaged over the
  areas, with ``D``'s target: what insertion and deletion curves read (the
  ranking of the pixels), as a differentiable loss.
* Masking ``x_m = m x + (1 - m) b`` with the baseline ``b`` (default
  ``"black"``, the LTX paper's).

Masks are class-conditional by default: the network outputs ``C`` maps, so
``explain(x)`` gives every class in one pass, and training uses the map of
the target class(es): every class present in the labels (``"groundtruth"``)
or predicted by the classifier (``"predicted"``, ``"kl"``), one row per
(image, class) pair, whose ``D`` is computed against that class alone
(one-hot; the full distribution for ``"kl"``). ``class_agnostic=True`` gives
the paper's single map per image, trained against the whole target set;
``explain(x)`` then returns that same map for every class.

The network (``network``):

* ``"backbone"`` (the official design): a copy of the explanandum's own
  backbone (initialised from its weights when ``init_encoder_from_explanandum``)
  with a light decoder: for a CNN a 1x1 convolution on the last feature map
  (stride 32), for a timm ViT the patch tokens -> Linear -> tanh -> Linear,
  folded onto the patch grid; upsampled bilinearly to the input size. The
  ViT sees images resized to its input size.
* ``"smp"``: any segmentation_models_pytorch encoder-decoder (finer masks),
  optionally with its encoder initialised from the explanandum
  (``encoder="tu-<explanandum arch>"``).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from explainer import losses
from explainer.core.images import check_images
from explainer.core.masking import check_baseline
from explainer.core.targets import check_targets, predicted_classes
from explainer.explainers.base import TrainedExplainer, register_kind
from explainer.nets.backbone import BackboneMaskNet
from explainer.nets.segmentation import build_segmentation_net, init_encoder_from

TARGET_MODES = ("groundtruth", "predicted", "kl")
NETWORKS = ("backbone", "smp")
MASK_PENALTIES = ("mean", "softplus")
KL_SCOPES = ("all", "target")
CURVE_AREAS, CURVE_TEMPERATURE = (0.05, 0.1, 0.25, 0.5), 0.1
# the settings of the counterfactual objective, which finetuning may replace (see finetune below)
OBJECTIVE_KEYS = ("lambda_mask", "lambda_inverse", "baseline", "mask_penalty", "kl_scope", "lambda_curve",
                  "curve_areas", "curve_temperature")


def check_objective_settings(**settings: Any) -> None:
    """Validate settings of the counterfactual objective (any of ``OBJECTIVE_KEYS``): at construction and
    when finetuning replaces them."""
    if "curve_areas" in settings:
        a = settings["curve_areas"]
        if not isinstance(a, (list, tuple)) or not a or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in a):
            raise ValueError(f"curve_areas: expected a non-empty list of fractions in (0, 1), got {a!r}")
    if "curve_temperature" in settings:
        t = settings["curve_temperature"]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0 or t == float("inf"):
            raise ValueError(f"curve_temperature: expected a number > 0, got {t!r}")
    if "kl_scope" in settings and settings["kl_scope"] not in KL_SCOPES:
        raise ValueError(f"kl_scope: expected one of {KL_SCOPES}, got {settings['kl_scope']!r}")
    if "baseline" in settings:
        check_baseline(settings["baseline"])
    if "mask_penalty" in settings and settings["mask_penalty"] not in MASK_PENALTIES:
        raise ValueError(f"mask_penalty: expected one of {MASK_PENALTIES}, got {settings['mask_penalty']!r}")
    for name in ("lambda_mask", "lambda_inverse", "lambda_curve"):
        v = settings.get(name, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or v != v:
            raise ValueError(f"{name}: expected a number >= 0, got {v!r}")


@register_kind("ltx")
class LTXModule(TrainedExplainer):
    """LTX's explainer (see the module docstring); pretraining with the Trainer, finetuning with ``finetune``.

    Args:
        explanandum: spec of the frozen classifier (see ``load_explanandum``).
        network: ``"backbone"`` (a copy of the explanandum's backbone + light
            decoder, the official design) or ``"smp"`` (an encoder-decoder).
        architecture, encoder, encoder_weights, decoder_kwargs: the smp network.
        init_encoder_from_explanandum: start the encoder from the explanandum's
            weights (backbone: the copy keeps them; smp: tensors whose names and
            shapes match, use ``encoder="tu-<its arch>"``).
        decoder_hidden: width of the ViT decoder (None: the embedding width).
        class_agnostic: one map per image (the paper's) instead of one per class.
        target: ``"groundtruth"`` (official default), ``"predicted"`` or ``"kl"``.
        baseline: masking baseline ("black": the LTX paper's; "mean", "blur").
        lambda_mask: weight of the sparsity term R(m) (official: 50 for ViT-B
            and ResNet, 30 for ViT-S).
        mask_penalty: ``"mean"`` (R = mean(m)) or ``"softplus"`` (the official code's).
        lambda_inverse: weight of the inverse-mask term (0: off, the default).
        kl_scope: ``target="kl"`` only: ``"all"`` keeps the whole predicted
            distribution, ``"target"`` only the row's target class(es).
        lambda_curve, curve_areas, curve_temperature: weight (0: off), areas
            and temperature of the curve term (see the module docstring).
        freeze_bn: keep the explainer's batch-norm layers in eval mode (running
            statistics frozen, affine weights trained) during pretraining, as the
            official CNN explainer does. None: True for ``"backbone"``, False for
            ``"smp"``. Finetuning always uses eval-mode batch norm.
        lr, weight_decay, optimizer, lr_schedule, warmup_steps: pretraining
            optimisation (official: AdamW, lr 2e-3, linear warm-up then decay).
        explanandum_fingerprint: set when restoring; must match the explanandum.
    """

    def __init__(self, explanandum: Any = "checkpoints/synthetic_classifier.safetensors",
                 network: str = "backbone", architecture: str = "Unet", encoder: str = "tu-explainer_resnet_small",
                 encoder_weights: str | None = None, init_encoder_from_explanandum: bool = True,
                 decoder_kwargs: dict | None = None, decoder_hidden: int | None = None,
                 class_agnostic: bool = False, target: str = "groundtruth", baseline: str = "black",
                 lambda_mask: float = 50.0, mask_penalty: str = "mean", lambda_inverse: float = 0.0,
                 kl_scope: str = "all", lambda_curve: float = 0.0, curve_areas: tuple = CURVE_AREAS,
                 curve_temperature: float = CURVE_TEMPERATURE,
                 freeze_bn: bool | None = None, lr: float = 2e-3, weight_decay: float = 0.0,
                 optimizer: str = "adamw", lr_schedule: str = "linear", warmup_steps: int = 0,
                 finetuning: dict | None = None, explanandum_fingerprint: str | None = None):
        check_objective_settings(baseline=baseline, mask_penalty=mask_penalty, lambda_mask=lambda_mask,
                                 lambda_inverse=lambda_inverse, kl_scope=kl_scope,
                                 lambda_curve=lambda_curve, curve_areas=curve_areas,
                                 curve_temperature=curve_temperature)
        if target not in TARGET_MODES:
            raise ValueError(f"target: expected one of {TARGET_MODES}, got {target!r}")
        if network not in NETWORKS:
            raise ValueError(f"network: expected one of {NETWORKS}, got {network!r}")
        finetuning = check_finetuning(finetuning)
        super().__init__(explanandum, explanandum_fingerprint, baseline=baseline, lr=lr, weight_decay=weight_decay,
                         optimizer=optimizer, lr_schedule=lr_schedule, warmup_steps=warmup_steps)
        self.save_settings()
        self.hparams.finetuning = finetuning
        k = 1 if class_agnostic else self.num_classes
        fresh = not self.restoring
        if network == "backbone":
            self.net = BackboneMaskNet(self.explanandum.model, k, decoder_hidden,
                                       pretrained=init_encoder_from_explanandum or not fresh)
        else:
            self.net = build_segmentation_net(architecture, encoder, k, encoder_weights, **(decoder_kwargs or {}))
            if init_encoder_from_explanandum and fresh:
                init_encoder_from(self.net, self.explanandum.model)
        self.freeze_bn = (network == "backbone") if freeze_bn is None else bool(freeze_bn)

    # ---- masks ------------------------------------------------------------------------
    def net_input_size(self, h: int, w: int) -> tuple[int, int]:
        """Multiples of 32, or what the backbone takes (a ViT's input size)."""
        return self.net.input_size(h, w) if isinstance(self.net, BackboneMaskNet) else super().net_input_size(h, w)

    def class_masks(self, x: torch.Tensor) -> torch.Tensor:
        """Per-class masks (B, C, H, W); class-agnostic: the one map repeated for every class."""
        s = torch.sigmoid(self.mask_logits(x))
        return s.expand(-1, self.num_classes, -1, -1) if self.hparams.class_agnostic else s

    def mask_channel(self, cls: torch.Tensor) -> torch.Tensor:
        """Which of the network's maps explains class ``cls`` (B,): the class itself, or 0 if class-agnostic."""
        return torch.zeros_like(cls) if self.hparams.class_agnostic else cls

    # ---- the objective ------------------------------------------------------------------
    def predicted_set(self, logits: torch.Tensor) -> torch.Tensor:
        """Multi-hot (B, C) predicted classes: top-1 (single-label), ``logit > 0`` or else top-1 (multi-label)."""
        top = F.one_hot(logits.argmax(1), logits.shape[1]).bool()
        if not self.explanandum.multilabel:
            return top
        above = logits > 0
        return torch.where(above.any(1, keepdim=True), above, top)

    def objective(self, x: torch.Tensor, z: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor,
                  mode: str | None = None) -> dict[str, torch.Tensor]:
        """Per-row terms of the counterfactual objective, each (P,).

        Args:
            x: images (P, 3, H, W) in [0, 1], one row per (image, explained map).
            z: that map's logits (P, 1, H, W).
            targets: multi-hot (P, C) target classes of the row (one-hot for a
                class-conditional map).
            logits: the explanandum's logits on the unmasked images (P, C).
            mode: ``"groundtruth"``/``"predicted"``: D is CE/BCE to ``targets``;
                ``"kl"``: KL to the distribution ``logits``. None: the module's.

        Returns:
            ``prediction`` (D), ``mask`` (R(m)), ``inverse`` (when
            ``lambda_inverse`` > 0), ``curve`` (when ``lambda_curve`` > 0),
            ``area`` (mean of m) and ``loss``.
        """
        hp, f = self.hparams, self.explanandum
        mode = mode or hp.target
        scope = targets if mode == "kl" and hp.kl_scope == "target" else None
        m = torch.sigmoid(z)
        # the masks whose images must keep the class (m, then the curve term's soft top-a masks) and those
        # whose removal must lose it (m for the inverse term, the top-a masks): one explanandum pass for all
        tops = [losses.soft_top_area(z, float(a), hp.curve_temperature) for a in hp.curve_areas] \
            if hp.lambda_curve else []
        keepers, removers = [m] + tops, ([m] if hp.lambda_inverse else []) + tops
        images = [self.mask(x, k, hp.baseline) for k in keepers] + [self.mask(x, 1 - r, hp.baseline) for r in removers]
        outs = f(torch.cat(images)).chunk(len(images))
        ref, how = (logits, "kl") if mode == "kl" else (targets, "groundtruth")
        d = [losses.counterfactual_loss(lm, ref, how, f.multilabel, "none", classes=scope)
             for lm in outs[:len(keepers)]]
        inv = [losses.inverse_mask_loss(lm, targets, f.multilabel, reduction="none") for lm in outs[len(keepers):]]
        out = {"prediction": d[0], "mask": losses.mask_sparsity(m, hp.mask_penalty, reduction="none")}
        loss = d[0] + hp.lambda_mask * out["mask"]
        if hp.lambda_inverse:
            out["inverse"] = inv[0]
            loss = loss + hp.lambda_inverse * out["inverse"]
        if tops:
            out["curve"] = (torch.stack(d[1:]) + torch.stack(inv[-len(tops):])).mean(0)
            loss = loss + hp.lambda_curve * out["curve"]
        out["area"] = m.detach().flatten(1).mean(1)
        out["loss"] = loss
        return out

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The objective on a batch (``image`` (B, 3, H, W); ``labels`` multi-hot (B, C) for "groundtruth").

        Rows: class-agnostic, one per image against its target set;
        class-conditional, one per (image, target class) with that class's map.
        Terms are averaged over rows.
        """
        hp, f = self.hparams, self.explanandum
        x = batch["image"]
        with torch.no_grad():
            logits = f(x).float()
        if hp.target == "groundtruth":
            y = batch.get("labels") if isinstance(batch, dict) else None
            if y is None:
                raise ValueError("target: 'groundtruth' needs labels (batch['labels'], multi-hot (B, C)); the data "
                                 "has none: use target='predicted' or 'kl'")
            if y.dim() != 2 or y.shape[1] != self.num_classes:
                raise ValueError(f"labels: expected multi-hot (B, {self.num_classes}) for this explanandum, "
                                 f"got {tuple(y.shape)}")
            tset = y > 0.5
        else:
            tset = self.predicted_set(logits)
        S = self(x)
        if hp.class_agnostic:
            b = torch.arange(x.shape[0], device=x.device)
            k = torch.zeros_like(b)
            rows_t = tset.float()
        else:
            b, k = tset.nonzero(as_tuple=True)
            rows_t = F.one_hot(k, self.num_classes).float()
        if b.numel() == 0:  # no target class in the whole batch (background-only images)
            zero = S.sum() * 0
            return {"loss": zero, "prediction": zero.detach(), "mask": zero.detach(), "area": zero.detach()}
        z = S[b, k].unsqueeze(1)
        per = self.objective(x[b], z, rows_t, logits[b], hp.target)
        return {key: v.mean() if key == "loss" else v.detach().mean() for key, v in per.items()}

    # ---- Lightning ------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if mode and getattr(self, "freeze_bn", False):
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def validation_step(self, batch, batch_idx):
        out = self.compute_losses(batch)
        B = batch["image"].shape[0]
        with torch.no_grad():
            area_all = self.class_masks(batch["image"]).mean()
        self.log_dict({f"val/{k}": v for k, v in out.items() if k != "loss"}, sync_dist=True, batch_size=B)
        self.log("val/area_all", area_all, sync_dist=True, batch_size=B)
        self.log("val/loss", out["loss"], sync_dist=True, batch_size=B, prog_bar=True)


# ---------------------------------------------------------------------------- per-image finetuning (LTX) --
# Stage 2 of LTX.
# For each image, start from the pretrained explainer, take a fixed number of
# optimiser steps (AdamW, fresh state, constant lr; the official code: up to 25
# steps at lr 2e-3) on that image alone with the pretraining objective
# (:meth:`LTXModule.objective`) for the explained class, then emit the mask.
# No step is selected by labels or by an evaluation metric (the official code
# picks the step that scores best on the evaluation metric itself against the
# ground truth; this does not).
#
# :func:`finetune` runs every image of a batch at once: the explainer's
# parameters are stacked into one copy per image (leading dimension B), the
# network runs under ``torch.func.vmap`` + ``functional_call`` (each image
# through its own copy), the explanandum on the ordinary batch, and one AdamW
# steps all copies. This is exact: the loss is the *sum* of the per-image
# losses, so each copy's gradient is its own image's gradient, and AdamW's
# update is element-wise, so one optimiser over stacked tensors equals B
# independent optimisers. :func:`finetune_loop` is the plain reference (one
# deep copy and one optimiser per image), kept for tests and the benchmark.
#
# Batch norm and dropout: during finetuning the explainer network is in eval
# mode, so batch norm uses its (frozen) running statistics, its affine weights
# are finetuned, and dropout is off. This keeps an image's result independent
# of the other images in its batch (batch statistics of a one-image batch would
# also differ from pretraining) and makes vmap well defined.

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


# Finetuning settings. "validated": chosen on validation images of the embedded benchmark (docs/RESULTS.md):
# 10 steps at lr 1e-4, BCE to the explained class (mode "predicted"), the mean-colour baseline and the curve
# term in place of the inverse term. "paper": the official code's (up to 25 steps at lr 2e-3, the pretraining
# objective and target mode). A pLTX checkpoint records its own settings (LTXModule(finetuning=...));
# checkpoints that record none use "validated".
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "validated": {"steps": 10, "lr": 1e-4, "mode": "predicted",
                  "objective": {"baseline": "mean", "lambda_inverse": 0.0, "lambda_curve": 3.0,
                                "curve_areas": [0.05, 0.1, 0.25, 0.5]}},
    "paper": {"steps": 25, "lr": 2e-3, "mode": None, "objective": {}},
}
FINETUNE_KEYS = ("steps", "lr", "mode", "objective")


def check_finetuning(settings: Any) -> dict[str, Any]:
    """Complete finetuning settings (``steps``, ``lr``, ``mode``, ``objective``); None: the "validated" preset,
    a preset name: that preset, a dict: those keys over the "validated" preset."""
    if settings is None:
        settings = "validated"
    if isinstance(settings, str):
        if settings not in FINETUNE_PRESETS:
            raise ValueError(f"finetuning: expected a preset among {sorted(FINETUNE_PRESETS)} or a dict, "
                             f"got {settings!r}")
        settings = FINETUNE_PRESETS[settings]
    if not isinstance(settings, dict):
        raise TypeError(f"finetuning: expected a dict of {list(FINETUNE_KEYS)} or a preset name, "
                        f"got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(FINETUNE_KEYS))
    if unknown:
        raise ValueError(f"finetuning: unknown key(s) {unknown}; expected among {list(FINETUNE_KEYS)}")
    out = {**FINETUNE_PRESETS["validated"], **settings}
    out["steps"], out["lr"] = check_steps(out["steps"]), check_lr(out["lr"])
    if out["mode"] is not None and out["mode"] not in TARGET_MODES:
        raise ValueError(f"finetuning.mode: expected one of {TARGET_MODES} or None, got {out['mode']!r}")
    out["objective"] = check_objective(out["objective"])
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in out.items()}


def finetune_settings(module: Any, preset: str | None = None, **given: Any) -> dict[str, Any]:
    """The settings a finetuning call uses: ``preset`` (or those recorded in ``module``), then every argument
    given as not None."""
    if preset is not None and preset not in FINETUNE_PRESETS:
        raise ValueError(f"preset: expected one of {sorted(FINETUNE_PRESETS)} or None, got {preset!r}")
    base = FINETUNE_PRESETS[preset] if preset else module.hparams.get("finetuning") or FINETUNE_PRESETS["validated"]
    return check_finetuning({**base, **{k: v for k, v in given.items() if v is not None}})


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
            t = predicted_classes(module.explanandum, x)
    else:
        t = check_targets(targets, x.shape[0], module.num_classes, x.device, name="targets")
    return x, t, mode


def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach=False: the same arithmetic for stacked and per-image tensors
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def finetune(module, x: torch.Tensor, targets: Any = None, steps: int | None = None, lr: float | None = None, *,
             mode: str | None = None, weight_decay: float | None = None, batch_size: int = 16,
             objective: dict | None = None, preset: str | None = None) -> torch.Tensor:
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
    check_module(module)
    st = finetune_settings(module, preset, steps=steps, lr=lr, mode=mode, objective=objective)
    steps, lr, mode, objective = st["steps"], st["lr"], st["mode"], st["objective"]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    check_images(x)
    wd = module.weight_decay if weight_decay is None else float(weight_decay)
    out = []
    if x.shape[0] == 0:
        return torch.zeros(0, 1, *x.shape[-2:], device=x.device)
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


def finetune_loop(module, x: torch.Tensor, targets: Any = None, steps: int | None = None, lr: float | None = None,
                  *, mode: str | None = None, weight_decay: float | None = None,
                  objective: dict | None = None, preset: str | None = None) -> torch.Tensor:
    """The plain reference of :func:`finetune`: one deep copy of the explainer and one AdamW per image.

    Same arguments and result as :func:`finetune` (up to floating-point rounding).
    """
    check_module(module)
    st = finetune_settings(module, preset, steps=steps, lr=lr, mode=mode, objective=objective)
    steps, lr, mode, objective = st["steps"], st["lr"], st["mode"], st["objective"]
    check_images(x)
    wd = module.weight_decay if weight_decay is None else float(weight_decay)
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
