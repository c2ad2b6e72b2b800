"""What a new user's probe broke in the server (issue 22, items 1 and 7), each failing on 4c22510:

* JSON nested 10,000 deep (``image``, ``{"a":{"a":...}}``, ``classes``; in a JSON body or a multipart field)
  answers 400 with a JSON ``detail``, never 500;
* a client that sends half its body and stalls gets 408 after ``--body-timeout`` and its connection is
  closed, while the other clients keep being served;
* the 30000 x 30000 image bomb's 413 names ``--max-image-pixels``, not Pillow's own limit.
"""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import b64, noise, png
from PIL import Image

from explainer import serving

CKPT = Path(__file__).resolve().parents[2] / "checkpoints" / "synthetic_explainer.safetensors"
DEEP = 10_000
BODY_TIMEOUT = 1.0  # conftest's explain_server runs with --body-timeout 1


def nested(depth: int, inner: str = "1", kind: str = "list") -> str:
    return ("[" * depth + inner + "]" * depth) if kind == "list" else ('{"a":' * depth + inner + "}" * depth)


DEEP_BODIES = {
    "image as a deep list": '{"image": ' + nested(DEEP) + "}",
    "an object of objects": nested(DEEP, kind="object"),
    "deep classes": '{"image": "aGk=", "classes": ' + nested(DEEP) + "}",
}


def bomb_png(w: int = 30000, h: int = 30000) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def bomb_jpeg(w: int = 30000, h: int = 30000) -> bytes:
    """A small JPEG whose frame header (SOF0) claims w x h pixels."""
    buf = io.BytesIO()
    Image.fromarray(noise(8, 8, 0)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


# ================================================================ plain functions ==
@pytest.mark.parametrize("name", list(DEEP_BODIES))
def test_deep_json_is_a_400(name):
    with pytest.raises(serving.RequestError) as err:
        serving.check_json_body(DEEP_BODIES[name].encode())
    assert err.value.status == 400 and "nested deeper than" in err.value.message


def test_deep_multipart_classes_is_a_400():
    with pytest.raises(serving.RequestError) as err:
        serving.form_to_payload([("image", b"x"), ("classes", nested(DEEP))])
    assert err.value.status == 400 and "nested deeper than" in err.value.message
    # nesting that Python parses but no request needs is refused too; a plain request passes
    with pytest.raises(serving.RequestError, match="nested deeper than 32"):
        serving.check_json_body(('{"image": ' + nested(40) + "}").encode())
    assert serving.check_json_body(b'{"image": "aGk=", "classes": [1, "star"]}')["classes"] == [1, "star"]


@pytest.mark.parametrize("make", [bomb_png, bomb_jpeg], ids=["png", "jpeg"])
def test_the_image_bomb_names_max_image_pixels(make):
    with pytest.raises(serving.RequestError) as err:
        serving.decode_image(make(), 4096 * 4096)
    assert err.value.status == 413
    assert "900000000 pixels" in err.value.message and "--max-image-pixels" in err.value.message
    assert str(4096 * 4096) in err.value.message and "bomb" not in err.value.message.lower()


def _jpeg(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise(h, w, 4)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_limit_above_pillows_is_honoured(monkeypatch):
    """--max-image-pixels above Pillow's own bomb limit (an error above twice it; scaled down here: Pillow's
    limit 1000 pixels, ours 40000): an image within ours is decoded, one beyond it refused with 413 naming the
    flag, whether Pillow's guard or ours sees it first (the worker's setup sets Pillow's limit to ours)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # restored after the test
    api = serving.ExplanationAPI(str(CKPT), {"classes": list("abcdefgh"), "input_size": 128},
                                 max_image_pixels=40_000, max_batch_size=1)
    api.setup("cpu")
    within = api.decode_request({"image": b64(_jpeg(100, 120))})
    assert isinstance(within, serving.api.Decoded) and within.size == (100, 120), within
    for h, w in ((250, 250), (300, 300)):  # over ours only; over twice ours (Pillow's guard fires first)
        beyond = api.decode_request({"image": b64(_jpeg(h, w))})
        assert beyond.status == 413 and "--max-image-pixels" in beyond.message, beyond
        assert f"{h * w} pixels, over the limit of 40000" in beyond.message, beyond


# ===================================================================== the server ==
def test_deep_json_gets_400_with_a_detail_from_the_server(explain_server):
    url, _ = explain_server
    good = {"image": b64(png(noise(16, 16, 1))), "top_k": 1}
    for name, body in DEEP_BODIES.items():
        r = httpx.post(url + "/predict", content=body.encode(), headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 400, (name, r.status_code, r.text[:200])
        assert "nested deeper than" in r.json()["detail"], name
    r = httpx.post(url + "/predict", files={"image": ("x.png", png(noise(16, 16, 2)), "image/png")},
                   data={"classes": nested(DEEP)}, timeout=60)
    assert r.status_code == 400 and "nested deeper than" in r.json()["detail"], r.text[:200]
    assert httpx.post(url + "/predict", json=good, timeout=60).status_code == 200


def test_stalled_bodies_time_out_and_others_are_served(explain_server):
    url, port = explain_server
    stalled = []
    for _ in range(4):  # half a body each, then nothing
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"image": "' + b"A" * 20)
        stalled.append(s)
    t0 = time.monotonic()
    good = {"image": b64(png(noise(24, 24, 3))), "top_k": 2}
    for _ in range(3):  # meanwhile, other clients are answered
        t = time.monotonic()
        r = httpx.post(url + "/predict", json=good, timeout=30)
        assert r.status_code == 200, r.text
        assert time.monotonic() - t < 10
    for s in stalled:
        data = b""
        while True:
            chunk = s.recv(65536)  # the socket's own timeout bounds the wait
            if not chunk:
                break  # closed by the server
            data += chunk
        s.close()
        head = data.split(b"\r\n", 1)[0]
        assert head.startswith(b"HTTP/1.1 408"), data[:300]
        assert b"--body-timeout" in data
    assert time.monotonic() - t0 < BODY_TIMEOUT + 20
    assert np.isfinite(httpx.get(url + "/info", timeout=30).json()["body_timeout"])
