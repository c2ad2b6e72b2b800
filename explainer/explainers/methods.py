"""The amortized explainers behind the methods interface: "explainer", "ltx" (finetuned) and "pltx".

``get("explainer", f, checkpoint=PATH).attribute(x, target)`` gives the trained
Explainer's mask of ``target`` (one forward pass; None: the predicted top-1).
``f`` may be None to use the explanandum recorded in the checkpoint; when
given, it must be the classifier the explainer was trained against (checked by
weights fingerprint).
"""

from __future__ import annotations

from typing import Any

import torch

from explainer.methods.base import Method, register


class AmortizedMethod(Method):
    """Wraps a trained explainer checkpoint (Lightning .ckpt or safetensors export)."""

    kind = "explainer"

    def __init__(self, f: Any = None, *, checkpoint: str, batch_size: int = 64, **options: Any):
        from explainer.amortized import load

        if checkpoint is None:
            raise ValueError(f"checkpoint: the {self.kind!r} method needs checkpoint=PATH of a trained explainer")
        # the given explanandum replaces the recorded one; load() checks it is the
        # same classifier (weights fingerprint)
        self.module = load(checkpoint, explanandum=None if f is None else self._explanandum(f))
        if self.kind == "ltx" and self.module.kind != "ltx":
            raise ValueError(f"checkpoint: {checkpoint!r} holds a {self.module.kind!r} explainer, expected 'ltx'")
        super().__init__(self.module.explanandum, **options)
        self.batch_size = batch_size

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.module.to(x.device)
        return self.module.explain(x, target, batch_size=self.batch_size)


@register("explainer")
class ExplainerMethod(AmortizedMethod):
    """The Explainer (Stalder et al., 2022): class masks from one forward pass of a trained network."""

    name = "explainer"
    kind = "explainer"


@register("ltx")
class LTXMethod(AmortizedMethod):
    """LTX (Barkan et al., 2023): the pretrained explainer finetuned on each image, then its mask of ``target``.

    ``steps`` AdamW steps per image at ``lr`` (official: up to 25 at 2e-3),
    batched over the images (:func:`explainer.finetune.finetune`); the number of
    steps is fixed, never chosen by labels or metrics. ``pretrained_only=True``
    (or the registered name ``"pltx"``) skips finetuning: pLTX, the pretrained
    explainer's mask from one forward pass.

    Several step counts side by side in ``python -m explainer evaluate`` (method names are config keys)::

        methods:
          pltx: {checkpoint: runs/ltx/checkpoints/last.ckpt}
          ltx_5: {factory: "explainer.methods.amortized:LTXMethod", checkpoint: ..., steps: 5}
          ltx_25: {factory: "explainer.methods.amortized:LTXMethod", checkpoint: ..., steps: 25}

    Args:
        checkpoint: an LTX checkpoint (kind "ltx"); another kind is an error.
        steps: finetuning steps per image (>= 1).
        lr: finetuning learning rate.
        mode: objective target mode; None: the pretraining one. The target
            class is always the one explained (``target``).
        pretrained_only: pLTX, no finetuning (``steps`` unused).
        objective: finetuning settings of the objective in place of the
            pretraining ones (``lambda_mask``, ``lambda_inverse``,
            ``baseline``, ``mask_penalty``, ``kl_scope``, ``lambda_curve``, ``curve_areas``,
            ``curve_temperature``); None: the pretraining objective.
        batch_size: images finetuned (or explained) together.
    """

    name = "ltx"
    kind = "ltx"

    def __init__(self, f: Any = None, *, checkpoint: str, steps: int = 25, lr: float = 2e-3,
                 mode: str | None = None, pretrained_only: bool = False, batch_size: int = 16,
                 objective: dict | None = None, **options: Any):
        from explainer.finetune import check_lr, check_objective, check_steps

        self.pretrained_only = bool(pretrained_only)
        self.steps = None if self.pretrained_only else check_steps(steps)
        self.lr = check_lr(lr)
        self.mode = mode
        self.objective = check_objective(objective)
        super().__init__(f, checkpoint=checkpoint, batch_size=batch_size, **options)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.pretrained_only:
            return super()._attribute(x, target)
        from explainer.finetune import finetune

        self.module.to(x.device)
        return finetune(self.module, x, target, steps=self.steps, lr=self.lr, mode=self.mode,
                        batch_size=self.batch_size, objective=self.objective)


@register("pltx")
class PLTXMethod(LTXMethod):
    """pLTX: the pretrained LTX explainer without per-image finetuning (``get("ltx", pretrained_only=True)``)."""

    name = "pltx"

    def __init__(self, f: Any = None, *, checkpoint: str, **options: Any):
        options.pop("steps", None)
        options["pretrained_only"] = True
        super().__init__(f, checkpoint=checkpoint, **options)
