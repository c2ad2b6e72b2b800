"""Constants every layer shares: the void label, the ImageNet normalisation, the size networks take."""

from __future__ import annotations

import math

#: the package version (explainer.__version__)
VERSION = "0.1.0"

#: label of pixels whose class is unknown (VOC's boundary band, images without segmentation); ignored by metrics
VOID = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: encoder-decoder networks (5 down-samplings) take sides that are multiples of this
SIZE_MULTIPLE = 32


def round_up_size(h: int, w: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """``(h, w)`` rounded up to multiples of ``multiple`` (at least one multiple each)."""
    return max(multiple, math.ceil(h / multiple) * multiple), max(multiple, math.ceil(w / multiple) * multiple)
