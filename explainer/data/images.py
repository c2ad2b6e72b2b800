"""The one image decoder: a file or its bytes -> RGB, by one set of rules for the datasets, ``explain`` and ``serve``.

The rules (:func:`to_float_rgb`; :func:`read_rgb` is the same rule rounded to uint8 for the datasets):

* 8-bit images (RGB, greyscale ``L``, palette ``P``, CMYK, YCbCr...) are converted to RGB by Pillow and
  divided by 255.
* High bit depth greyscale (Pillow modes ``I;16*``, ``I``) is divided by its white level (:func:`white_level`:
  ``2**16 - 1`` for PNG and PGM/PPM, ``2**bits - 1`` from a TIFF's BitsPerSample, ``2**(bits - 1) - 1`` for
  signed samples), kept at full precision in float; values outside [0, white level] are refused, never clipped.
  Pillow reads 16-bit-per-channel RGB, RGBA and grey+alpha PNGs as their high byte, ``floor(v / 256)``.
* 32-bit float greyscale (``F``) must hold values in [0, 1] and is kept as it is; other ranges are refused, as
  their scale is unknown.
* Transparency (an alpha band: RGBA, LA, PA; a palette or colour-key ``transparency`` entry) is composited on
  :data:`ALPHA_BACKGROUND`, white: ``round((c * a + 255 * (255 - a)) / 255)`` per 8-bit channel, ``a`` the
  alpha in [0, 255]; a colour-keyed high-bit grey pixel becomes white.
* EXIF orientation is applied by :func:`read_image` (what a viewer shows, as ``explain`` and ``serve`` answer)
  and not by :func:`read_rgb`: datasets' annotations are aligned with the pixels as stored.

Errors are :class:`ImageError` (a ``ValueError``) naming the file and what was expected; its ``status`` is
the HTTP status the server answers with.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ALPHA_BACKGROUND = (255, 255, 255)  # what transparent pixels show: white, as image viewers and browsers do
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


class ImageError(ValueError):
    """An image that cannot be used. ``status``: what the server answers it with (422 not an image, corrupt,
    truncated, zero-size or values out of range; 415 a format or pixel mode that is not accepted; 413 too many
    pixels)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = int(status)
        self.message = message


