"""Serve explanations over HTTP: a batched LitServe endpoint.

    python -m explainer serve --checkpoint checkpoints/synthetic_explainer.safetensors --port 8000

``POST /predict`` answers masks for one image (JSON or multipart), ``GET /health``
is 200 once the model is loaded, ``GET /info`` describes the model and counts the
batches served. The request and response schema, the status codes of bad
requests and a ``curl`` example are in docs/SERVING.md.

Where the work happens. LitServe answers HTTP in API-server processes and runs the
model in inference-worker processes; between them it collects requests into
batches (``--max-batch-size``, ``--batch-timeout``):

* API server, :class:`BodyGuard`: body size, content type, JSON syntax; a
  multipart upload is rewritten as the equivalent JSON body.
* worker, per request (``decode_request``): the fields are checked
  (:func:`parse_request`), the image decoded with PIL into float RGB in [0, 1]
  (:func:`decode_image`) and resized to the explainer's input size.
* worker, per batch (``predict``): one forward pass of the explainer and of the
  classifier, torch or ONNX Runtime.
* worker, per request (``encode_response``): the requested masks resized back to
  the image's own size and encoded as PNG or ``.npy`` (:func:`build_response`).

A bad request never fails the other requests of its batch: ``decode_request``
returns a :class:`Rejected` marker that ``predict`` skips and
``encode_response`` turns into the 4xx answer. Every check is a plain function
of this module, testable without a server. Nothing in a request is ever used as
a file path.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import litserve as ls
import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from explainer.core.constants import VERSION
from explainer.data.base import composite_alpha, white_level
from explainer.explainers.export import export_onnx
from explainer.explainers.loading import load

logger = logging.getLogger(__name__)

FIELDS = ("image", "classes", "top_k", "format")
MASK_FORMATS = ("png", "npy")
IMAGE_FORMATS = ("JPEG", "PNG")
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RequestError(Exception):
    """A request the server cannot answer: an HTTP status (4xx) and a message saying what was expected."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass(frozen=True)
class ExplainRequest:
    """A checked request: the image's bytes, the classes asked for (indices) or top_k, the mask format."""

    image: bytes
    classes: tuple[int, ...] | None
    top_k: int | None
    format: str


@dataclass
class Decoded:
    """One request ready for the batched forward pass: the image at the input size and its own size."""

    x: torch.Tensor  # (3, S, S) float RGB in [0, 1]
    size: tuple[int, int]  # (H, W) of the image as sent
    classes: tuple[int, ...] | None
    top_k: int | None
    format: str


@dataclass
class Explained:
    """One request's share of a batch: probabilities of all classes, masks (at the input size) of the chosen ones."""

    size: tuple[int, int]
    probabilities: np.ndarray  # (C,)
    selected: list[int]
    masks: torch.Tensor  # (K, S, S) in [0, 1]
    format: str


@dataclass
class Rejected:
    """A request refused while decoding: answered with ``status`` and ``message``, skipped by the model."""

    status: int
    message: str


