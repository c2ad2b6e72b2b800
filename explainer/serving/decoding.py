"""Images in, masks out: a request's image bytes decoded by the project's one decoder (``explainer.data.images``)
with the server's guards, and masks encoded as PNG or ``.npy``."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import torch
from PIL import Image

from explainer.data.images import PNG_SIGNATURE, ImageError, read_image
from explainer.serving.schema import MASK_FORMATS, RequestError

IMAGE_FORMATS = ("JPEG", "PNG")
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """JPEG or PNG bytes -> float RGB (3, H, W) in [0, 1] (:func:`explainer.data.images.read_image`: the rules
    of ``explain`` and the datasets; EXIF orientation applied).

    Raises :class:`RequestError`: 422 for bytes that are not an image, a truncated or zero-size image; 415 for
    another image format; 413 for more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    try:
        return read_image(data, formats=IMAGE_FORMATS, max_pixels=max_pixels, limit_hint="--max-image-pixels")
    except ImageError as err:
        raise RequestError(err.status, err.message) from None


def encode_mask(mask: np.ndarray, fmt: str = "png", png_compress_level: int = 1) -> str:
    """Base64 of a (H, W) mask in [0, 1]: a PNG (uint8, round(255 m)) or a .npy (float16)."""
    if fmt == "png":
        q = np.rint(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8)
        # OpenCV's encoder with one filter (up) and run-length zlib: half the time of PIL's, smaller files
        ok, data = cv2.imencode(".png", q, [cv2.IMWRITE_PNG_COMPRESSION, png_compress_level,
                                            cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
                                            cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
        if not ok:
            raise RuntimeError("PNG encoding of a mask failed")
        return base64.b64encode(data).decode("ascii")
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, np.asarray(mask, dtype=np.float16), allow_pickle=False)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    raise ValueError(f"fmt: expected one of {list(MASK_FORMATS)}, got {fmt!r}")


def decode_mask(text: str) -> np.ndarray:
    """A served mask (base64 PNG or .npy) -> float32 (H, W) in [0, 1]: what a client does with the answer."""
    data = base64.b64decode(text)
    if data.startswith(PNG_SIGNATURE):
        return np.array(Image.open(io.BytesIO(data)), dtype=np.float32) / 255.0
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
