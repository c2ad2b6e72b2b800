"""The HTTP server (explainer.serving): its checks as plain functions, then the real server as clients use it.

The server tests start ``python -m explainer serve`` in subprocesses (torch and
ONNX backends, started together once for the module) on 127.0.0.1 and a free
port, talk to them with httpx, and always stop them.
"""

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import b64, free_port, noise, png, stop, wait_healthy
from PIL import Image

import explainer
from explainer import serving as serve

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "checkpoints" / "synthetic_explainer.safetensors"
NAMES = ["circle", "cross", "crescent", "ell", "ring", "square", "star", "triangle"]
MAX_PIXELS = 20_000  # the servers' --max-image-pixels: 128 x 128 passes, 150 x 150 does not
MAX_BYTES = 300_000  # the servers' --max-request-bytes


def jpeg(a: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


# ================================================================ plain functions ==
def error(fn, *args):
    with pytest.raises(serve.RequestError) as info:
        fn(*args)
    return info.value


def test_parse_request_accepts_names_indices_top_k_and_formats():
    img = b64(b"\x89PNG...")
    r = serve.parse_request({"image": img, "classes": ["star", 1, "star"], "format": "npy"}, NAMES)
    assert r.image == b"\x89PNG..." and r.classes == (6, 1) and r.top_k is None and r.format == "npy"
    r = serve.parse_request({"image": "data:image/png;base64," + img, "top_k": 3, "classes": None}, NAMES)
    assert r.classes is None and r.top_k == 3 and r.format == "png"
    wrapped = "\n".join(img[i:i + 4] for i in range(0, len(img), 4))
    assert serve.parse_request({"image": wrapped}, NAMES).image == b"\x89PNG..."


@pytest.mark.parametrize("payload, status, words", [
    ([1, 2], 400, "JSON object"),
    ({}, 400, "image: missing"),
    ({"image": 3}, 400, "expected a string"),
    ({"image": "not base64!"}, 400, "not valid base64"),
    ({"image": "aGk=", "classes": "circle"}, 400, "expected a list"),
    ({"image": "aGk=", "classes": []}, 400, "at least one"),
    ({"image": "aGk=", "classes": [1.5]}, 400, "names (strings) or indices"),
    ({"image": "aGk=", "classes": [True]}, 400, "names (strings) or indices"),
    ({"image": "aGk=", "classes": ["dog"]}, 422, "unknown class 'dog'"),
    ({"image": "aGk=", "classes": [8]}, 422, "index 8 out of range"),
    ({"image": "aGk=", "top_k": 0}, 422, "1..8"),
    ({"image": "aGk=", "top_k": 9}, 422, "1..8"),
    ({"image": "aGk=", "top_k": "2"}, 400, "expected an integer"),
    ({"image": "aGk=", "top_k": 2, "classes": [1]}, 400, "not both"),
    ({"image": "aGk=", "format": "jpeg"}, 400, "format: expected one of ['png', 'npy']"),
    ({"image": "aGk=", "path": "/etc/passwd"}, 400, "unknown field(s) ['path']"),
])
def test_parse_request_rejects_with_what_was_expected(payload, status, words):
    err = error(serve.parse_request, payload, NAMES)
    assert err.status == status and words in err.message, err.message


def test_body_kind_and_json_body():
    assert serve.body_kind("application/json; charset=utf-8") == "json"
    assert serve.body_kind(None) == "json"
    assert serve.body_kind("multipart/form-data; boundary=x") == "multipart"
    err = error(serve.body_kind, "application/x-www-form-urlencoded")
    assert err.status == 415 and "Content-Type: application/json" in err.message
    assert serve.check_json_body(b'{"image": "x"}') == {"image": "x"}
    assert "not valid JSON" in error(serve.check_json_body, b'{"image": ').message
    assert "got a JSON list" in error(serve.check_json_body, b"[1]").message
    assert "empty" in error(serve.check_json_body, b"").message


def test_form_to_payload_matches_the_json_fields():
    fields = [("image", b"\x89PNG"), ("classes", "star, 2"), ("classes", '["ring", 0]'), ("format", "npy")]
    assert serve.form_to_payload(fields) == {"image": b64(b"\x89PNG"), "classes": ["star", 2, "ring", 0],
                                             "format": "npy"}
    assert serve.form_to_payload([("image", "aGk="), ("top_k", "3")]) == {"image": "aGk=", "top_k": 3}
    assert serve.form_to_payload([("top_k", "three")])["top_k"] == "three"  # parse_request says what is wrong
    assert "more than once" in error(serve.form_to_payload, [("image", b"a"), ("image", b"b")]).message


def test_decode_image_converts_to_float_rgb():
    rgb = noise(20, 30, 0)
    x = serve.decode_image(png(rgb))
    assert x.shape == (3, 20, 30) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    j = jpeg(rgb)
    assert torch.equal(serve.decode_image(j), torch.from_numpy(np.array(Image.open(io.BytesIO(j)))).permute(2, 0, 1)
                       .float() / 255)
    grey = noise(20, 30, 1, channels=1)
    assert torch.equal(serve.decode_image(png(grey)), torch.from_numpy(grey).float().div(255)[None].expand(3, -1, -1))
    # 16-bit greyscale is scaled by 1/65535, not clipped at 255
    g16 = np.random.default_rng(2).integers(0, 65536, (20, 30), dtype=np.uint16)
    x16 = serve.decode_image(png(g16))
    assert torch.allclose(x16, torch.from_numpy(g16.astype(np.float32) / 65535)[None].expand(3, -1, -1), atol=1e-6)
    # transparency is composited on white: a plain numpy re-implementation
    rgba = noise(20, 30, 3, channels=4)
    a = rgba[..., 3:].astype(np.float64) / 255
    want = (rgba[..., :3] * a + 255 * (1 - a)) / 255
    got = serve.decode_image(png(rgba)).permute(1, 2, 0).numpy()
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6
    # EXIF orientation 6 (rotate 90 degrees clockwise to display)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert serve.decode_image(jpeg(rgb, exif=exif)).shape == (3, 30, 20)


def zero_size_png() -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 16, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise(8, 8, 0)).save(buf, format="GIF")
    return buf.getvalue()