def composite_alpha(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 over ALPHA_BACKGROUND with ``alpha`` (H, W) uint8, rounded to nearest."""
    a = alpha.astype(np.uint32)[..., None]
    bg = np.asarray(ALPHA_BACKGROUND, np.uint32)
    return ((rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


def white_level(im: Image.Image, path: Path | str) -> tuple[int, int]:
    """(bits per sample, largest value) of a greyscale image Pillow holds in 16 or 32 bits (``path`` names the
    image in errors)."""
    tags = getattr(im, "tag_v2", {}) if im.format == "TIFF" else {}
    if 258 in tags:  # BitsPerSample, SampleFormat (2: signed integers)
        bits = int(tags[258][0] if isinstance(tags[258], tuple) else tags[258])
        signed = (tags.get(339, 1)[0] if isinstance(tags.get(339), tuple) else tags.get(339, 1)) == 2
        return bits, 2 ** (bits - signed) - 1
    if im.mode.startswith("I;16") or im.format in ("PNG", "PPM"):  # Pillow scales PGM/PPM samples to 16 bits
        return 16, 2 ** 16 - 1
    raise ImageError(f"image: {str(path)!r} is {im.format} greyscale in Pillow mode {im.mode} of unknown bit "
                     "depth; convert it to an 8- or 16-bit PNG", 415)


def _unit_grey(im: Image.Image, name: str) -> np.ndarray | None:
    """float64 (H, W) in [0, 1] of a high-bit or float greyscale image (colour key composited); None for others."""
    if not (im.mode == "F" or im.mode.startswith("I")):
        return None
    v = np.asarray(im)
    if im.mode == "F":
        if not np.isfinite(v).all() or v.min() < 0 or v.max() > 1:
            raise ImageError(f"image: {name!r} is floating-point greyscale with values in [{v.min()}, {v.max()}]; "
                             "expected values in [0, 1]")
        grey = v.astype(np.float64)
    else:
        bits, top = white_level(im, name)
        if v.min() < 0 or v.max() > top:
            raise ImageError(f"image: {name!r} has {bits}-bit greyscale values in [{v.min()}, {v.max()}], "
                             f"expected [0, {top}]")
        grey = v.astype(np.float64) / top
    key = im.info.get("transparency")
    if isinstance(key, int):  # a colour-key (tRNS) grey value: transparent, so white
        grey = np.where(v == key, 1.0, grey)
    return grey


def _rgb8(im: Image.Image, name: str) -> np.ndarray:
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))
        return composite_alpha(rgba[..., :3], rgba[..., 3])
    try:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except ValueError as err:
        raise ImageError(f"image: {name!r} has Pillow mode {im.mode}, which cannot be converted to RGB", 415) from err


def to_float_rgb(im: Image.Image, name: str = "image") -> torch.Tensor:
    """A loaded PIL image -> float32 RGB (3, H, W) in [0, 1], by the rules of the module docstring."""
    grey = _unit_grey(im, name)
    if grey is not None:
        return torch.from_numpy(np.repeat(grey.astype(np.float32)[None], 3, axis=0))
    a = _rgb8(im, name).astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(a))


def to_rgb8(im: Image.Image, name: str = "image") -> np.ndarray:
    """The rule of :func:`to_float_rgb` rounded to uint8 (H, W, 3): ``round(255 * value)``."""
    grey = _unit_grey(im, name)
    if grey is None:
        return _rgb8(im, name)
    return np.repeat(np.floor(grey * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, None for other bytes."""
    if data.startswith(PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


def _kind(data: bytes, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "PNG" if data.startswith(PNG_SIGNATURE) else "JPEG" if data.startswith(b"\xff\xd8\xff") else "image"


def _corrupt(what: str, fmt: str, err: Exception) -> ImageError:
    if "truncat" in str(err).lower():
        return ImageError(f"image: {what}truncated {fmt} (the data ends before the image does: {err}); "
                          "expected the complete file's bytes")
    return ImageError(f"image: {what}corrupt {fmt} data ({type(err).__name__}: {err})")


def _too_many(pixels: int, max_pixels: int, dims: str, limit_hint: str) -> ImageError:
    hint = f" ({limit_hint})" if limit_hint else ""
    return ImageError(f"image: {dims}{pixels} pixels, over the limit of {max_pixels}{hint}", 413)


def open_image(source: bytes | str | os.PathLike, *, formats: Sequence[str] | None = None,
               max_pixels: int | None = None, limit_hint: str = "", orient: bool = True) -> Image.Image:
    """Open, check and load an image from its bytes or a file; :class:`ImageError` (or FileNotFoundError) if not.

    ``formats``: the accepted Pillow formats (None: any); ``max_pixels``: refused above it (413, checked from the
    header before decoding; ``limit_hint`` names the setting in the message); ``orient``: apply EXIF orientation.
    """
    data = source if isinstance(source, (bytes, bytearray)) else None
    what = "" if data is not None else f"{str(source)!r} is not a readable image: a "
    if data is None and not Path(source).is_file():
        raise FileNotFoundError(f"image: no such file {str(source)!r}")
    if data is not None and not data:
        raise ImageError("image: zero-size (0 bytes); expected the bytes of a JPEG or PNG file")
    with open(source, "rb") if data is None else io.BytesIO(data) as stream:
        head = stream.read(16)  # what the bytes look like, for the messages
    dims = png_size(data) if data is not None else None
    if dims is not None and 0 in dims:
        raise ImageError(f"image: zero-size PNG ({dims[0]}x{dims[1]} pixels)")
    if dims is not None and max_pixels is not None and dims[0] * dims[1] > max_pixels:
        raise _too_many(dims[0] * dims[1], max_pixels, f"{dims[0]}x{dims[1]} = ", limit_hint)
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # checked below, by our own limit
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data) if data is not None else source)
    except UnidentifiedImageError:
        if data is None:
            raise ImageError(f"image: {str(source)!r} is not a readable image (not an image format Pillow "
                             "knows, or an empty file)") from None
        raise ImageError(f"image: not an image ({len(data)} bytes that are neither JPEG nor PNG, starting "
                         f"{data[:8]!r}); expected the bytes of a JPEG or PNG file") from None
    except Image.DecompressionBombError as err:  # over Pillow's own limit: report it as ours
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = int(found.group(1)) if found else Image.MAX_IMAGE_PIXELS
        limit = max_pixels if max_pixels is not None else int(2 * (Image.MAX_IMAGE_PIXELS or 0))
        raise _too_many(pixels, limit, "", limit_hint) from None
    except _DECODE_ERRORS as err:
        raise _corrupt(what, _kind(head, None), err) from None
    try:
        if formats is not None and im.format not in formats:
            raise ImageError(f"image: expected {' or '.join(formats)}, got {im.format}", 415)
        w, h = im.size
        if w == 0 or h == 0:
            raise ImageError(f"image: {what}zero-size {im.format} ({w}x{h} pixels)")
        if max_pixels is not None and w * h > max_pixels:
            raise _too_many(w * h, max_pixels, f"{w}x{h} = ", limit_hint)
        try:
            im.load()
            return ImageOps.exif_transpose(im) if orient else im
        except (*_DECODE_ERRORS, Image.DecompressionBombError) as err:
            raise _corrupt(what, _kind(head, im.format), err) from None
    except BaseException:
        im.close()
        raise


def read_image(source: bytes | str | os.PathLike, **options) -> torch.Tensor:
    """Float RGB (3, H, W) in [0, 1] of an image file or its bytes, EXIF orientation applied (what ``explain``
    and ``serve`` feed the explainer); ``options`` as for :func:`open_image`."""
    with open_image(source, **options) as im:
        return to_float_rgb(im, "image" if isinstance(source, (bytes, bytearray)) else str(source))


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) of an image file, as stored (no EXIF orientation; what the datasets read):
    the rules of the module docstring, rounded to uint8. A clear error for a missing, corrupt or unconvertible
    file."""
    with open_image(path, orient=False) as im:
        return to_rgb8(im, str(path))
