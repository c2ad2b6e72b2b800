"""Trained explainers: one file per kind, each registered by name, sharing :class:`TrainedExplainer`.

* :mod:`.base` -- :class:`TrainedExplainer` (explanandum, ``explain()``, checkpoint metadata, optimiser and
  schedule) and the kind registry (:data:`KINDS`, :func:`register_kind`);
* :mod:`.explainer` -- the Explainer (Stalder et al., 2022), kind ``"explainer"``;
* :mod:`.ltx` -- LTX (Barkan et al., 2023), kind ``"ltx"``, with its per-image finetuning;
* :mod:`.distill` -- a student distilled from any method's maps, kind ``"distill"`` (:mod:`.cache`: the maps);
* :mod:`.loading` -- :func:`load` of any kind; :mod:`.export` -- safetensors and ONNX exports;
* :mod:`.methods` -- the registered methods "explainer", "ltx", "pltx".

A new kind is one file here: a ``@register_kind("name")`` subclass of :class:`TrainedExplainer` that builds
``self.net`` and implements ``compute_losses``, imported below.
"""

from explainer.explainers import distill as _distill  # noqa: F401  (registers the kinds and methods)
from explainer.explainers import explainer as _explainer  # noqa: F401
from explainer.explainers import ltx as _ltx  # noqa: F401
from explainer.explainers import methods as _methods  # noqa: F401
from explainer.explainers.base import KINDS, TrainedExplainer, fingerprint, register_kind
from explainer.explainers.distill import DistillModule
from explainer.explainers.explainer import ExplainerModule
from explainer.explainers.export import export, export_onnx, export_safetensors
from explainer.explainers.loading import load, read_meta
from explainer.explainers.ltx import LTXModule, finetune, finetune_loop

__all__ = ["KINDS", "TrainedExplainer", "fingerprint", "register_kind", "ExplainerModule", "LTXModule",
           "DistillModule", "load",
           "read_meta", "export", "export_onnx", "export_safetensors", "finetune", "finetune_loop"]
