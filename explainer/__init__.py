"""explainer: trained explainers for image classifiers, the methods they are measured against, and their evaluation."""

import os as _os

_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from explainer import data, nets  # noqa: E402,F401
from explainer.explanandum import Explanandum, load_explanandum, save_explanandum  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Explanandum", "load_explanandum", "save_explanandum", "data", "nets"]
