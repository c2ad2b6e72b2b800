"""Networks: the project's small classifiers (registered with timm) and mask networks."""

from explainer.nets import classifier  # noqa: F401  (registers timm models)
from explainer.nets.backbone import BackboneMaskNet  # noqa: E402
from explainer.nets.segmentation import build_segmentation_net, init_encoder_from  # noqa: E402

__all__ = ["BackboneMaskNet", "build_segmentation_net", "init_encoder_from"]
