"""LightningModules: the science of training (the Trainer holds the engineering)."""

from explainer.modules.classifier import ClassifierModule

__all__ = ["ClassifierModule"]
