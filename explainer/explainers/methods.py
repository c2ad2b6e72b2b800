"""Trained explainers behind the methods interface: "trained" (any kind, one forward pass; also registered as
"explainer", the name the docs and configs use), "distill" (a distilled student), "ltx" (finetuned per image)
and "pltx" (LTX's pretrained network, one forward pass).

``get("trained", f, checkpoint=PATH).attribute(x, target)`` gives a trained explainer's mask of ``target``
(one forward pass; None: the predicted top-1). ``f`` may be None to use the explanandum recorded in the
checkpoint; when given, it must be the classifier the explainer was trained against (checked by weights
fingerprint).
"""

from __future__ import annotations

from typing import Any

import torch

from explainer.explainers.loading import load
from explainer.explainers.ltx_finetune import finetune, finetune_settings
from explainer.methods.base import METHODS, Method, register


@register("trained")
class TrainedExplainerMethod(Method):
    """A trained explainer checkpoint (Lightning .ckpt or safetensors export) of any kind: its mask of the
    target class from one forward pass.

    Args:
        checkpoint: the checkpoint or export.
        kind: the explainer kind the checkpoint must hold (None: any).
        batch_size: images per forward pass.
    """

    kind: str | None = None

    def __init__(self, f: Any = None, *, checkpoint: str | None = None, batch_size: int = 64, **options: Any):
        if checkpoint is None:
            raise ValueError(f"checkpoint: the {self.name!r} method needs checkpoint=PATH of a trained explainer")
        # the given explanandum replaces the recorded one; load() checks it is the same classifier
        self.module = load(checkpoint, explanandum=None if f is None else self._explanandum(f))
        if self.kind is not None and self.module.kind != self.kind:
            raise ValueError(f"checkpoint: {checkpoint!r} holds a {self.module.kind!r} explainer, expected "
                             f"{self.kind!r}")
        super().__init__(self.module.explanandum, **options)
        self.batch_size = batch_size

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.module.to(x.device)
        return self.module.explain(x, target, batch_size=self.batch_size)


# "explainer" loads a checkpoint of any kind (an LTX file too, without finetuning): the same method under the
# name the API has documented since 0.1 (docs/API.md)
METHODS.add("explainer", TrainedExplainerMethod)


@register("distill")
class DistilledMethod(TrainedExplainerMethod):
    """A distilled explainer (kind "distill"): its mask of the target class from one forward pass.

    ``output_grid`` (optional) replaces the checkpoint's: None keeps it, 0 turns smoothing off, g >= 1 averages
    the masks over g cells along the shorter side (:func:`explainer.explainers.distill.grid_smooth`).
    """

    kind = "distill"

    def __init__(self, f: Any = None, *, checkpoint: str | None = None, batch_size: int = 64,
                 output_grid: int | None = None, **options: Any):
        super().__init__(f, checkpoint=checkpoint, batch_size=batch_size, **options)
        if output_grid is not None:
            if isinstance(output_grid, bool) or not isinstance(output_grid, int) or output_grid < 0:
                raise ValueError(f"output_grid: expected None or an integer >= 0, got {output_grid!r}")
            self.module.output_grid = output_grid or None


@register("ltx")
class LTXMethod(TrainedExplainerMethod):
    """LTX (Barkan et al., 2023): the pretrained explainer finetuned on each image, then its mask of ``target``.

    ``steps`` AdamW steps per image at ``lr``, batched over the images (:func:`explainer.explainers.ltx.finetune`);
    the number of steps is fixed, never chosen by labels or metrics. Settings left at None come from ``preset``:
    None, those recorded in the checkpoint (by default the "validated" ones, chosen on validation images: 10 steps
    at lr 1e-4, mode "predicted", the curve objective); "validated"; or "paper" (the official code's: 25 steps at
    lr 2e-3, the pretraining objective). ``pretrained_only=True`` (or the registered name ``"pltx"``) skips
    finetuning: pLTX, the pretrained explainer's mask from one forward pass.

    Several step counts side by side in ``python -m explainer evaluate`` (method names are config keys)::

        methods:
          pltx: {checkpoint: checkpoints/synthetic_ltx.safetensors}
          ltx_5: {factory: "explainer.explainers.methods:LTXMethod", checkpoint: ..., steps: 5}
          ltx_paper: {factory: "explainer.explainers.methods:LTXMethod", checkpoint: ..., preset: paper}

    Args:
        checkpoint: an LTX checkpoint (kind "ltx"); another kind is an error.
        steps, lr, mode, objective: finetuning settings (see :func:`explainer.explainers.ltx.finetune`).
        preset: None, "validated" or "paper".
        pretrained_only: pLTX, no finetuning.
        batch_size: images finetuned (or explained) together.
    """

    kind = "ltx"

    def __init__(self, f: Any = None, *, checkpoint: str | None = None, steps: int | None = None,
                 lr: float | None = None, mode: str | None = None, objective: dict | None = None,
                 preset: str | None = None, pretrained_only: bool = False, batch_size: int = 16, **options: Any):
        super().__init__(f, checkpoint=checkpoint, batch_size=batch_size, **options)
        self.pretrained_only = bool(pretrained_only)
        self.settings = finetune_settings(self.module, preset, steps=steps, lr=lr, mode=mode, objective=objective)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.pretrained_only:
            return super()._attribute(x, target)
        self.module.to(x.device)
        return finetune(self.module, x, target, batch_size=self.batch_size, **self.settings)


@register("pltx")
class PLTXMethod(LTXMethod):
    """pLTX: the pretrained LTX explainer without per-image finetuning (``get("ltx", pretrained_only=True)``)."""

    def __init__(self, f: Any = None, *, checkpoint: str | None = None, **options: Any):
        options.pop("steps", None)
        options["pretrained_only"] = True
        super().__init__(f, checkpoint=checkpoint, **options)
