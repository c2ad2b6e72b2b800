"""Every attribution method behind one interface.

>>> import explainer
>>> f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=4)
>>> m = explainer.methods.get("gradcam", f)          # options as keywords: get("iia", f, steps=5)
>>> maps = m.attribute(x, target=None)               # (B, 1, H, W) on x's device; None = predicted top-1

``available()`` lists the names; ``register(name)`` adds a :class:`Method` subclass (or a factory
``(f, **options) -> Method``). Modules: :mod:`.cam` (gradcam, gradcam++), :mod:`.gradient` (saliency,
integrated_gradients), :mod:`.perturbation` (rise, occlusion), :mod:`.extremal` (extremal_perturbation),
:mod:`.inr_extremal` (inr_extremal_perturbation, :func:`multiple_masks`), :mod:`.dix`, :mod:`.iia`,
:mod:`.ensemble` (the weighted mean of other methods' normalised maps). The trained
explainers register "trained" (alias "explainer"), "distill", "ltx" and "pltx" from
:mod:`explainer.explainers.methods`.
"""

from __future__ import annotations

from explainer.core.targets import resolve_targets
from explainer.methods import cam, dix, ensemble, extremal, gradient, iia, inr_extremal, perturbation
from explainer.methods.base import (
    Method,
    available,
    default_layers,
    find_layer,
    forward_hooks,
    get,
    register,
)
from explainer.methods.extremal import achieved_area, extremal_perturbation
from explainer.methods.inr_extremal import multiple_masks

__all__ = ["Method", "available", "get", "register", "resolve_targets", "find_layer", "default_layers",
           "forward_hooks", "extremal_perturbation", "achieved_area", "multiple_masks",
           "cam", "dix", "ensemble", "extremal", "gradient", "iia", "inr_extremal", "perturbation"]
