"""Training an explanandum: a timm classifier on any of the datamodules."""

from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision

from explainer.data.resume import ExactResume
from explainer.explanandum import FORMAT, build_timm, load_explanandum


class ClassifierModule(pl.LightningModule):
    """A timm classifier, multi-label (BCE) or single-label (CE).

    AdamW with a one-cycle schedule over the whole run. Validation logs
    ``val/map`` (macro mAP, torchmetrics) for multi-label data, ``val/acc``
    otherwise. Its checkpoints load with ``explainer.load_explanandum(path)``.

    Args:
        arch: timm model name (the project registers ``explainer_resnet_small``).
        num_classes: outputs; must equal the datamodule's class count.
        multilabel: sigmoid/BCE (True) or softmax/CE (False).
        lr, weight_decay: AdamW settings; lr is the one-cycle peak.
        mean, std: input normalisation, applied inside the model.
        model_kwargs: extra timm keyword arguments.
        init_from: start from the weights of a classifier checkpoint of this
            project (.ckpt or .safetensors) with the same architecture: a
            second training stage (e.g. a warm restart with a new schedule).
        pct_start: share of the one-cycle schedule spent warming up.
    """

    def __init__(self, arch: str = "explainer_resnet_small", num_classes: int = 8, multilabel: bool = True,
                 lr: float = 2e-3, weight_decay: float = 0.05, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.25, 0.25, 0.25), model_kwargs: dict | None = None,
                 class_names: list[str] | None = None, init_from: str | None = None, pct_start: float = 0.15):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_timm(arch, num_classes, model_kwargs)
        if init_from:
            src = load_explanandum(init_from, num_classes=num_classes)
            if src.arch != arch:
                raise ValueError(f"init_from: {init_from!r} is a {src.arch!r}, expected {arch!r}")
            self.model.load_state_dict(src.model.state_dict())
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if multilabel:
            self.val_metric = MultilabelAveragePrecision(num_labels=num_classes, average="macro")
        else:
            self.val_metric = MulticlassAccuracy(num_classes=num_classes)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "class_names"):
            names = dm.class_names
            if len(names) != self.hparams.num_classes:
                raise ValueError(f"model.num_classes: the datamodule has {len(names)} classes, "
                                 f"the model was configured with {self.hparams.num_classes}")
            if getattr(dm, "multilabel", self.hparams.multilabel) != self.hparams.multilabel:
                raise ValueError(f"model.multilabel: the datamodule is multilabel={dm.multilabel}")
            self.hparams.class_names = list(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    def _loss(self, logits, labels):
        if self.hparams.multilabel:
            return F.binary_cross_entropy_with_logits(logits, labels)
        return F.cross_entropy(logits, labels.argmax(1))

    def training_step(self, batch, batch_idx):
        logits = self(batch["image"])
        loss = self._loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["image"])
        self.log("val/loss", self._loss(logits, batch["labels"]), prog_bar=True, sync_dist=True)
        target = batch["labels"].long() if self.hparams.multilabel else batch["labels"].argmax(1)
        self.val_metric.update(logits, target)

    def on_validation_epoch_end(self):
        name = "val/map" if self.hparams.multilabel else "val/acc"
        self.log(name, self.val_metric.compute(), prog_bar=True, sync_dist=True)
        self.val_metric.reset()

    def configure_callbacks(self):
        return [ExactResume()]  # exact resumption: per-step seeding, loader position (explainer.data.resume)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr,
                                                    total_steps=int(self.trainer.estimated_stepping_batches),
                                                    pct_start=self.hparams.pct_start)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def explanandum_meta(self) -> dict:
        hp = self.hparams
        return {"format": FORMAT, "arch": hp.arch, "model_kwargs": dict(hp.model_kwargs or {}),
                "num_classes": hp.num_classes,
                "class_names": list(hp.class_names or [f"class_{i}" for i in range(hp.num_classes)]),
                "multilabel": hp.multilabel, "mean": list(hp.mean), "std": list(hp.std), "input_size": None}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain types only, so the checkpoint loads with weights_only=True
        checkpoint["hyper_parameters"]["explanandum_meta"] = self.explanandum_meta()
