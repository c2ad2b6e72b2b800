"""The Explainer (Stalder et al., NeurIPS 2022): one forward pass gives a mask for every class.

"What You See is What You Classify: Black Box Attributions". A segmentation
network outputs ``C`` mask-logit maps ``S_c`` at input resolution, trained
against the frozen explanandum ``f`` with (METHODS.md section 1)::

    s_c = sigmoid(S_c);  m = sigmoid(max_{c in Y} S_c);  n = sigmoid(max_{c not in Y} S_c)
    L = L_cls + l_e L_ent + l_tv (TV(m) + TV(n)) + l_a L_area + l_m mean(m) + l_n mean(n)
        [+ l_class L_class]

``L_class`` is this project's extension (off in the paper's configs): for one
present class ``c`` per image, BCE(f(x masked by s_c), one-hot(c)), a term
that rewards a class's own map for keeping that class and no other.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MultilabelJaccardIndex

from explainer import losses
from explainer.data.base import IGNORE
from explainer.explanandum import Explanandum, check_images, load_explanandum
from explainer.masking import apply_mask, check_baseline
from explainer.nets.segmentation import build_segmentation_net, init_encoder_from
from explainer.resume import ExactResume

CHECKPOINT_FORMAT = "explainer.checkpoint/1"


def fingerprint(f: Explanandum) -> str:
    """A short hash of the explanandum's weights: a checkpoint knows which classifier it explains."""
    h = hashlib.sha256()
    for k, v in sorted(f.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def targets_to_index(targets: Any, batch: int, num_classes: int, device=None) -> torch.Tensor:
    """int | list[int] | LongTensor (B,) -> LongTensor (B,), checked against ``num_classes``.

    The one target vocabulary of the project: :func:`explainer.methods.base.check_targets`.
    """
    from explainer.methods.base import check_targets

    return check_targets(targets, batch, num_classes, device, name="targets")


def pick_present(present: torch.Tensor, index: torch.Tensor, step: int) -> torch.Tensor:
    """One present class per image, pseudo-random in (dataset index, step) only.

    Independent of batch composition and process: exact resumption and DDP
    runs that match a single process rely on it. (B, C) bool -> (B,) long.
    """
    C = present.shape[1]
    key = index.long().view(-1, 1) * 1000003 + torch.arange(C, device=present.device).view(1, -1) * 7919 + step * 104729
    key = (key * 2654435761) % 4294967291  # an integer hash per (image, class, step)
    score = torch.where(present, key.float(), torch.full_like(key, -1, dtype=torch.float32))
    return score.argmax(1)


class AmortizedExplainerModule(pl.LightningModule):
    """What every amortized explainer shares: explanandum, explain(), checkpoint metadata, optimiser.

    Subclasses set ``kind`` and implement ``forward(x) -> mask logits (B, K, H, W)``
    and ``compute_losses(batch) -> dict`` (with a ``"loss"`` entry).
    """

    kind = "amortized"

    def _setup_explanandum(self, spec: str, expected_fingerprint: str | None) -> None:
        self.explanandum = load_explanandum(spec)
        fp = fingerprint(self.explanandum)
        if expected_fingerprint is not None and expected_fingerprint != fp:
            raise ValueError(f"explanandum: this checkpoint was made for another classifier (weights fingerprint "
                             f"{expected_fingerprint}), but {spec!r} has fingerprint {fp}")
        self.explanandum_fingerprint = fp
        # the explanandum's weights are not saved with the explainer: the
        # checkpoint names it (spec + fingerprint) instead
        self.strict_loading = False

    @property
    def num_classes(self) -> int:
        return self.explanandum.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.explanandum.class_names

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        f = self.explanandum
        return (x - f.mean.to(x.dtype)) / f.std.to(x.dtype)

    def mask_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) mask logits at the input's resolution (any resolution: resized in and out)."""
        H, W = x.shape[-2:]
        mult = getattr(self, "size_multiple", 32)
        h2, w2 = max(mult, math.ceil(H / mult) * mult), max(mult, math.ceil(W / mult) * mult)
        z = self.normalise(x)
        if (h2, w2) != (H, W):
            z = F.interpolate(z, size=(h2, w2), mode="bilinear", align_corners=False)
        if self.hparams.get("channels_last", False):
            z = z.contiguous(memory_format=torch.channels_last)
        S = self.net(z)
        if S.shape[-2:] != (H, W):
            S = F.interpolate(S, size=(H, W), mode="bilinear", align_corners=False)
        return S

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_logits(x)

    @torch.inference_mode()
    def explain(self, x: torch.Tensor, targets: Any = None, batch_size: int = 64,
                autocast: str | None = None) -> torch.Tensor:
        """Masks in [0, 1]: (B, C, H, W) for every class in one pass, or (B, 1, H, W) for ``targets``.

        Args:
            x: images (B, 3, H, W) RGB in [0, 1], any resolution, on any device
                (moved to the explainer's device and the result back).
            targets: None (all classes), or int | list[int] | LongTensor (B,).
            batch_size: images per forward pass.
            autocast: None, "bf16" or "fp16" (mixed precision; meant for GPUs).
        """
        check_images(x)
        if self.training:
            self.eval()
        t = None if targets is None else targets_to_index(targets, x.shape[0], self.num_classes)
        dev = self.device
        out = []
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}.get(autocast, "bad")
        if dtype == "bad":
            raise ValueError(f"autocast: expected None, 'bf16' or 'fp16', got {autocast!r}")
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                masks = self.class_masks(xb).float()
            if t is not None:
                idx = t[i:i + batch_size].to(dev)
                masks = masks.gather(1, idx.view(-1, 1, 1, 1).expand(-1, 1, *masks.shape[-2:]))
            out.append(masks.to(x.device))
        return torch.cat(out)

    def class_masks(self, x: torch.Tensor) -> torch.Tensor:
        """Per-class masks (B, C, H, W) in [0, 1]."""
        return torch.sigmoid(self.mask_logits(x))

    def mask(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The project's masking rule with this explainer's baseline."""
        return apply_mask(x, m, self.hparams.baseline, self.explanandum.mean)

    # ---- Lightning ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "class_names"):
            names = dm.class_names
            if len(names) != self.num_classes:
                raise ValueError(f"data: the datamodule has {len(names)} classes, the explanandum "
                                 f"{self.explanandum.spec!r} predicts {self.num_classes}")
            self.input_size = getattr(dm, "image_size", None)

    def train(self, mode: bool = True):
        super().train(mode)
        self.explanandum.train(False)  # frozen, whatever the parent does
        return self

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        out = self.compute_losses(batch)
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "_S"}, on_step=True, on_epoch=True,
                      sync_dist=True, batch_size=batch["image"].shape[0])
        return out["loss"]

    def configure_callbacks(self):
        return [ExactResume()]  # exact resumption: per-step seeding, loader position (explainer.resume)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"optimizer: expected 'adam' or 'adamw', got {hp.optimizer!r}")
        if hp.lr_schedule == "constant" and not hp.warmup_steps:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(hp.warmup_steps)
        if warm >= total:
            raise ValueError(f"warmup_steps: {warm} is not below the run's {total} optimiser steps")

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if hp.lr_schedule == "constant":
                return 1.0
            if hp.lr_schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
            if hp.lr_schedule == "linear":
                return max(0.0, 1 - (step - warm) / max(1, total - warm))
            raise ValueError(f"lr_schedule: expected 'constant', 'cosine' or 'linear', got {hp.lr_schedule!r}")

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith("explanandum.")]:
            del sd[k]
        checkpoint["explainer_meta"] = self.export_metadata()

    def export_metadata(self) -> dict[str, Any]:
        """Self-description written into checkpoints and exports (plain JSON types)."""
        f = self.explanandum
        init = inspect.signature(type(self).__init__).parameters
        hp = {k: v for k, v in dict(self.hparams).items() if k in init}
        hp["explanandum"] = f.spec  # a spec string, also when an Explanandum object was passed in
        return {"format": CHECKPOINT_FORMAT, "kind": self.kind, "class_names": f.class_names,
                "num_classes": f.num_classes, "multilabel": f.multilabel, "baseline": self.hparams.baseline,
                "mean": f.mean.flatten().tolist(), "std": f.std.flatten().tolist(),
                "input_size": getattr(self, "input_size", None),
                "explanandum": {"spec": f.spec, "fingerprint": self.explanandum_fingerprint,
                                "meta": f.metadata()},
                "hparams": hp}


class ExplainerModule(AmortizedExplainerModule):
    """The Explainer of Stalder et al. (see the module docstring).

    Args:
        explanandum: spec of the frozen classifier (see ``load_explanandum``).
        architecture, encoder: smp architecture and encoder (``tu-<timm>`` too).
        encoder_weights: smp/timm encoder weights name (e.g. "imagenet") for
            users who have them; None: random init.
        init_encoder_from_explanandum: copy the explanandum's backbone into the
            encoder where names and shapes match (use ``tu-<its arch>``).
        decoder_kwargs: extra smp keyword arguments.
        baseline: masking baseline ("mean", "black" or "blur"); recorded.
        lambda_ent, lambda_tv, lambda_area, lambda_mask, lambda_nontarget:
            the paper's l_e, l_tv, l_a, l_m, l_n (official defaults 1, 1, 1, 0.1, 0.3).
        lambda_class: weight of the per-class extension term (0: the paper).
        area_min, area_max: the area bounds a_min, a_max.
        lr, weight_decay, optimizer, lr_schedule, warmup_steps: optimisation
            (the paper: Adam, constant lr).
        log_images: images per validation panel (0: none).
        channels_last: run the explainer network in channels-last memory
            format, and the explanandum too while fitting (same values; on
            CPU, oneDNN's convolutions are about 1.5x faster in it, see
            benchmarks/bench_explainer.py).
        explanandum_fingerprint: set when restoring; must match the explanandum.
    """

    kind = "explainer"

    def __init__(self, explanandum: str = "checkpoints/synthetic_classifier.safetensors",
                 architecture: str = "Unet", encoder: str = "tu-explainer_resnet_small",
                 encoder_weights: str | None = None, init_encoder_from_explanandum: bool = True,
                 decoder_kwargs: dict | None = None, baseline: str = "mean", lambda_ent: float = 1.0,
                 lambda_tv: float = 1.0, lambda_area: float = 1.0, lambda_mask: float = 0.1,
                 lambda_nontarget: float = 0.3, lambda_class: float = 0.0, area_min: float = 0.05,
                 area_max: float = 0.3, lr: float = 1e-4, weight_decay: float = 0.0, optimizer: str = "adam",
                 lr_schedule: str = "constant", warmup_steps: int = 0, log_images: int = 4,
                 channels_last: bool = True, explanandum_fingerprint: str | None = None):
        super().__init__()
        check_baseline(baseline)
        if not 0 <= area_min <= area_max <= 1:
            raise ValueError(f"area_min/area_max: expected 0 <= area_min <= area_max <= 1, got {area_min}, {area_max}")
        self._setup_explanandum(explanandum, explanandum_fingerprint)
        self.save_hyperparameters()
        self.hparams.explanandum_fingerprint = self.explanandum_fingerprint
        self.net = build_segmentation_net(architecture, encoder, self.num_classes, encoder_weights,
                                          **(decoder_kwargs or {}))
        if init_encoder_from_explanandum and explanandum_fingerprint is None:
            init_encoder_from(self.net, self.explanandum.model)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.val_iou = MultilabelJaccardIndex(num_labels=self.num_classes, threshold=0.5, average="macro",
                                              ignore_index=IGNORE)

    # ---- the loss -------------------------------------------------------------------
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        hp, f = self.hparams, self.explanandum
        x, y = batch["image"], batch["labels"]
        present = y > 0.5
        S = self(x)
        s = torch.sigmoid(S)
        m = torch.sigmoid(losses.masked_max(S, present))
        n = torch.sigmoid(losses.masked_max(S, ~present))
        l_cls = losses.classification_loss(f(self.mask(x, m)), y, f.multilabel)
        out = {"cls": l_cls}
        total = l_cls
        if hp.lambda_ent:
            out["ent"] = losses.negative_entropy(f(self.mask(x, 1 - m)))
            total = total + hp.lambda_ent * out["ent"]
        out["tv"] = losses.total_variation(m) + losses.total_variation(n)
        out["area"] = losses.area_loss(s, present, hp.area_min, hp.area_max)
        out["mask"] = m.mean()
        out["nontarget"] = n.mean()
        total = total + hp.lambda_tv * out["tv"] + hp.lambda_area * out["area"] + hp.lambda_mask * out["mask"] \
            + hp.lambda_nontarget * out["nontarget"]
        if hp.lambda_class:
            index = batch.get("index", torch.arange(x.shape[0], device=x.device))
            out["class"] = self._class_term(x, s, present, torch.as_tensor(index, device=x.device))
            total = total + hp.lambda_class * out["class"]
        out["loss"] = total
        out["_S"] = S.detach()
        return out

    def _class_term(self, x, s, present, index):
        """BCE(f(x masked by s_c), one-hot(c)) for one present class c per image (the extension)."""
        c = pick_present(present, index, int(self.global_step))
        has = present.any(1)
        sc = s.gather(1, c.view(-1, 1, 1, 1).expand(-1, 1, *s.shape[-2:]))
        logits = self.explanandum(self.mask(x, sc))
        onehot = F.one_hot(c, self.num_classes).float()
        if not has.any():
            return logits.sum() * 0
        return losses.classification_loss(logits[has], onehot[has], self.explanandum.multilabel)

    # while fitting, the frozen explanandum also runs channels-last (it is called three times per step on
    # masked images, most of a step's time); its layout is restored when fitting ends
    def on_fit_start(self) -> None:
        if self.hparams.channels_last:
            self.explanandum.model.to(memory_format=torch.channels_last)

    def on_fit_end(self) -> None:
        if self.hparams.channels_last:
            self.explanandum.model.to(memory_format=torch.contiguous_format)

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
            tgt = torch.where((gt == IGNORE)[:, None], torch.full_like(tgt, IGNORE), tgt)
            self.val_iou.update(s[hm], tgt)
        if batch_idx == 0 and self.hparams.log_images:
            self._log_panel(batch["image"][: self.hparams.log_images], s[: self.hparams.log_images],
                            present[: self.hparams.log_images])

    def on_validation_epoch_end(self):
        if self.val_iou.update_count:
            self.log("val/miou", self.val_iou.compute(), sync_dist=True, prog_bar=True)
        self.val_iou.reset()

    def _log_panel(self, x, s, present):
        from explainer import viz

        if self.trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        panel = viz.mask_panel(x, s, present, self.class_names)
        for logger in self.loggers:
            name = type(logger).__name__
            if name == "WandbLogger":
                logger.log_image(key="val/masks", images=[panel], step=self.global_step)
            elif name == "TensorBoardLogger":
                logger.experiment.add_image("val/masks", panel, self.global_step, dataformats="HWC")
            elif getattr(logger, "log_dir", None):
                viz.save_png(panel, Path(logger.log_dir) / "masks" / f"epoch{self.current_epoch:03d}.png")