# ---------------------------------------------------------------- the request body --
def body_kind(content_type: str | None) -> str:
    """'json' or 'multipart' from a Content-Type header (none means JSON); 415 otherwise."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in ("", "application/json") or (media.startswith("application/") and media.endswith("+json")):
        return "json"
    if media == "multipart/form-data":
        return "multipart"
    hint = " (curl: add -H 'Content-Type: application/json')" if media == "application/x-www-form-urlencoded" else ""
    raise RequestError(415, f"Content-Type: expected application/json or multipart/form-data, got {media!r}{hint}")


def check_json_body(body: bytes) -> dict:
    """The JSON object of a request body; 400 for anything else (bad JSON, an array, a number...)."""
    if not body:
        raise RequestError(400, "request body: empty; expected a JSON object such as "
                                '{"image": "<base64 of JPEG or PNG bytes>"}')
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"request body: not valid JSON ({err}); expected a JSON object such as "
                                '{"image": "<base64 of JPEG or PNG bytes>"}') from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"request body: expected a JSON object with the fields {list(FIELDS)}, "
                                f"got a JSON {type(payload).__name__}")
    return payload


def _form_text(name: str, value: str | bytes) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, f"{name}: expected text, got binary data") from None
    return value


def _form_item(text: str) -> int | str:
    text = text.strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else text


def form_to_payload(fields: Sequence[tuple[str, str | bytes]]) -> dict:
    """The JSON payload equivalent to the fields of a multipart upload.

    ``image`` is a file part (its bytes) or text (base64). ``classes`` may be
    repeated, comma-separated or a JSON list; decimal integers are class
    indices. ``top_k`` is an integer in text. Other fields are passed on as
    text (:func:`parse_request` rejects unknown ones).
    """
    payload: dict[str, Any] = {}
    classes: list[int | str] | None = None
    for name, value in fields:
        if name == "classes":
            text = _form_text(name, value).strip()
            if text.startswith("["):
                try:
                    items = json.loads(text)
                except json.JSONDecodeError as err:
                    raise RequestError(400, f"classes: not a valid JSON list ({err})") from None
                if not isinstance(items, list):
                    raise RequestError(400, f"classes: expected a list, got {type(items).__name__}")
            else:
                items = [_form_item(t) for t in text.split(",") if t.strip()]
            classes = (classes or []) + items
            continue
        if name in payload:
            raise RequestError(400, f"{name}: given more than once in the form")
        if name == "image":
            payload[name] = base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value
        elif name == "top_k":
            payload[name] = _form_item(_form_text(name, value))
        else:
            payload[name] = _form_text(name, value)
    if classes is not None:
        payload["classes"] = classes
    return payload


class BodyGuard:
    """ASGI middleware in front of ``POST path``: size limit, content type, JSON syntax, multipart -> JSON.

    LitServe parses the body itself and answers 500 to bad JSON or a broken
    multipart body; this guard answers those with a 4xx that says what was
    expected, and hands LitServe a JSON object only.
    """

    def __init__(self, app, path: str = "/predict", max_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app = app
        self.path = path
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            kind = body_kind(headers.get("content-type"))
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise RequestError(413, f"request body: {int(declared)} bytes, over the limit of {self.max_bytes} "
                                        "bytes (--max-request-bytes)")
            body = await self._read(receive)
            if body is None:  # the client went away
                return
            if kind == "json":
                check_json_body(body)
            else:
                body = json.dumps(await self._form_payload(scope, body)).encode()
                kept = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
                scope = dict(scope, headers=kept + [(b"content-type", b"application/json"),
                                                    (b"content-length", str(len(body)).encode())])
        except RequestError as err:
            await JSONResponse({"detail": err.message}, status_code=err.status)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes | None:
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                raise RequestError(413, f"request body: over the limit of {self.max_bytes} bytes "
                                        "(--max-request-bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _form_payload(self, scope, body: bytes) -> dict:
        request = Request(scope, _replay(body, None))
        try:
            form = await request.form(max_files=8, max_fields=64, max_part_size=self.max_bytes)
        except HTTPException as err:
            raise RequestError(400, f"request body: malformed multipart/form-data ({err.detail})") from None
        except (MultiPartException, ValueError, AssertionError) as err:
            raise RequestError(400, f"request body: malformed multipart/form-data ({err})") from None
        try:
            fields = []
            for name, value in form.multi_items():
                fields.append((name, await value.read() if isinstance(value, UploadFile) else value))
        finally:
            await form.close()
        return form_to_payload(fields)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replay


# ------------------------------------------------------------------- the fields --
def decode_base64(text: str) -> bytes:
    """Bytes of a base64 string (standard alphabet; line breaks and a ``data:...;base64,`` prefix allowed)."""
    if text.startswith("data:") and ";base64," in text[:100]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"image: expected base64 of the JPEG or PNG bytes, got a string that is not "
                                f"valid base64 ({err})") from None


def resolve_classes(classes: Any, class_names: Sequence[str]) -> tuple[int, ...]:
    """Class indices of a list of names and/or indices, in order, without repeats."""
    C = len(class_names)
    expected = f"one of {list(class_names)} or an index 0..{C - 1}"
    if not isinstance(classes, list):
        raise RequestError(400, f"classes: expected a list of class names or indices ({expected}), "
                                f"got {type(classes).__name__}")
    if not classes:
        raise RequestError(400, "classes: expected at least one class name or index, got an empty list "
                                "(leave classes out for all classes)")
    out: list[int] = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, str)):
            raise RequestError(400, f"classes: expected class names (strings) or indices (integers), "
                                    f"got {c!r} ({type(c).__name__})")
        if isinstance(c, int):
            if not 0 <= c < C:
                raise RequestError(422, f"classes: index {c} out of range; expected {expected}")
            i = c
        elif c in class_names:
            i = list(class_names).index(c)
        else:
            raise RequestError(422, f"classes: unknown class {c!r}; expected {expected}")
        if i not in out:
            out.append(i)
    return tuple(out)


def parse_request(payload: Any, class_names: Sequence[str]) -> ExplainRequest:
    """Check the fields of a request (the JSON object) and decode its base64 image bytes.

    Raises :class:`RequestError`: 400 for a malformed body (missing image,
    wrong types, classes and top_k both given, unknown format or field), 422
    for an unknown class or an out-of-range index or top_k.
    """
    if not isinstance(payload, dict):
        raise RequestError(400, f"request body: expected a JSON object with the fields {list(FIELDS)}, "
                                f"got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"request body: unknown field(s) {unknown}; expected image (required), "
                                "classes, top_k, format")
    image = payload.get("image")
    if image is None:
        raise RequestError(400, "image: missing; expected base64 of the JPEG or PNG bytes")
    if not isinstance(image, str):
        raise RequestError(400, f"image: expected a string (base64 of the JPEG or PNG bytes), "
                                f"got {type(image).__name__}")
    classes, top_k = payload.get("classes"), payload.get("top_k")
    if classes is not None and top_k is not None:
        raise RequestError(400, "classes, top_k: give one of them, not both (classes picks the classes, "
                                "top_k the k most probable)")
    fmt = payload.get("format")
    fmt = "png" if fmt is None else fmt
    if fmt not in MASK_FORMATS:
        raise RequestError(400, f"format: expected one of {list(MASK_FORMATS)}, got {fmt!r}")
    index = None if classes is None else resolve_classes(classes, class_names)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise RequestError(400, f"top_k: expected an integer, got {top_k!r} ({type(top_k).__name__})")
        if not 1 <= top_k <= len(class_names):
            raise RequestError(422, f"top_k: expected 1..{len(class_names)} (the number of classes), got {top_k}")
    return ExplainRequest(decode_base64(image), index, top_k, fmt)


# -------------------------------------------------------------------- the image --
def _png_size(data: bytes) -> tuple[int, int] | None:
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


def _sniff(data: bytes) -> str:
    return "PNG" if data.startswith(_PNG_SIGNATURE) else "JPEG" if data.startswith(b"\xff\xd8\xff") else "image"


def _corrupt(fmt: str, err: Exception) -> RequestError:
    if "truncat" in str(err).lower():
        return RequestError(422, f"image: truncated {fmt} (the data ends before the image does: {err}); "
                                 "expected the complete file's bytes")
    return RequestError(422, f"image: corrupt {fmt} data ({type(err).__name__}: {err})")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """JPEG or PNG bytes -> float RGB (3, H, W) in [0, 1].

    Greyscale and palette images become RGB, 16-bit greyscale is scaled by
    1/65535, transparent pixels are composited on white, EXIF orientation is
    applied. Raises :class:`RequestError`: 422 for bytes that are not an image,
    a truncated or zero-size image; 415 for another image format; 413 for more
    than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    if not data:
        raise RequestError(422, "image: zero-size (0 bytes); expected the bytes of a JPEG or PNG file")
    dims = _png_size(data)
    if dims is not None and 0 in dims:
        raise RequestError(422, f"image: zero-size PNG ({dims[0]}x{dims[1]} pixels)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RequestError(422, f"image: not an image ({len(data)} bytes that are neither JPEG nor PNG, "
                                f"starting {data[:8]!r}); expected the bytes of a JPEG or PNG file") from None
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"image: too many pixels ({err})") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as err:
        raise _corrupt(_sniff(data), err) from None
    if img.format not in IMAGE_FORMATS:
        raise RequestError(415, f"image: expected JPEG or PNG, got {img.format}")
    w, h = img.size
    if w == 0 or h == 0:
        raise RequestError(422, f"image: zero-size {img.format} ({w}x{h} pixels)")
    if w * h > max_pixels:
        raise RequestError(413, f"image: {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                                "(--max-image-pixels)")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as err:
        raise _corrupt(img.format, err) from None
    return to_float_rgb(img)


def to_float_rgb(img: Image.Image) -> torch.Tensor:
    """A decoded PIL image -> float RGB (3, H, W) in [0, 1], by the dataset readers' rules
    (:func:`explainer.data.base.read_rgb`): high-bit greyscale scaled by its bit depth (kept in float here),
    transparency composited on white."""
    # numpy, not torch: one small image is faster without torch's intra-op threads
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        v = np.asarray(img)
        try:
            bits, top = white_level(img, "image")
        except ValueError as err:
            raise RequestError(415, str(err)) from None
        if v.min() < 0 or v.max() > top:
            raise RequestError(422, f"image: {bits}-bit greyscale values in [{v.min()}, {v.max()}], expected "
                                    f"[0, {top}]")
        a = v.astype(np.float32) / np.float32(top)
        return torch.from_numpy(np.repeat(a[None], 3, axis=0))
    if img.mode == "F":
        raise RequestError(415, "image: floating-point pixels are not supported; expected 8-bit or 16-bit images")
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))
        rgb = composite_alpha(rgba[..., :3], rgba[..., 3])
    else:
        rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    a = rgb.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(a))