BAD_IMAGES = [  # (name, bytes, status, words in the message)
    ("not an image", b"hello, world", 422, "not an image"),
    ("truncated png", png(noise(64, 64, 0))[:300], 422, "truncated PNG"),
    ("truncated jpeg", jpeg(noise(64, 64, 0))[:400], 422, "truncated JPEG"),
    ("zero-size png", zero_size_png(), 422, "zero-size PNG"),
    ("zero bytes", b"", 422, "zero-size (0 bytes)"),
    ("gif", gif(), 415, "expected JPEG or PNG, got GIF"),
    ("too many pixels", png(noise(150, 150, 0)), 413, "over the limit of 20000"),
]


@pytest.mark.parametrize("name, data, status, words", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_decode_image_rejects(name, data, status, words):
    err = error(serve.decode_image, data, MAX_PIXELS)
    assert err.status == status and words in err.message, err.message


def test_masks_round_trip_and_class_selection():
    m = np.random.default_rng(0).random((9, 7)).astype(np.float32)
    assert np.abs(serve.decode_mask(serve.encode_mask(m, "png")) - m).max() <= 0.5 / 255 + 1e-6
    assert np.abs(serve.decode_mask(serve.encode_mask(m, "npy")) - m).max() <= 1e-3
    p = np.array([0.1, 0.7, 0.3, 0.7])
    assert serve.select_classes(p, None, 3) == [1, 3, 2]  # ties by index
    assert serve.select_classes(p, (2, 0), None) == [2, 0]
    assert serve.select_classes(p, None, None) == [0, 1, 2, 3]
    assert serve.batch_stats([0, 3, 0, 2]) == {"forward_passes": 5, "images": 9, "largest": 3,
                                               "by_size": {"1": 3, "3": 2}}


# ===================================================================== the server ==
def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "explainer", "serve", "--checkpoint", str(CKPT), "--host", "127.0.0.1",
           "--port", str(port), "--max-image-pixels", str(MAX_PIXELS), "--max-request-bytes", str(MAX_BYTES),
           "--log-level", "warning", *args]
    with open(log, "wb") as out:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A torch and an ONNX server, started together, stopped at the end whatever happens."""
    logs = tmp_path_factory.mktemp("serve")
    procs = {}
    try:
        procs["torch"] = start(["--backend", "torch"], logs / "torch.log")
        procs["onnx"] = start(["--backend", "onnx", "--max-batch-size", "8"], logs / "onnx.log")
        for name, (proc, url) in procs.items():
            wait_healthy(proc, url, logs / f"{name}.log")
        yield {name: url for name, (_, url) in procs.items()}
    finally:
        for proc, _ in procs.values():
            stop(proc)


@pytest.fixture(scope="module")
def model():
    return explainer.load(CKPT)


def reference(model, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """In-process masks (C, H, W) and probabilities (C,) of image bytes: the shared path (``explanation()``)."""
    e = model.explanation([serve.decode_image(data)])
    return e.masks[0].numpy(), e.probabilities[0].numpy()


def post(url: str, **kw) -> httpx.Response:
    return httpx.post(url + "/predict", timeout=120, **kw)


def check_answer(ans: dict, masks: np.ndarray, probs: np.ndarray, classes: list[int], fmt: str = "png"):
    tol = 1 / 255 + 1e-5 if fmt == "png" else 1e-3
    assert ans["size"] == list(masks.shape[-2:])
    assert list(ans["probabilities"]) == NAMES
    assert np.allclose([ans["probabilities"][n] for n in NAMES], probs, atol=1e-4)
    assert [e["index"] for e in ans["masks"]] == classes
    assert [e["class"] for e in ans["masks"]] == [NAMES[c] for c in classes]
    for e, c in zip(ans["masks"], classes):
        m = serve.decode_mask(e["mask"])
        assert m.shape == masks.shape[-2:]
        assert np.abs(m - masks[c]).max() <= tol, (c, np.abs(m - masks[c]).max())
        assert abs(e["area"] - masks[c].mean()) <= 1e-4


def test_health_and_info(servers, model):
    for url in servers.values():
        assert httpx.get(url + "/health").status_code == 200
        info = httpx.get(url + "/info").json()
        assert info["classes"] == model.explanandum.class_names == NAMES
        assert info["input_size"] == 128
        assert info["explanandum_fingerprint"] == model.explanandum_fingerprint
        assert info["version"] == explainer.__version__
    assert httpx.get(servers["onnx"] + "/info").json()["backend"] == "onnx"


def test_served_masks_equal_explain(servers, model):
    images = [png(noise(128, 128, 10)), jpeg(noise(128, 128, 11)), png(noise(48, 64, 12))]
    for data in images:
        masks, probs = reference(model, data)
        for fmt in ("png", "npy"):
            r = post(servers["torch"], json={"image": b64(data), "format": fmt})
            assert r.status_code == 200, r.text
            check_answer(r.json(), masks, probs, list(range(8)), fmt)


def test_classes_by_name_and_index_top_k_and_multipart(servers, model):
    data = png(noise(40, 56, 20))
    masks, probs = reference(model, data)
    r = post(servers["torch"], json={"image": b64(data), "classes": ["star", 0, "cross"]})
    check_answer(r.json(), masks, probs, [6, 0, 1])
    r = post(servers["torch"], json={"image": b64(data), "top_k": 3, "format": "npy"})
    top = [int(i) for i in np.argsort(-probs, kind="stable")[:3]]
    check_answer(r.json(), masks, probs, top, "npy")
    assert [e["index"] for e in r.json()["masks"]] == sorted(top, key=lambda c: -r.json()["probabilities"][NAMES[c]])
    r = post(servers["torch"], files={"image": ("x.png", data, "image/png")}, data={"classes": "ring,2"})
    assert r.status_code == 200, r.text
    check_answer(r.json(), masks, probs, [4, 2])
    r = post(servers["torch"], files={"image": ("x.png", data, "image/png")}, data={"top_k": "2"})
    check_answer(r.json(), masks, probs, top[:2])


async def _many(url: str, payloads: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(payloads), max_keepalive_connections=len(payloads))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*[client.post(url + "/predict", json=p) for p in payloads])


def test_64_concurrent_clients_are_batched(servers, model):
    url = servers["torch"]
    before = httpx.get(url + "/info").json()["batches"]
    images = [png(noise(32, 32, 100 + i)) for i in range(64)]
    answers = asyncio.run(_many(url, [{"image": b64(d), "top_k": 2} for d in images]))
    after = httpx.get(url + "/info").json()["batches"]
    # a plain in-process batch: the 64 images, one explanation() call
    e = model.explanation(torch.stack([serve.decode_image(d) for d in images]))
    m, p = e.masks, e.probabilities.numpy()
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        top = [int(c) for c in np.argsort(-p[i], kind="stable")[:2]]
        check_answer(r.json(), m[i].clamp(0, 1).numpy(), p[i], top)
    assert after["images"] - before["images"] == 64
    grown = {int(n): c - before["by_size"].get(n, 0) for n, c in after["by_size"].items()}
    assert max(n for n, c in grown.items() if c > 0) > 1, after  # some forward pass served several clients


def _bad_requests(good: bytes) -> list[tuple[str, dict, int, str]]:
    img = b64(good)
    cases = [(name, {"json": {"image": b64(data)}}, status, words) for name, data, status, words in BAD_IMAGES]
    return cases + [
        ("unknown class", {"json": {"image": img, "classes": ["dog"]}}, 422, "unknown class 'dog'"),
        ("index out of range", {"json": {"image": img, "classes": [3, 11]}}, 422, "index 11 out of range"),
        ("top_k out of range", {"json": {"image": img, "top_k": 20}}, 422, "top_k: expected 1..8"),
        ("classes and top_k", {"json": {"image": img, "classes": [1], "top_k": 2}}, 400, "not both"),
        ("bad format", {"json": {"image": img, "format": "tiff"}}, 400, "format: expected one of"),
        ("image not a string", {"json": {"image": [1, 2]}}, 400, "image: expected a string"),
        ("classes not a list", {"json": {"image": img, "classes": "ring"}}, 400, "expected a list"),
        ("unknown field", {"json": {"image": img, "file": str(CKPT)}}, 400, "unknown field(s) ['file']"),
        ("a path as image", {"json": {"image": str(CKPT)}}, 400, "not valid base64"),
        ("missing image", {"json": {"classes": [1]}}, 400, "image: missing"),
        ("bad json", {"content": b'{"image": "abc', "headers": {"content-type": "application/json"}}, 400,
         "not valid JSON"),
        ("json array", {"json": [img]}, 400, "expected a JSON object"),
        ("text/plain", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415,
         "expected application/json or multipart/form-data"),
        ("form-urlencoded", {"data": {"image": img}}, 415, "Content-Type"),
        ("multipart without image", {"files": {"other": ("a.txt", b"x")}}, 400, "unknown field(s) ['other']"),
        ("multipart bad top_k", {"files": {"image": ("x.png", good)}, "data": {"top_k": "many"}}, 400,
         "top_k: expected an integer"),
        ("body over the limit", {"json": {"image": "A" * (MAX_BYTES + 8)}}, 413, "over the limit of 300000 bytes"),
    ]


def test_bad_requests_get_4xx_and_the_server_keeps_answering(servers, model):
    url = servers["torch"]
    good = png(noise(24, 24, 7))
    masks, probs = reference(model, good)
    for name, kw, status, words in _bad_requests(good):
        r = post(url, **kw)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words in r.json()["detail"], (name, r.json())
        ok = post(url, json={"image": b64(good), "top_k": 1})
        assert ok.status_code == 200, (name, ok.text)
        check_answer(ok.json(), masks, probs, [int(np.argmax(probs))])


def test_a_bad_request_does_not_fail_its_batch(servers, model):
    """Bad and good requests sent together (so batched together): each gets its own answer."""
    good = [png(noise(24, 24, 200 + i)) for i in range(12)]
    bad = [b"not an image", png(noise(64, 64, 0))[:300], b""]
    payloads = [{"image": b64(d), "classes": [0]} for d in good] + [{"image": b64(d)} for d in bad]
    answers = asyncio.run(_many(servers["torch"], payloads))
    assert [r.status_code for r in answers] == [200] * len(good) + [422] * len(bad)
    for d, r in zip(good, answers):
        masks, probs = reference(model, d)
        check_answer(r.json(), masks, probs, [0])


def test_onnx_backend_matches_torch(servers):
    images = [png(noise(128, 128, 30)), jpeg(noise(50, 70, 31))]
    payloads = [{"image": b64(d), "format": "npy"} for d in images]
    torch_answers = asyncio.run(_many(servers["torch"], payloads))
    onnx_answers = asyncio.run(_many(servers["onnx"], payloads))
    for a, b in zip(torch_answers, onnx_answers):
        a, b = a.json(), b.json()
        assert a["size"] == b["size"]
        assert np.allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-4)
        for ea, eb in zip(a["masks"], b["masks"], strict=True):
            assert ea["index"] == eb["index"]
            assert np.abs(serve.decode_mask(ea["mask"]) - serve.decode_mask(eb["mask"])).max() <= 1e-3
    assert httpx.get(servers["onnx"] + "/info").json()["batches"]["images"] >= len(images)
