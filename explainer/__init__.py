"""explainer: trained explainers for image classifiers, the methods they are measured against, and their evaluation.

>>> import explainer
>>> f = explainer.load_explanandum("checkpoints/synthetic_classifier.safetensors")
>>> e = explainer.load("checkpoints/synthetic_explainer.safetensors")
>>> masks = e.explain(x)                                   # (B, C, H, W), one forward pass
>>> maps = explainer.methods.get("gradcam", f).attribute(x, target=None)

Layers, each importing only those below it (checked by import-linter, see docs/ARCHITECTURE.md):
``cli`` -> ``pipelines`` -> ``explainers`` -> ``methods`` | ``metrics`` | ``classifier`` -> ``explanandum`` |
``losses`` -> ``data`` | ``nets`` -> ``core``.
"""

import os as _os

_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from explainer import core, data, explainers, methods, metrics, nets  # noqa: E402,F401,I001
from explainer.explainers import load  # noqa: E402
from explainer.core.constants import VERSION  # noqa: E402
from explainer.explanandum import Explanandum, load_explanandum, save_explanandum  # noqa: E402

__version__ = VERSION
__all__ = ["Explanandum", "load_explanandum", "save_explanandum", "load", "core", "data", "nets", "methods",
           "metrics", "explainers"]