def to_input_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (3, size, size): bilinear, antialiased when shrinking; unchanged at that size."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp_(0, 1)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, S, S) -> (K, H, W): the masks back at the image's own size (as :func:`to_input_size`)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[None].float(), size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp_(0, 1)


# ------------------------------------------------------------------ the response --
def select_classes(probabilities: np.ndarray, classes: Sequence[int] | None, top_k: int | None) -> list[int]:
    """The classes to answer: those asked for, the top_k most probable (ties by index), or all."""
    if classes is not None:
        return list(classes)
    if top_k is not None:
        return [int(i) for i in np.argsort(-np.asarray(probabilities), kind="stable")[:top_k]]
    return list(range(len(probabilities)))


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
    if data.startswith(_PNG_SIGNATURE):
        return np.array(Image.open(io.BytesIO(data)), dtype=np.float32) / 255.0
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)


def build_response(out: Explained, class_names: Sequence[str], png_compress_level: int = 1) -> dict:
    """The JSON answer: size, every class's probability, and one entry per requested mask."""
    full = resize_masks(out.masks, out.size).numpy()
    masks = [{"class": class_names[c], "index": int(c), "area": float(m.mean()),
              "mask": encode_mask(m, out.format, png_compress_level)} for c, m in zip(out.selected, full)]
    return {"size": [int(out.size[0]), int(out.size[1])],
            "probabilities": {n: float(p) for n, p in zip(class_names, out.probabilities)},
            "masks": masks}


