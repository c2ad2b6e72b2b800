"""The body guard: ASGI middleware in front of ``POST /predict`` in the API-server processes.

It limits the body's size (``--max-request-bytes``) and the time to receive it (``--body-timeout``), checks
the content type and the JSON (syntax, nesting), and rewrites a multipart upload as the equivalent JSON body,
so that LitServe only ever parses a JSON object.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any, Sequence

from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse

from explainer.serving.schema import FIELDS, RequestError, load_json

DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
DEFAULT_BODY_TIMEOUT = 10.0  # seconds to receive a whole request body


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
    """The JSON object of a request body; 400 for anything else (bad JSON, too deeply nested, an array...)."""
    if not body:
        raise RequestError(400, "request body: empty; expected a JSON object such as "
                                '{"image": "<base64 of JPEG or PNG bytes>"}')
    payload = load_json(body, "request body")
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
    indices. ``top_k`` is an integer in text; ``trust`` is ``true`` or ``false``. Other fields are passed on as
    text (:func:`~explainer.serving.schema.parse_request` rejects unknown ones).
    """
    payload: dict[str, Any] = {}
    classes: list[int | str] | None = None
    for name, value in fields:
        if name == "classes":
            text = _form_text(name, value).strip()
            if text.startswith("["):
                items = load_json(text, "classes")
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
        elif name == "trust":  # "true" / "false" in a form; anything else is passed on and refused by the schema
            text = _form_text(name, value)
            payload[name] = {"true": True, "false": False}.get(text.strip().lower(), text)
        else:
            payload[name] = _form_text(name, value)
    if classes is not None:
        payload["classes"] = classes
    return payload


class BodyGuard:
    """ASGI middleware in front of ``POST path``: size and time limits, content type, JSON, multipart -> JSON.

    LitServe parses the body itself and answers 500 to bad JSON or a broken
    multipart body, and waits for a stalled body forever; this guard answers
    those with a 4xx that says what was expected (408 and a closed connection
    for a body not complete within ``body_timeout`` seconds), and hands
    LitServe a JSON object only.
    """

    def __init__(self, app, path: str = "/predict", max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT):
        self.app = app
        self.path = path
        self.max_bytes = int(max_bytes)
        self.body_timeout = float(body_timeout)

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
            close = {"connection": "close"} if err.status in (408, 413) else None  # the rest of the body is unread
            await JSONResponse({"detail": err.message}, status_code=err.status, headers=close)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks, total = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise RequestError(408, f"request body: not complete after {self.body_timeout:g} s "
                                        f"({total} bytes received; --body-timeout)") from None
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
