"""LightningModules: the science of training (the Trainer holds the engineering)."""

from explainer.modules.classifier import ClassifierModule
from explainer.modules.explainer import AmortizedExplainerModule, ExplainerModule
from explainer.modules.ltx import LTXModule

__all__ = ["ClassifierModule", "AmortizedExplainerModule", "ExplainerModule", "LTXModule"]