def batch_stats(counts: Sequence[int]) -> dict:
    """Counts of forward passes by batch size (``counts[n]`` = passes of n images) as /info reports them."""
    hist = {str(n): int(c) for n, c in enumerate(counts) if c}
    return {"forward_passes": int(sum(counts)), "images": int(sum(n * c for n, c in enumerate(counts))),
            "largest": max((n for n, c in enumerate(counts) if c), default=0), "by_size": hist}


# ------------------------------------------------------------------ the LitAPI --
class _Probabilities(torch.nn.Module):
    """x in [0, 1] -> the classifier's probabilities: the graph exported for the ONNX backend."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f.probabilities(self.f(x))


def onnx_graphs(module, size: int) -> tuple[bytes, bytes]:
    """ONNX bytes of the all-class masks (``explainer.explainers.export``) and of the classifier's probabilities."""
    f = module.explanandum
    with tempfile.TemporaryDirectory(prefix="explainer-serve-") as tmp:
        masks = export_onnx(module, Path(tmp) / "masks.onnx", input_size=size).read_bytes()
        with f.unchecked():  # the range check is data-dependent; inputs come from decode_image
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(_Probabilities(f).eval(), (torch.rand(2, 3, size, size),),
                              str(Path(tmp) / "probabilities.onnx"), input_names=["images"],
                              output_names=["probabilities"], dynamic_shapes={"x": {0: batch}}, opset_version=18,
                              dynamo=True, external_data=False, verbose=False)
        probabilities = (Path(tmp) / "probabilities.onnx").read_bytes()
    return masks, probabilities


