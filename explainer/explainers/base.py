"""What every trained explainer shares, and the registry of explainer kinds.

A trained explainer is a LightningModule holding a frozen classifier (the *explanandum*) and a network
whose forward pass gives mask logits ``(B, K, H, W)``. :class:`TrainedExplainer` holds only what every kind
shares: the explanandum and its fingerprint, the masking baseline, the path of an image through the network
(normalise, resize to what the network takes, resize back), :meth:`~TrainedExplainer.explain`, checkpoint
metadata, and the optimiser and learning-rate schedule. A kind subclasses it, builds ``self.net``, implements
``compute_losses(batch) -> dict`` (with a ``"loss"`` entry) and registers itself with :func:`register_kind`;
:func:`explainer.load` then restores it from the kind's name recorded in the checkpoint.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from pathlib import Path
from typing import Any, Callable, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from explainer.core import viz
from explainer.core.constants import round_up_size
from explainer.core.images import check_images
from explainer.core.masking import apply_mask, check_baseline
from explainer.core.models import fixed_input_size
from explainer.core.registry import Registry
from explainer.core.targets import check_targets
from explainer.data.resume import ExactResume
from explainer.explainers.class_head import only_classes
from explainer.explainers.explanation import ExplainsImages
from explainer.explainers.integrity import NonFiniteError, check_class_names, diverged, nonfinite_tensors, unusable
from explainer.explainers.trust import TrustModel, mask_rows, trust_of, trust_signals
from explainer.explanandum import Explanandum, load_explanandum

CHECKPOINT_FORMAT = "explainer.checkpoint/1"
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")
MIN_NET_SIZE = 64

KINDS: Registry[type["TrainedExplainer"]] = Registry("explainer kind")


def register_kind(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`TrainedExplainer` subclass the explainer kind ``name`` (recorded in its
    checkpoints, so that :func:`explainer.load` rebuilds the right class)."""

    def set_kind(kind: str, cls: type) -> None:
        cls.kind = kind

    return KINDS.register(name, hook=set_kind)


