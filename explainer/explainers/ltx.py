"""LTX, "Learning to Explain" (Barkan et al., 2023): an explainer trained with the counterfactual objective.

An explainer network produces mask logits ``z``; the mask ``m = sigmoid(z)``
must keep the frozen explanandum's prediction (METHODS.md section 2)::

    L = D(f(x masked by m), target) + l_mask R(m) [+ l_inv L_inv(f(x masked by 1 - m))]

in two stages: pretraining on a dataset (pLTX; this module with the Trainer)
and a fixed number of finetuning steps per test image from the pretrained
weights (LTX; :func:`explainer.finetune.finetune`).

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

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from explainer import losses
from explainer.masking import check_baseline
from explainer.modules.explainer import AmortizedExplainerModule
from explainer.nets.segmentation import build_segmentation_net, init_encoder_from

TARGET_MODES = ("groundtruth", "predicted", "kl")
NETWORKS = ("backbone", "smp")
MASK_PENALTIES = ("mean", "softplus")
KL_SCOPES = ("all", "target")
CURVE_AREAS, CURVE_TEMPERATURE = (0.05, 0.1, 0.25, 0.5), 0.1
# the settings of the counterfactual objective, which finetuning may replace (explainer.finetune)
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


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "forward_features")


class BackboneMaskNet(nn.Module):
    """A copy of a classifier's backbone with LTX's light decoder: (B, 3, h, w) -> (B, K, h', w') logits.

    CNN (a timm model with ``forward_features`` or a torchvision ResNet): the
    last feature map -> 1x1 conv to ``K`` maps (stride 32). timm ViT: the
    patch tokens -> Linear(D, hidden) -> tanh -> Linear(hidden, K), folded onto
    the patch grid.

    Args:
        model: the explanandum's raw network (copied, never shared).
        out_channels: ``K`` mask maps.
        hidden: width of the ViT decoder (None: the embedding width).
        pretrained: keep the copied weights; False re-initialises them.
    """

    def __init__(self, model: nn.Module, out_channels: int, hidden: int | None = None, pretrained: bool = True):
        super().__init__()
        bb = copy.deepcopy(model)
        bb.requires_grad_(True)
        bb.train()
        self.vit = _is_vit(bb)
        if self.vit:
            bb.reset_classifier(0)
            for name in ("fc_norm", "head_drop"):
                if isinstance(getattr(bb, name, None), nn.Module):
                    setattr(bb, name, nn.Identity())  # unused by forward_features: no dead parameters
            dim = int(bb.num_features)
            hidden = int(hidden or dim)
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out_channels))
            self.num_prefix_tokens = int(getattr(bb, "num_prefix_tokens", 1))
            self.patch = tuple(int(p) for p in bb.patch_embed.patch_size)
            self.fixed_size = None if getattr(bb, "dynamic_img_size", False) else tuple(
                int(s) for s in bb.patch_embed.img_size)
            for m in bb.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False  # the explicit attention vmaps (finetuning); the fused kernel does not
            self.features = bb
        elif hasattr(bb, "forward_features") and hasattr(bb, "reset_classifier"):
            bb.reset_classifier(0)
            self.features = bb
            self.head = nn.Conv2d(int(bb.num_features), out_channels, kernel_size=1)
        elif hasattr(bb, "fc") and hasattr(bb, "avgpool"):  # torchvision ResNet-like
            keep = [m for n, m in bb.named_children() if n not in ("avgpool", "fc")]
            self.features = nn.Sequential(*keep)
            self.head = nn.Conv2d(int(bb.fc.in_features), out_channels, kernel_size=1)
        else:
            raise ValueError(f"network: 'backbone' mode supports timm CNNs and ViTs and torchvision ResNets, not "
                             f"{type(model).__name__}; use network='smp'")
        if not pretrained:
            self._reinit()

    def _reinit(self) -> None:
        if self.vit and hasattr(self.features, "init_weights"):
            self.features.init_weights()
        for m in self.features.modules():
            if m is not self.features and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The resolution the backbone is fed for an (h, w) input."""
        if self.vit:
            if self.fixed_size is not None:
                return self.fixed_size
            ph, pw = self.patch
            return max(ph, round(h / ph) * ph), max(pw, round(w / pw) * pw)
        return max(32, math.ceil(h / 32) * 32), max(32, math.ceil(w / 32) * 32)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.vit:
            feats = self.features.forward_features(z) if hasattr(self.features, "forward_features") \
                else self.features(z)
            return self.head(feats)
        tokens = self.features.forward_features(z)[:, self.num_prefix_tokens:]
        gh, gw = z.shape[-2] // self.patch[0], z.shape[-1] // self.patch[1]
        logits = self.head(tokens)  # (B, N, K)
        return logits.transpose(1, 2).reshape(z.shape[0], -1, gh, gw)


class LTXModule(AmortizedExplainerModule):
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

    kind = "ltx"

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
                 explanandum_fingerprint: str | None = None):
        super().__init__()
        check_objective_settings(baseline=baseline, mask_penalty=mask_penalty, lambda_mask=lambda_mask,
                                 lambda_inverse=lambda_inverse, kl_scope=kl_scope,
                                 lambda_curve=lambda_curve, curve_areas=curve_areas,
                                 curve_temperature=curve_temperature)
        if target not in TARGET_MODES:
            raise ValueError(f"target: expected one of {TARGET_MODES}, got {target!r}")
        if network not in NETWORKS:
            raise ValueError(f"network: expected one of {NETWORKS}, got {network!r}")
        self._setup_explanandum(explanandum, explanandum_fingerprint)
        self.save_hyperparameters(ignore=["explanandum"])
        self.hparams.explanandum = self.explanandum.spec
        self.hparams.explanandum_fingerprint = self.explanandum_fingerprint
        k = 1 if class_agnostic else self.num_classes
        fresh = explanandum_fingerprint is None  # restoring: the weights come from the checkpoint
        if network == "backbone":
            self.net = BackboneMaskNet(self.explanandum.model, k, decoder_hidden,
                                       pretrained=init_encoder_from_explanandum or not fresh)
        else:
            self.net = build_segmentation_net(architecture, encoder, k, encoder_weights, **(decoder_kwargs or {}))
            if init_encoder_from_explanandum and fresh:
                init_encoder_from(self.net, self.explanandum.model)
        self.freeze_bn = (network == "backbone") if freeze_bn is None else bool(freeze_bn)

    # ---- masks ------------------------------------------------------------------------
    def net_input(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images resized to what the network takes (multiples of 32; a ViT's input size)."""
        H, W = x.shape[-2:]
        if isinstance(self.net, BackboneMaskNet):
            h2, w2 = self.net.input_size(H, W)
        else:
            h2, w2 = max(32, math.ceil(H / 32) * 32), max(32, math.ceil(W / 32) * 32)
        z = self.normalise(x)
        if (h2, w2) != (H, W):
            z = F.interpolate(z, size=(h2, w2), mode="bilinear", align_corners=False)
        return z

    @staticmethod
    def to_size(S: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if S.shape[-2:] != tuple(size):
            S = F.interpolate(S, size=tuple(size), mode="bilinear", align_corners=False)
        return S

    def mask_logits(self, x: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """(B, K, H, W) mask logits at the input's resolution; K = C, or 1 when class-agnostic.

        ``net`` replaces ``self.net`` (a finetuned copy of it).
        """
        S = (self.net if net is None else net)(self.net_input(x))
        return self.to_size(S, x.shape[-2:])

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
        images = [self.mask(x, k) for k in keepers] + [self.mask(x, 1 - r) for r in removers]
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
