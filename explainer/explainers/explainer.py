"""The Explainer (Stalder et al., NeurIPS 2022): one forward pass gives a mask for every class.

"What You See is What You Classify: Black Box Attributions". A segmentation
network outputs ``C`` mask-logit maps ``S_c`` at input resolution, trained
against the frozen explanandum ``f`` with (docs/METHODS.md section 1)::

    s_c = sigmoid(S_c);  m = sigmoid(max_{c in Y} S_c);  n = sigmoid(max_{c not in Y} S_c)
    L = L_cls + l_e L_ent + l_tv (TV(m) + TV(n)) + l_a L_area + l_m mean(m) + l_n mean(n)
        [+ l_class L_class]

``L_class`` is this project's extension (off in the paper's configs): for one
present class ``c`` per image, BCE(f(x masked by s_c), one-hot(c)), a term
that rewards a class's own map for keeping that class and no other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import MultilabelJaccardIndex

from explainer import losses
from explainer.core.constants import VOID
from explainer.core.masking import surround_fill
from explainer.explainers.base import TrainedExplainer, register_kind
from explainer.nets.segmentation import build_mask_net, paper_network


def step_hash(index: torch.Tensor, step: int, salt: torch.Tensor | int = 0) -> torch.Tensor:
    """An integer hash of (dataset index, training step[, salt]), elementwise, in int64 arithmetic (which wraps
    around for large indexes) and in [0, 4294967291).

    What a training step draws per image (the class :func:`pick_present` picks, the flips and rotations of
    :func:`explainer.explainers.distill.joint_augment`) is a function of this alone, never of the batch or the
    process: resumed runs repeat it and DDP runs match a single process.
    """
    return ((index.long() * 1000003 + salt * 7919 + step * 104729) * 2654435761) % 4294967291


def pick_present(present: torch.Tensor, index: torch.Tensor, step: int) -> torch.Tensor:
    """One present class per image, pseudo-random in (dataset index, step) only.

    Independent of batch composition and process: exact resumption and DDP
    runs that match a single process rely on it. (B, C) bool -> (B,) long.
    """
    C = present.shape[1]
    key = step_hash(index.view(-1, 1), step, torch.arange(C, device=present.device).view(1, -1))  # (image, class)
    score = torch.where(present, key.float(), torch.full_like(key, -1, dtype=torch.float32))
    return score.argmax(1)


INVERSE_FILLS = ("baseline", "surround")
OBJECTIVE_DEFAULTS = {"lambda_ent": 1.0, "lambda_tv": 1.0, "lambda_area": 1.0, "lambda_mask": 0.1,
                      "lambda_nontarget": 0.3, "area_min": 0.05, "area_max": 0.3, "lambda_tail": 0.0,
                      "tail_logit": 6.0}


def check_sharpen(sharpen: dict | None, base: dict | None = None) -> None:
    """``sharpen``: ``{"after": share of the run's steps in [0, 1), <objective setting>: value, ...}``, its
    settings valid over ``base`` (the module's objective settings)."""
    if sharpen is None:
        return
    if not isinstance(sharpen, dict) or "after" not in sharpen:
        raise ValueError(f"sharpen: expected a mapping with 'after' (a share of the run's steps) and objective "
                         f"settings among {sorted(OBJECTIVE_DEFAULTS)}, got {sharpen!r}")
    after = sharpen["after"]
    if isinstance(after, bool) or not isinstance(after, (int, float)) or not 0 <= after < 1:
        raise ValueError(f"sharpen: 'after' expected a number in [0, 1), got {after!r}")
    check_explainer_objective({**(base or {}), **{k: v for k, v in sharpen.items() if k != "after"}})


def check_explainer_objective(settings: dict | None) -> dict:
    """The Explainer objective's weights and area bounds (``OBJECTIVE_DEFAULTS`` for what is not given)."""
    settings = dict(settings or {})
    unknown = set(settings) - set(OBJECTIVE_DEFAULTS)
    if unknown:
        raise ValueError(f"explainer objective: unknown settings {sorted(unknown)}; expected some of "
                         f"{sorted(OBJECTIVE_DEFAULTS)}")
    out = {**OBJECTIVE_DEFAULTS, **settings}
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
            raise ValueError(f"explainer objective: {k} expected a number >= 0, got {v!r}")
    if not out["tail_logit"] > 0:
        raise ValueError(f"explainer objective: tail_logit expected a number > 0, got {out['tail_logit']!r}")
    if not out["area_min"] <= out["area_max"] <= 1:
        raise ValueError(f"explainer objective: expected 0 <= area_min <= area_max <= 1, got "
                         f"{out['area_min']}, {out['area_max']}")
    return out


def explainer_objective(module: TrainedExplainer, x: torch.Tensor, y: torch.Tensor, S: torch.Tensor,
                        settings: dict, s: torch.Tensor | None = None,
                        inverse_fill: str = "baseline") -> dict[str, torch.Tensor]:
    """The Explainer's loss (module docstring, without ``L_class``) of mask logits ``S`` (B, C, H, W) for images
    ``x`` with multi-hot labels ``y``, with the weights and area bounds of ``settings`` (the keys of
    ``OBJECTIVE_DEFAULTS``); ``module`` gives the explanandum and its masking; ``s``: ``sigmoid(S)``
    if the caller has it (one node in the graph, so gradients add up in the same order). Returns its terms and
    their weighted sum ``loss``. Shared with the distill kind, which can add it to its own terms.
    ``inverse_fill``: how the entropy term fills the removed region: ``"baseline"`` (the masking baseline, the
    paper's) or ``"surround"`` (from the surrounding pixels, :func:`explainer.core.masking.surround_fill`)."""
    f = module.explanandum
    present = y > 0.5
    s = torch.sigmoid(S) if s is None else s
    m = torch.sigmoid(losses.masked_max(S, present))
    n = torch.sigmoid(losses.masked_max(S, ~present))
    out = {"cls": losses.classification_loss(f(module.mask(x, m)), y, f.multilabel)}
    total = out["cls"]
    if settings["lambda_ent"]:
        removed = module.mask(x, 1 - m) if inverse_fill == "baseline" else surround_fill(x, 1 - m)
        out["ent"] = losses.negative_entropy(f(removed))
        total = total + settings["lambda_ent"] * out["ent"]
    out["tv"] = losses.total_variation(m) + losses.total_variation(n)
    out["area"] = losses.area_loss(s, present, settings["area_min"], settings["area_max"])
    out["mask"] = m.mean()
    out["nontarget"] = n.mean()
    total = total + settings["lambda_tv"] * out["tv"] + settings["lambda_area"] * out["area"] \
        + settings["lambda_mask"] * out["mask"] + settings["lambda_nontarget"] * out["nontarget"]
    if settings["lambda_tail"]:
        out["tail"] = losses.tail_loss(S, present, settings["tail_logit"])
        total = total + settings["lambda_tail"] * out["tail"]
    out["loss"] = total
    return out


@register_kind("explainer")
class ExplainerModule(TrainedExplainer):
    """The Explainer of Stalder et al. (see the module docstring).

    Args:
        explanandum: spec of the frozen classifier (see ``load_explanandum``).
        architecture, encoder: smp architecture and encoder (``tu-<timm>`` too); ``"auto"``: the paper's
            network for the explanandum (``explainer.nets.segmentation.paper_network``: DeepLabV3+ on the
            classifier's own architecture, DPT for a ViT).
        encoder_weights: smp/timm encoder weights name (e.g. "imagenet") for
            users who have them; None: random init.
        init_encoder_from_explanandum: copy the explanandum's backbone into the
            encoder where names and shapes match (use ``tu-<its arch>``).
        decoder_kwargs: extra smp keyword arguments.
        upsampling: "bilinear" (the network's own head) or "convex" ("convex_zero": the first models' border
            padding, ``explainer.nets.segmentation.build_mask_net``): the head's coarse masks upsampled with
            weights predicted from the image, so their edges follow the image's (``explainer.nets.convex``).
        baseline: masking baseline ("mean", "black" or "blur"); recorded.
        lambda_ent, lambda_tv, lambda_area, lambda_mask, lambda_nontarget:
            the paper's l_e, l_tv, l_a, l_m, l_n (official defaults 1, 1, 1, 0.1, 0.3).
        lambda_class: weight of the per-class extension term (0: the paper).
        lambda_curve: weight of LTX's curve term (0: off; ``explainer.losses.curve_term``, as the distill kind
            and per-image refinement use it): for one present class per image, the soft top 5, 10, 25 and 50 %
            of its mask must keep the class and the image without them must lose it. It asks the one-pass
            masks for what per-image refinement adds, at 8 more explanandum passes per image and step.
        sharpen: ``{"after": a, <setting>: value, ...}``: from the share ``a`` of the run's optimiser steps on,
            these objective settings (``lambda_mask``, ``area_max``, ``lambda_tail``, ...) replace the module's
            (masks first learn what each class needs, then are priced down to it; None: one objective).
        lambda_tail, tail_logit: weight of the faint-tail term (0: the paper; ``explainer.losses.tail_loss``):
            the present classes' mask logits between ``-tail_logit`` and 0 pushed down with a constant slope,
            so a mask is off where it is off instead of a few percent on over the whole background.
        area_min, area_max: the area bounds a_min, a_max.
        inverse_fill: what fills the region a mask removes in the entropy term: "baseline" (the masking
            baseline, the paper's) or "surround" (the surrounding colours, no flat silhouette left).
        lr, weight_decay, optimizer, lr_schedule, warmup_steps: optimisation
            (the paper: Adam, constant lr).
        log_images: images per validation panel (0: none).
        channels_last: run the explainer network in channels-last memory
            format, and the explanandum too while fitting (same values; on
            CPU, oneDNN's convolutions are about 1.5x faster in it, see
            benchmarks/bench_explainer.py).
        explanandum_fingerprint: set when restoring; must match the explanandum.
    """

    def __init__(self, explanandum: str = "checkpoints/synthetic_classifier.safetensors",
                 architecture: str = "Unet", encoder: str = "tu-explainer_resnet_small",
                 encoder_weights: str | None = None, init_encoder_from_explanandum: bool = True,
                 decoder_kwargs: dict | None = None, baseline: str = "mean", lambda_ent: float = 1.0,
                 lambda_tv: float = 1.0, lambda_area: float = 1.0, lambda_mask: float = 0.1,
                 lambda_nontarget: float = 0.3, lambda_class: float = 0.0, lambda_curve: float = 0.0,
                 lambda_tail: float = 0.0,
                 tail_logit: float = 6.0, area_min: float = 0.05,
                 area_max: float = 0.3, lr: float = 1e-4, weight_decay: float = 0.0, optimizer: str = "adam",
                 lr_schedule: str = "constant", warmup_steps: int = 0, log_images: int = 4,
                 channels_last: bool = True, inverse_fill: str = "baseline", upsampling: str = "bilinear",
                 sharpen: dict | None = None, explanandum_fingerprint: str | None = None):
        if inverse_fill not in INVERSE_FILLS:
            raise ValueError(f"inverse_fill: expected one of {INVERSE_FILLS}, got {inverse_fill!r}")
        if isinstance(lambda_curve, bool) or not isinstance(lambda_curve, (int, float)) or not lambda_curve >= 0:
            raise ValueError(f"lambda_curve: expected a number >= 0, got {lambda_curve!r}")
        if not 0 <= area_min <= area_max <= 1:
            raise ValueError(f"area_min/area_max: expected 0 <= area_min <= area_max <= 1, got {area_min}, {area_max}")
        super().__init__(explanandum, explanandum_fingerprint, baseline=baseline, lr=lr, weight_decay=weight_decay,
                         optimizer=optimizer, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
                         channels_last=channels_last)
        self.save_settings()
        # the module's objective settings (weights >= 0, tail_logit > 0, bounds), and sharpen's over them (no run
        # yet: objective_settings() is the module's own)
        check_sharpen(sharpen, check_explainer_objective(self.objective_settings()))
        if "auto" in (architecture, encoder):
            auto_arch, auto_enc = paper_network(self.explanandum)
            architecture = auto_arch if architecture == "auto" else architecture
            encoder = auto_enc if encoder == "auto" else encoder
        init = self.explanandum.model if init_encoder_from_explanandum and not self.restoring else None
        self.net = build_mask_net(architecture, encoder, self.num_classes, encoder_weights, decoder_kwargs, init,
                                  channels_last, upsampling)
        self.val_iou = MultilabelJaccardIndex(num_labels=self.num_classes, threshold=0.5, average="macro",
                                              ignore_index=VOID)

    # ---- the loss -------------------------------------------------------------------
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        x, y = batch["image"], batch["labels"]
        S = self(x).float()  # under bf16 autocast the mask terms (area quantiles, TV) are still taken in fp32
        s = torch.sigmoid(S)
        out = explainer_objective(self, x, y, S, self.objective_settings(), s, hp.get("inverse_fill", "baseline"))
        lambda_curve = hp.get("lambda_curve", 0.0)
        if hp.lambda_class or lambda_curve:
            # one present class per image (pseudo-random in (index, step)), explained by both terms
            present = y > 0.5
            index = torch.as_tensor(batch.get("index", torch.arange(x.shape[0], device=x.device)), device=x.device)
            c = pick_present(present, index, int(self.global_step))
        if hp.lambda_class:
            out["class"] = self._class_term(x, s, present, c)
            out["loss"] = out["loss"] + hp.lambda_class * out["class"]
        if lambda_curve:
            out["curve"] = self._curve_term(x, S, present, c)
            out["loss"] = out["loss"] + lambda_curve * out["curve"]
        out["_S"] = S.detach()
        return out

    def objective_settings(self) -> dict:
        """The objective's weights and area bounds at this step: the module's, with ``sharpen``'s in place from
        its ``after`` share of the run's optimiser steps on (a function of the global step: a resumed run and
        its validation see what the uninterrupted run saw)."""
        hp = self.hparams
        out = {k: hp.get(k, v) for k, v in OBJECTIVE_DEFAULTS.items()}
        sharpen = hp.get("sharpen")
        if sharpen and self._trainer is not None:
            total = max(1, int(self.trainer.estimated_stepping_batches))
            if self.global_step >= sharpen["after"] * total:
                out.update({k: v for k, v in sharpen.items() if k != "after"})
        return out

    def _class_term(self, x, s, present, c):
        """BCE(f(x masked by s_c), one-hot(c)) for the picked present class c (B,) of each image (the extension)."""
        has = present.any(1)
        sc = s.gather(1, c.view(-1, 1, 1, 1).expand(-1, 1, *s.shape[-2:]))
        logits = self.explanandum(self.mask(x, sc))
        onehot = F.one_hot(c, self.num_classes).float()
        if not has.any():
            return logits.sum() * 0
        return losses.classification_loss(logits[has], onehot[has], self.explanandum.multilabel)

    def _curve_term(self, x, S, present, c):
        """LTX's curve term (``explainer.losses.curve_term``, the module's masking baseline) of the mask logits
        of the picked present class c (B,) of each image that has one."""
        rows = present.any(1).nonzero().flatten()
        if not len(rows):
            return S.sum() * 0
        z = S[rows, c[rows]][:, None]
        onehot = F.one_hot(c[rows], self.num_classes).float()
        return losses.curve_term(self.explanandum, x[rows], z, onehot, self.baseline).mean()

    def validation_step(self, batch, batch_idx):
        out = self.compute_losses(batch)
        B = batch["image"].shape[0]
        S = out.pop("_S")
        s = torch.sigmoid(S)
        present = batch["labels"] > 0.5
        area = s.flatten(2).mean(2)  # (B, C)
        logs = {f"val/{k}": v for k, v in out.items() if k != "loss"}
        if present.any():
            logs["val/area_present"] = area[present].mean()
        if (~present).any():
            logs["val/area_absent"] = area[~present].mean()
        self.log_dict(logs, sync_dist=True, batch_size=B, prog_bar=False)
        self.log("val/loss", out["loss"], sync_dist=True, batch_size=B, prog_bar=True)
        hm = batch["has_mask"].bool()
        if hm.any():
            gt = batch["mask"][hm]
            tgt = F.one_hot(gt.clamp(max=self.num_classes), self.num_classes + 1)[..., 1:].permute(0, 3, 1, 2)
            tgt = torch.where((gt == VOID)[:, None], torch.full_like(tgt, VOID), tgt)
            self.val_iou.update(s[hm], tgt)
        if batch_idx == 0:
            self.log_validation_panels(batch["image"], s, present)

    def on_validation_epoch_end(self):
        if self.val_iou.update_count:
            self.log("val/miou", self.val_iou.compute(), sync_dist=True, prog_bar=True)
        self.val_iou.reset()