def fingerprint(f: Explanandum) -> str:
    """A short hash of the explanandum's weights: a checkpoint knows which classifier it explains."""
    h = hashlib.sha256()
    for k, v in sorted(f.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class TrainedExplainer(pl.LightningModule, ExplainsImages):
    """Base of every trained explainer kind (see the module docstring).

    Args:
        explanandum: spec of the frozen classifier (see :func:`explainer.load_explanandum`) or an Explanandum.
        explanandum_fingerprint: set when restoring; must match the explanandum's weights.
        baseline: masking baseline ("mean", "black" or "blur"); recorded in checkpoints.
        lr, weight_decay, optimizer, lr_schedule, warmup_steps: optimisation (``optimizer`` "adam" or "adamw";
            ``lr_schedule`` "constant", "cosine" or "linear" decay after a linear warm-up of ``warmup_steps``).
        channels_last: run the network, and the explanandum while fitting, in channels-last memory format
            (same values; oneDNN's CPU convolutions are faster in it).
    """

    kind: ClassVar[str] = ""

    def __init__(self, explanandum: Any, explanandum_fingerprint: str | None = None, *, baseline: str = "mean",
                 lr: float = 1e-4, weight_decay: float = 0.0, optimizer: str = "adam",
                 lr_schedule: str = "constant", warmup_steps: int = 0, channels_last: bool = False):
        super().__init__()
        check_baseline(baseline)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise ValueError(f"lr: expected a learning rate > 0, got {lr!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {warmup_steps!r}")
        self.baseline = baseline
        self.lr, self.weight_decay, self.optimizer_name = float(lr), float(weight_decay), optimizer
        self.lr_schedule, self.warmup_steps, self.channels_last = lr_schedule, int(warmup_steps), bool(channels_last)
        self.explanandum = load_explanandum(explanandum)
        fp = fingerprint(self.explanandum)
        if explanandum_fingerprint is not None and explanandum_fingerprint != fp:
            raise ValueError(f"explanandum: this checkpoint was made for another classifier (weights fingerprint "
                             f"{explanandum_fingerprint}), but {self.explanandum.spec!r} has fingerprint {fp}")
        self.explanandum_fingerprint = fp
        self.restoring = explanandum_fingerprint is not None  # weights will come from a checkpoint
        self.input_size: int | None = None
        # fitted on validation images by `python -m explainer trust` (explainer.explainers.trust); recorded in
        # checkpoints and exports; None: explanation(trust=True) gives the uncalibrated score
        self.trust_model: TrustModel | None = None
        # the explanandum's weights are not saved with the explainer: the checkpoint names it
        # (spec + fingerprint) instead
        self.strict_loading = False

    # ---- validation panels (W&B, TensorBoard, or PNGs beside a CSV log) ---------------------------------------
    def log_validation_panels(self, x: torch.Tensor, s: torch.Tensor | None, present: torch.Tensor) -> None:
        """The first validation batch's panels, ``hparams.log_images`` rows each (0 or absent: none):
        ``val/masks``, the masks of the present classes of the first images, and ``val/least_trusted``, the masks
        of present classes with the lowest trust. ``s``: the batch's all-class masks (None: ``explain(x)``)."""
        n = int(self.hparams.get("log_images", 0) or 0)
        if not n or self.trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        if s is None:
            s = self.explain(x)
        self._log_panel(x[:n], s[:n], present[:n])
        self._log_least_trusted(x, s, present, n)

    def _log_least_trusted(self, x, s, present, n):
        """The ``n`` masks of present classes with the lowest trust in the first validation batch (the fitted
        trust model if the module has one, else ``keep * (1 - remove)``), one per row, as ``val/least_trusted``."""
        if self.trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        chosen = [p.nonzero()[:, 0] for p in present]
        if not sum(len(c) for c in chosen):
            return
        masks = [s[i, c] for i, c in enumerate(chosen)]
        features = self.trust_model.features if self.trust_model is not None else ()
        with self.explanandum.unchecked():
            probs = self.explanandum.probabilities(self.explanandum(x)).float()
            trust = trust_of(self, trust_signals(self, x, chosen, masks, probs, features))
        pick = torch.argsort(trust, stable=True)[:n]
        rows, cls = mask_rows(chosen)
        rows = rows[pick].to(x.device)
        self._log_panel(x[rows], s[rows], F.one_hot(cls[pick], self.num_classes).bool(), key="least_trusted")

    def _log_panel(self, x, s, present, key="masks"):
        if self.trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        panel = viz.mask_panel(x, s, present, self.class_names)
        for logger in self.loggers:
            name = type(logger).__name__
            if name == "WandbLogger":
                logger.log_image(key=f"val/{key}", images=[panel], step=self.global_step)
            elif name == "TensorBoardLogger":
                logger.experiment.add_image(f"val/{key}", panel, self.global_step, dataformats="HWC")
            elif getattr(logger, "log_dir", None):
                viz.save_png(panel, Path(logger.log_dir) / key / f"epoch{self.current_epoch:03d}.png")

    def save_settings(self) -> None:
        """``save_hyperparameters`` of the calling ``__init__`` (a kind's), with the explanandum recorded as its
        spec and its weights fingerprint (never the module itself)."""
        self.save_hyperparameters(ignore=["explanandum"], frame=inspect.currentframe().f_back)
        self.hparams.explanandum = self.explanandum.spec
        self.hparams.explanandum_fingerprint = self.explanandum_fingerprint

    @property
    def num_classes(self) -> int:
        return self.explanandum.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.explanandum.class_names

    # ---- the path of an image through the network -----------------------------------------
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        f = self.explanandum
        return (x - f.mean.to(x.dtype)) / f.std.to(x.dtype)

    def net_input_size(self, h: int, w: int) -> tuple[int, int]:
        """The resolution the network is fed for an (h, w) image: multiples of 32 (at least 64 a side for a
        network with GroupNorm).

        At 32 px the deepest feature map of an encoder-decoder is 1x1; a GroupNorm there (smp's FPN head) has
        one value per group, refuses a single image and normalises a batch to its bias alone; 64 px gives 2x2.
        A network that takes one size only (a ViT encoder) is fed that size.
        """
        if getattr(self, "_group_norm", None) is None:
            self._group_norm = any(isinstance(m, nn.GroupNorm) for m in self.net.modules())
            self._fixed_size = fixed_input_size(self.net)
        if self._fixed_size is not None:
            return self._fixed_size
        least = MIN_NET_SIZE if self._group_norm else 0
        return round_up_size(max(h, least), max(w, least))

    def net_input(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images resized to what the network takes."""
        H, W = x.shape[-2:]
        h2, w2 = self.net_input_size(H, W)
        z = self.normalise(x)
        if (h2, w2) != (H, W):
            z = F.interpolate(z, size=(h2, w2), mode="bilinear", align_corners=False)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return z

    @staticmethod
    def to_size(S: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if S.shape[-2:] != tuple(size):
            S = F.interpolate(S, size=tuple(size), mode="bilinear", align_corners=False)
        return S

    def mask_logits(self, x: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """(B, K, H, W) mask logits at the input's resolution (any resolution: resized in and out).

        ``net`` replaces ``self.net`` (e.g. a finetuned copy of it).
        """
        S = (self.net if net is None else net)(self.net_input(x))
        traced = torch.compiler.is_compiling() or torch.jit.is_tracing()  # an export: no data-dependent branch
        if not traced and not bool(torch.isfinite(S).all()):
            raise self.nonfinite("the masks are not finite (NaN or inf mask logits)")
        return self.to_size(S, x.shape[-2:])

    def nonfinite(self, what: str) -> Exception:
        """The error for weights gone non-finite: a diverged training while fitting, else a refusal."""
        if self._trainer is not None and self.trainer.state.fn == "fit":
            opts = self.trainer.optimizers
            return diverged(self.global_step, opts[0].param_groups[0]["lr"] if opts else self.lr, what)
        return NonFiniteError(f"explainer: {what}; its weights are unusable (the training that wrote them "
                              "diverged?)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_logits(x)

    def class_masks(self, x: torch.Tensor) -> torch.Tensor:
        """Per-class masks (B, C, H, W) in [0, 1]."""
        return torch.sigmoid(self.mask_logits(x))

    def mask(self, x: torch.Tensor, m: torch.Tensor, baseline: str | None = None) -> torch.Tensor:
        """The project's masking rule with this explainer's baseline (or ``baseline``)."""
        return apply_mask(x, m, baseline or self.baseline, self.explanandum.mean)

    def mask_channel(self, cls: torch.Tensor) -> torch.Tensor:
        """Which of the network's maps explains class ``cls`` (B,): the class itself (one map per class; a
        kind whose network is laid out otherwise, such as a class-agnostic LTX, overrides this)."""
        return cls

    @torch.inference_mode()
    def explain(self, x: torch.Tensor, targets: Any = None, batch_size: int = 64,
                autocast: str | None = None) -> torch.Tensor:
        """Masks in [0, 1]: (B, C, H, W) for every class in one pass, or (B, 1, H, W) for ``targets``.

        Args:
            x: images (B, 3, H, W) RGB in [0, 1], any resolution and floating dtype, on any device
                (computed in the explainer's dtype on its device; float32 masks returned on ``x``'s device).
                A batch of 0 images gives an empty result.
            targets: None (all classes), or int | list[int] | LongTensor (B,); then only the channels of the
                targets' classes are computed (:mod:`explainer.explainers.class_head`).
            batch_size: images per forward pass.
            autocast: None, "bf16" or "fp16" (mixed precision; meant for GPUs).
        """
        check_images(x)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}.get(autocast, "bad")
        if dtype == "bad":
            raise ValueError(f"autocast: expected None, 'bf16' or 'fp16', got {autocast!r}")
        if self.training:
            self.eval()
        t = None if targets is None else check_targets(targets, x.shape[0], self.num_classes, name="targets")
        k = self.num_classes if t is None else 1
        if x.shape[0] == 0:
            return torch.zeros(0, k, *x.shape[-2:], device=x.device)
        dev = self.device
        param_dtype = next(self.net.parameters()).dtype
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(dev, dtype=param_dtype, non_blocking=True)
            wanted = None if t is None else t[i:i + batch_size].to(dev)
            # with targets, only their classes' channels are computed (class_head.only_classes)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None), \
                    only_classes(self.net, self.num_classes, wanted) as channel:
                masks = self.class_masks(xb).float()
            if t is not None:
                masks = masks.gather(1, channel.view(-1, 1, 1, 1).expand(-1, 1, *masks.shape[-2:]))
            out.append(masks.to(x.device))
        return torch.cat(out)

    @torch.inference_mode()
    def selected_masks(self, x: torch.Tensor, classes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Masks (K_i, S, S) of images (B, 3, S, S) for each image's classes (for :meth:`explanation`): only
        the channels of the classes asked for are computed (of their union over the batch)."""
        union = torch.unique(torch.cat([c.reshape(-1) for c in classes]).to(self.device))
        with only_classes(self.net, self.num_classes, union) as channel:
            masks = self.explain(x)
        pos = torch.full((self.num_classes,), -1, dtype=torch.long, device=masks.device)
        pos[union.to(masks.device)] = channel.to(masks.device)  # class -> its channel of the masks
        return [m[pos[c.to(m.device)]] for m, c in zip(masks, classes)]

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
        raise NotImplementedError(f"{type(self).__name__} must implement compute_losses(batch)")

    def training_step(self, batch, batch_idx):
        out = self.compute_losses(batch)
        if not bool(torch.isfinite(out["loss"]).all()):
            raise self.nonfinite(f"the loss is {out['loss'].item()}")
        self.log_dict({f"train/{k}": v for k, v in out.items() if not k.startswith("_")}, on_step=True,
                      on_epoch=True, sync_dist=True, batch_size=batch["image"].shape[0])
        return out["loss"]

    # while fitting, the frozen explanandum runs channels-last too (it is called several times per step on
    # masked images, most of a step's time); its layout is restored when fitting ends
    def on_fit_start(self) -> None:
        if self.channels_last:
            self.explanandum.model.to(memory_format=torch.channels_last)

    def on_fit_end(self) -> None:
        if self.channels_last:
            self.explanandum.model.to(memory_format=torch.contiguous_format)

    def configure_callbacks(self):
        return [ExactResume()]  # exact resumption: per-step seeding, loader position (explainer.data.resume)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.AdamW
        opt = cls(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant" and not self.warmup_steps:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm, schedule = self.warmup_steps, self.lr_schedule
        if warm >= total:
            raise ValueError(f"warmup_steps: {warm} is not below the run's {total} optimiser steps")

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        why = unusable(self)  # a checkpoint of diverged weights is never written
        if why:
            raise self.nonfinite(f"{why}; no checkpoint written")
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith("explanandum.")]:
            del sd[k]
        checkpoint["explainer_meta"] = self.export_metadata()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming or ``load_from_checkpoint``: the recorded class names must be the classifier's, the weights
        finite."""
        check_class_names(checkpoint.get("explainer_meta") or {}, self.class_names, "checkpoint",
                          self.explanandum.spec)
        bad = nonfinite_tensors(checkpoint.get("state_dict") or {})
        if bad:
            raise NonFiniteError(f"checkpoint: refused: its weights are not finite (NaN or inf in {bad[:5]})")

    def export_metadata(self) -> dict[str, Any]:
        """Self-description written into checkpoints and exports (plain JSON types)."""
        f = self.explanandum
        init = inspect.signature(type(self).__init__).parameters
        hp = {k: v for k, v in dict(self.hparams).items() if k in init}
        hp["explanandum"] = f.spec  # a spec string, also when an Explanandum object was passed in
        return {"format": CHECKPOINT_FORMAT, "kind": self.kind, "class_names": f.class_names,
                "num_classes": f.num_classes, "multilabel": f.multilabel, "baseline": self.baseline,
                "mean": f.mean.flatten().tolist(), "std": f.std.flatten().tolist(),
                "input_size": self.input_size,
                **({"trust": self.trust_model.to_dict()} if self.trust_model is not None else {}),
                "explanandum": {"spec": f.spec, "fingerprint": self.explanandum_fingerprint,
                                "meta": f.metadata()},
                "hparams": hp}
