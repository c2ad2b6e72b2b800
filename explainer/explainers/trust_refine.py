"""Trust and selective refinement inside :meth:`ExplainsImages.explanation` (``trust=True``, ``refine=r``).

The masks of lowest trust (a fraction ``r`` of all masks in the call, ties to the earlier mask) are refined by
per-image finetuning (:func:`explainer.explainers.refine.refine_masks`) and scored again; the others are kept as
the one forward pass gave them. ``refine=1.0`` is plain per-image finetuning of every mask.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from explainer.explainers.trust import CamPass, mask_rows, trust_of, trust_signals


def lowest_trust(trust: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``ceil(fraction * P)`` masks of lowest trust (a stable sort: ties to the earlier mask)."""
    n = min(len(trust), math.ceil(fraction * len(trust) - 1e-9))
    return torch.argsort(trust, stable=True)[:n]


def trusted_masks(explainer: Any, xs: torch.Tensor, chosen: list[torch.Tensor], masks: list[torch.Tensor],
                  probabilities: torch.Tensor, refine: float = 0.0, cam: CamPass | None = None
                  ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The masks (refined where their trust is lowest, when ``refine`` > 0) and per-mask fields ``trust``,
    ``keep``, ``remove``, ``refined``, each (P,) in mask order. ``cam``: the classifier pass on ``xs`` kept
    for Grad-CAM (:func:`explainer.explainers.trust.cam_pass`)."""
    model = getattr(explainer, "trust_model", None)
    needs = {"features": model.features if model is not None else ()}
    signals = trust_signals(explainer, xs, chosen, masks, probabilities, cam=cam, **needs)
    del cam  # the graph it holds is not needed any more
    trust = trust_of(explainer, signals)
    refined = torch.zeros(len(trust), dtype=torch.bool)
    if refine > 0 and len(trust):
        from explainer.explainers.refine import refine_masks  # per-image finetuning: torch.func, LTX's terms

        module = explainer
        if not hasattr(module, "net"):
            raise ValueError(f"refine: {type(explainer).__name__} has no trained network to finetune per image; "
                             "expected a trained explainer (explainer.load of a checkpoint)")
        pick = lowest_trust(trust, refine)
        rows, cls = mask_rows(chosen)
        flat = torch.cat([m.to(xs.device) for m in masks])
        new = refine_masks(module, xs[rows[pick]].to(module.device), cls[pick].to(module.device))
        flat[pick.to(flat.device)] = new[:, 0].to(flat.device, flat.dtype)
        masks = list(torch.split(flat, [len(c) for c in chosen]))
        # the refined masks scored again, one image at a time, with only those masks
        sub_chosen = [cls[pick][k:k + 1] for k in range(len(pick))]
        again = trust_signals(explainer, xs[rows[pick]], sub_chosen, [m[None] for m in flat[pick]],
                              probabilities[rows[pick]], **needs)
        for k, v in again.items():
            signals[k][pick] = v
        trust[pick] = trust_of(explainer, again)
        refined[pick] = True
    return masks, {"trust": trust, "keep": signals["keep"], "remove": signals["remove"], "refined": refined}
