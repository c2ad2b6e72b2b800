"""The amortized explainers behind the methods interface: "explainer" (and "ltx", registered by LTX).

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
