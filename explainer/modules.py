"""Former home of the LightningModules, kept so that configs naming ``explainer.modules.<Class>`` still load.

The classes live in :mod:`explainer.explainers` (trained explainers) and :mod:`explainer.classifier`.
"""

from explainer.classifier import ClassifierModule
from explainer.explainers import ExplainerModule, LTXModule, TrainedExplainer

AmortizedExplainerModule = TrainedExplainer  # its former name

__all__ = ["ClassifierModule", "AmortizedExplainerModule", "ExplainerModule", "LTXModule"]
