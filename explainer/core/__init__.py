"""The bottom layer: the vocabulary every other module speaks, importing nothing of the project above it.

* :mod:`.images` -- the image contract (:func:`check_images`);
* :mod:`.targets` -- the target vocabulary (:func:`check_targets`, :func:`resolve_targets`,
  :func:`predicted_classes`: "None means the predicted top-1", once);
* :mod:`.masking` -- the masking rule ``m * x + (1 - m) * b`` and its named baselines;
* :mod:`.maps` -- min-max normalisation and resizing of maps;
* :mod:`.constants` -- the void label, ImageNet normalisation, the size multiple of encoder-decoders;
* :mod:`.models` -- architecture facts (:func:`is_vit`);
* :mod:`.registry` -- the one :class:`Registry` of methods, metrics and explainer kinds;
* :mod:`.io` -- atomic file writes; :mod:`.viz` -- PNG panels and overlays.
"""

from explainer.core.constants import IMAGENET_MEAN, IMAGENET_STD, SIZE_MULTIPLE, VOID, round_up_size
from explainer.core.images import check_images
from explainer.core.maps import minmax_normalize, upsample
from explainer.core.masking import BASELINES, apply_mask, baseline_image, blur, check_baseline
from explainer.core.models import is_vit
from explainer.core.registry import Registry
from explainer.core.targets import TargetLike, check_targets, predicted_classes, resolve_targets

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SIZE_MULTIPLE", "VOID", "round_up_size", "check_images",
           "minmax_normalize", "upsample", "BASELINES", "apply_mask", "baseline_image", "blur", "check_baseline",
           "is_vit", "Registry", "TargetLike", "check_targets", "predicted_classes", "resolve_targets"]
