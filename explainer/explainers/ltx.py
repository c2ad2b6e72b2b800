"""LTX, "Learning to Explain" (Barkan et al., 2023): an explainer trained with the counterfactual objective.

An explainer network produces mask logits ``z``; the mask ``m = sigmoid(z)``
must keep the frozen explanandum's prediction (docs/METHODS.md section 2)::

    L = D(f(x masked by m), target) + l_mask R(m) [+ l_inv L_inv(f(x masked by 1 - m))]

in two stages: pretraining on a dataset (pLTX; this module with the Trainer)
and a fixed number of finetuning steps per test image from the pretrained
weights (LTX; :func:`explainer.explainers.ltx_finetune.finetune`).

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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from explainer import losses
from explainer.explainers.base import TrainedExplainer, register_kind
from explainer.explainers.ltx_finetune import check_module, finetune, finetune_loop, finetune_settings
from explainer.explainers.ltx_settings import (
    FINETUNE_PRESETS,
    KL_SCOPES,
    MASK_PENALTIES,
    OBJECTIVE_KEYS,
    TARGET_MODES,
    LTXObjective,
    check_finetuning,
    check_objective_settings,
)
from explainer.losses import CURVE_AREAS, CURVE_TEMPERATURE
from explainer.nets.backbone import BackboneMaskNet
from explainer.nets.segmentation import build_segmentation_net, init_encoder_from

NETWORKS = ("backbone", "smp")
# the names of LTX's settings and finetuning, public here since LTX's first release
__all__ = ["LTXModule", "LTXObjective", "FINETUNE_PRESETS", "OBJECTIVE_KEYS", "TARGET_MODES", "NETWORKS",
           "MASK_PENALTIES", "KL_SCOPES", "CURVE_AREAS", "CURVE_TEMPERATURE", "check_finetuning",
           "check_objective_settings", "check_module", "finetune", "finetune_loop", "finetune_settings"]


@register_kind("ltx")
class LTXModule(TrainedExplainer):
    """LTX's explainer (see the module docstring); pretraining with the Trainer, finetuning with
    :func:`explainer.explainers.ltx_finetune.finetune`.

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
        log_images: rows of the validation panels (``val/masks``, ``val/least_trusted``; 0: none).
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
                 finetuning: dict | None = None, log_images: int = 4, explanandum_fingerprint: str | None = None):
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

    def objective_settings(self, **changes: Any) -> LTXObjective:
        """The objective's settings recorded in this module, with ``changes`` (finetuning's) in place."""
        return LTXObjective(**{k: self.hparams[k] for k in OBJECTIVE_KEYS}).replace(**changes)

    def objective(self, x: torch.Tensor, z: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor,
                  mode: str | None = None, settings: LTXObjective | None = None) -> dict[str, torch.Tensor]:
        """Per-row terms of the counterfactual objective, each (P,).

        Args:
            x: images (P, 3, H, W) in [0, 1], one row per (image, explained map).
            z: that map's logits (P, 1, H, W).
            targets: multi-hot (P, C) target classes of the row (one-hot for a
                class-conditional map).
            logits: the explanandum's logits on the unmasked images (P, C).
            mode: ``"groundtruth"``/``"predicted"``: D is CE/BCE to ``targets``;
                ``"kl"``: KL to the distribution ``logits``. None: the module's.
            settings: the objective's settings (None: the module's, :meth:`objective_settings`).

        Returns:
            ``prediction`` (D), ``mask`` (R(m)), ``inverse`` (when
            ``lambda_inverse`` > 0), ``curve`` (when ``lambda_curve`` > 0),
            ``area`` (mean of m) and ``loss``.
        """
        s = settings or self.objective_settings()
        mode = mode or self.hparams.target
        m = torch.sigmoid(z)
        # D of m and R(m), the inverse term of m and the curve term (soft top-a masks): one explanandum pass
        ref, how = (logits, "kl") if mode == "kl" else (targets, "groundtruth")
        terms = losses.curve_term(self.explanandum, x, z, targets, s.baseline,
                                  s.curve_areas if s.lambda_curve else (), s.curve_temperature, mode=how,
                                  reference=ref, classes=targets if mode == "kl" and s.kl_scope == "target" else None,
                                  also_keep=[m], also_lose=[m] if s.lambda_inverse else [])
        out = {"prediction": terms.kept[0], "mask": losses.mask_sparsity(m, s.mask_penalty, reduction="none")}
        loss = out["prediction"] + s.lambda_mask * out["mask"]
        if s.lambda_inverse:
            out["inverse"] = terms.removed[0]
            loss = loss + s.lambda_inverse * out["inverse"]
        if terms.keep is not None:
            out["curve"] = terms.per_row()
            loss = loss + s.lambda_curve * out["curve"]
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
        if batch_idx == 0:
            self.log_validation_panels(batch["image"], None, batch["labels"] > 0.5)