class ExplanationAPI(ls.LitAPI):
    """LitServe API of an amortized explainer: one image per request, batched forward passes.

    Args:
        checkpoint: explainer ``.ckpt`` or ``.safetensors`` export (loaded by each worker).
        info: what ``/info`` reports (classes, input_size, ...); ``build_server`` fills it.
        backend: "torch" (``explain()``) or "onnx" (ONNX Runtime on ``graphs``).
        graphs: ONNX bytes of masks and probabilities (backend "onnx").
        explanandum: override of the classifier spec recorded in the checkpoint.
        max_image_pixels: larger images are refused (413).
        png_compress_level: zlib level of PNG masks (0-9; 1 is fast).
        threads: torch / ONNX Runtime threads per worker (None: the library default).
        max_batch_size, batch_timeout: LitServe's dynamic batching.
    """

    def __init__(self, checkpoint: str, info: dict, backend: str = "torch", graphs: tuple[bytes, bytes] | None = None,
                 explanandum: str | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 png_compress_level: int = 1, threads: int | None = None, max_batch_size: int = 32,
                 batch_timeout: float = 0.01):
        with warnings.catch_warnings():  # batch/unbatch are unused, and harmless, without batching
            warnings.filterwarnings("ignore", message=".*both batch and unbatch.*")
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend: expected 'torch' or 'onnx', got {backend!r}")
        if backend == "onnx" and graphs is None:
            raise ValueError("graphs: the onnx backend needs the ONNX bytes of masks and probabilities")
        if not 0 <= png_compress_level <= 9:
            raise ValueError(f"png_compress_level: expected 0..9, got {png_compress_level}")
        self.checkpoint = str(checkpoint)
        self.info = dict(info)
        self.class_names = list(info["classes"])
        self.input_size = int(info["input_size"])
        self.backend = backend
        self.graphs = graphs
        self.explanandum_spec = explanandum
        self.max_image_pixels = int(max_image_pixels)
        self.png_compress_level = int(png_compress_level)
        self.threads = threads
        # forward passes by batch size, shared by the workers and the API servers (/info)
        self.batch_counts = mp.get_context("spawn").Array("q", max_batch_size + 1)

    def setup(self, device) -> None:
        if self.threads:
            torch.set_num_threads(int(self.threads))
        self.torch_device = torch.device(device)
        if self.backend == "torch":
            self.module = load(self.checkpoint, explanandum=self.explanandum_spec, map_location=self.torch_device)
            self.f = self.module.explanandum
            # the classifier runs faster channels-last on CPU (probabilities equal within 1e-5)
            self.f.model.to(memory_format=torch.channels_last)
            return
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        providers = ["CPUExecutionProvider"]
        if self.torch_device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.sessions = [ort.InferenceSession(g, opts, providers=providers) for g in self.graphs]

    def decode_request(self, request, **kwargs) -> Decoded | Rejected:
        try:
            req = parse_request(request, self.class_names)
            x = decode_image(req.image, self.max_image_pixels)
        except RequestError as err:
            return Rejected(err.status, err.message)
        except Exception as err:  # a bug or an exotic decoder error: this request fails, not its batch
            logger.exception("decoding a request failed")
            return Rejected(500, f"image: could not be decoded ({type(err).__name__})")
        return Decoded(to_input_size(x, self.input_size), tuple(x.shape[-2:]), req.classes, req.top_k, req.format)

    def batch(self, inputs):
        return list(inputs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> masks (B, C, S, S) and probabilities (B, C), on the CPU."""
        if self.backend == "torch":
            masks = self.module.explain(x)
            with torch.inference_mode():
                xc = x.to(self.torch_device).contiguous(memory_format=torch.channels_last)
                probs = self.f.probabilities(self.f(xc)).float().cpu()
            return masks.cpu(), probs
        feed = {"images": x.numpy()}
        return tuple(torch.from_numpy(s.run(None, feed)[0]) for s in self.sessions)

    def predict(self, x, **kwargs):
        single = not isinstance(x, list)  # max_batch_size 1: LitServe passes one request
        items = [x] if single else x
        ok = [i for i, it in enumerate(items) if isinstance(it, Decoded)]
        outputs: list[Any] = list(items)
        if ok:
            masks, probs = self.forward(torch.stack([items[i].x for i in ok]))
            with self.batch_counts.get_lock():
                self.batch_counts[len(ok)] += 1
            logger.debug("forward pass of %d image(s)", len(ok))
            for j, i in enumerate(ok):
                it = items[i]
                p = probs[j].numpy()
                sel = select_classes(p, it.classes, it.top_k)
                outputs[i] = Explained(it.size, p, sel, masks[j, sel], it.format)
        return outputs[0] if single else outputs

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output, **kwargs):
        if isinstance(output, Rejected):
            return JSONResponse({"detail": output.message}, status_code=output.status)
        # serialised here: the API server passes the bytes on instead of re-encoding a dict
        return JSONResponse(build_response(output, self.class_names, self.png_compress_level))


# ------------------------------------------------------------------- the server --
def build_server(checkpoint: str | os.PathLike, max_batch_size: int = 32, batch_timeout: float = 0.01,
                 backend: str = "torch", workers_per_device: int = 1, accelerator: str = "auto",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, input_size: int | None = None,
                 explanandum: str | None = None, timeout: float = 30.0, threads: int | None = None,
                 png_compress_level: int = 1, gzip: bool = False, fast_queue: bool = False) -> ls.LitServer:
    """A LitServer for an explainer checkpoint (loaded here once to fail early and describe it in /info)."""
    for name, value, lo in (("max_batch_size", max_batch_size, 1), ("workers_per_device", workers_per_device, 1),
                            ("max_image_pixels", max_image_pixels, 1), ("max_request_bytes", max_request_bytes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
    if batch_timeout < 0:
        raise ValueError(f"batch_timeout: expected seconds >= 0, got {batch_timeout!r}")
    if threads is None and accelerator in ("auto", "cpu") and not torch.cuda.is_available():
        threads = max(1, (os.cpu_count() or 1) // workers_per_device)  # the workers share the cores
    module = load(checkpoint, explanandum=explanandum)
    size = int(input_size or getattr(module, "input_size", None) or 128)
    f = module.explanandum
    info = {"classes": list(f.class_names), "num_classes": f.num_classes, "input_size": size,
            "explanandum_fingerprint": module.explanandum_fingerprint, "explanandum": f.spec,
            "kind": getattr(module, "kind", type(module).__name__), "version": VERSION,
            "backend": backend, "max_batch_size": max_batch_size, "batch_timeout": batch_timeout,
            "workers_per_device": workers_per_device, "threads": threads, "max_image_pixels": max_image_pixels,
            "max_request_bytes": max_request_bytes, "mask_formats": list(MASK_FORMATS)}
    graphs = onnx_graphs(module, size) if backend == "onnx" else None
    del module
    api = ExplanationAPI(str(checkpoint), info, backend=backend, graphs=graphs, explanandum=explanandum,
                         max_image_pixels=max_image_pixels, png_compress_level=png_compress_level, threads=threads,
                         max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    server = ls.LitServer(api, accelerator=accelerator, workers_per_device=workers_per_device, timeout=timeout,
                          info_path="/server-info", fast_queue=fast_queue,
                          middlewares=[(BodyGuard, {"path": api.api_path, "max_bytes": max_request_bytes})])

    async def info_endpoint() -> dict:
        return {**api.info, "batches": batch_stats(api.batch_counts[:])}

    server.app.add_api_route("/info", info_endpoint, methods=["GET"])
    if not gzip:  # LitServe gzips answers by default: CPU for little gain, PNG masks are compressed already
        server.app.user_middleware = [m for m in server.app.user_middleware if m.cls is not GZipMiddleware]
    return server


def _interrupt_main(pid: int):
    def handler(signum, frame):
        if os.getpid() != pid:  # a forked API server inherited this handler: end as SIGTERM would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    return handler


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m explainer serve",
                       description="Serve an explainer's masks over HTTP (LitServe, dynamic batching).")
    p.add_argument("--checkpoint", type=str, required=True, help="explainer .ckpt or .safetensors export")
    p.add_argument("--host", type=str, default="127.0.0.1", help="127.0.0.1 (this machine only) or 0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="requests per forward pass, at most")
    p.add_argument("--batch-timeout", type=float, default=0.01, help="seconds to wait for a batch to fill")
    p.add_argument("--backend", type=str, default="torch", choices=["torch", "onnx"])
    p.add_argument("--workers-per-device", type=int, default=1)
    p.add_argument("--accelerator", type=str, default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="larger images are refused with 413")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="larger request bodies are refused with 413")
    p.add_argument("--input-size", type=int, default=None, help="resolution fed to the explainer (default: trained)")
    p.add_argument("--explanandum", type=str, default=None, help="override the classifier spec of the checkpoint")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait for its answer")
    p.add_argument("--threads", type=int, default=None,
                   help="torch / ONNX Runtime threads per worker (default on CPU: cores / workers)")
    p.add_argument("--png-compress-level", type=int, default=1, help="zlib level of PNG masks, 0..9")
    p.add_argument("--fast-queue", type=bool, default=False, help="answers go back over ZeroMQ (LitServe)")
    p.add_argument("--gzip", type=bool, default=False, help="gzip answers when clients accept it")
    p.add_argument("--num-api-servers", type=int, default=None, help="HTTP processes (default: one per worker)")
    p.add_argument("--log-level", type=str, default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", type=bool, default=False, help="log every request")
    a = p.parse_args(argv)
    server = build_server(a.checkpoint, max_batch_size=a.max_batch_size, batch_timeout=a.batch_timeout,
                          backend=a.backend, workers_per_device=a.workers_per_device, accelerator=a.accelerator,
                          max_image_pixels=a.max_image_pixels, max_request_bytes=a.max_request_bytes,
                          input_size=a.input_size, explanandum=a.explanandum, timeout=a.timeout, threads=a.threads,
                          png_compress_level=a.png_compress_level, gzip=a.gzip,
                          fast_queue=a.fast_queue)
    signal.signal(signal.SIGTERM, _interrupt_main(os.getpid()))  # SIGTERM shuts down the workers too, as Ctrl+C does
    server.run(host=a.host, port=a.port, num_api_servers=a.num_api_servers, log_level=a.log_level,
               generate_client_file=False, access_log=a.access_log)
    return 0

