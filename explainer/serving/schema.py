"""The request schema: the fields of ``POST /predict``, checked, and the 4xx error every check raises."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Sequence

FIELDS = ("image", "classes", "top_k", "format", "trust")
MASK_FORMATS = ("png", "npy")
MAX_JSON_DEPTH = 32  # nesting levels of a request's JSON (a valid request has 2)


class RequestError(Exception):
    """A request the server cannot answer: an HTTP status (4xx) and a message saying what was expected."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass(frozen=True)
class ExplainRequest:
    """A checked request: the image's bytes, the classes asked for (indices) or top_k, the mask format, and
    whether each mask's trust is wanted."""

    image: bytes
    classes: tuple[int, ...] | None
    top_k: int | None
    format: str
    trust: bool = False


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((w, d + 1) for w in (v.values() if isinstance(v, dict) else v))
    return deepest


def load_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` of a request's text; 400 for invalid JSON or JSON nested deeper than MAX_JSON_DEPTH."""
    too_deep = RequestError(400, f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels; expected a JSON object "
                                 'such as {"image": "<base64 of JPEG or PNG bytes>", "classes": ["cat", 3]}')
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"{what}: not valid JSON ({err}); expected a JSON object such as "
                                '{"image": "<base64 of JPEG or PNG bytes>"}') from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


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
                                "classes, top_k, format, trust")
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
    trust = payload.get("trust", False)
    if not isinstance(trust, bool):
        raise RequestError(400, f"trust: expected true or false, got {trust!r} ({type(trust).__name__})")
    index = None if classes is None else resolve_classes(classes, class_names)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise RequestError(400, f"top_k: expected an integer, got {top_k!r} ({type(top_k).__name__})")
        if not 1 <= top_k <= len(class_names):
            raise RequestError(422, f"top_k: expected 1..{len(class_names)} (the number of classes), got {top_k}")
    return ExplainRequest(decode_base64(image), index, top_k, fmt, trust)
