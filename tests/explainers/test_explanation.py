"""``explanation()``, the one path from images to masks (explainer.explainers.explanation), and its users.

* against a plain per-image loop (resize with antialiasing, explain, pick classes by a sorted list, resize
  back) for a batch and for a list of images of different sizes;
* the one top-k tie rule (stable: the lower class index first);
* the ``explain`` verb, a real LitServe server and ``explanation()`` give identical masks for the same file
  (57x91, 128x128, 640x480 px; 8-bit RGB, 16-bit greyscale and palette PNGs);
* the finetuned LTX explainer offers the same ``explanation()`` (a subclass of ``ExplainsImages``).
"""

from __future__ import annotations

import base64
import inspect
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import explainer
from explainer import cli
from explainer.data.images import read_image
from explainer.explainers.base import TrainedExplainer
from explainer.explainers.explanation import DEFAULT_INPUT_SIZE, ExplainsImages, Explanation, choose_classes
from explainer.pipelines.finetune import FinetunedExplainer
from explainer.serving import decode_mask

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "checkpoints" / "synthetic_explainer.safetensors"
SIZES = [(57, 91), (128, 128), (640, 480)]  # (W, H) as PIL counts them: 57x91, 128x128, 640x480 px
KINDS = ("rgb8", "grey16", "palette")


@pytest.fixture(scope="module")
def model():
    return explainer.load(CKPT)


def plain_loop(model, images: list[torch.Tensor], top_k: int | None, S: int = 128):
    """Per image: antialiased bilinear to S x S, explain(), the classifier, classes by a sorted list (ties to the
    lower index), masks back to the image's size."""
    f = model.explanandum
    out = []
    for x in images:
        H, W = x.shape[-2:]
        xs = F.interpolate(x[None], size=(S, S), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        m = model.explain(xs)[0]
        with torch.inference_mode():
            p = f.probabilities(f(xs))[0]
        order = sorted(range(f.num_classes), key=lambda c: (-float(p[c]), c))
        cls = order[:top_k] if top_k else list(range(f.num_classes))
        back = F.interpolate(m[cls][None], size=(H, W), mode="bilinear", align_corners=False, antialias=True)
        out.append((back[0].clamp(0, 1), cls, p))
    return out


def test_explanation_equals_a_plain_loop_for_a_batch_and_a_list(model):
    g = torch.Generator().manual_seed(0)
    batch = torch.rand(3, 3, 57, 91, generator=g)
    e = model.explanation(batch, top_k=3)
    assert isinstance(e, Explanation)
    assert e.masks.shape == (3, 3, 57, 91) and e.classes.shape == (3, 3) and e.classes.dtype == torch.long
    assert e.probabilities.shape == (3, 8)
    for i, (m, cls, p) in enumerate(plain_loop(model, list(batch), 3)):
        assert e.classes[i].tolist() == cls
        assert torch.allclose(e.masks[i], m, atol=1e-5)
        assert torch.allclose(e.probabilities[i], p, atol=1e-5)
    images = [torch.rand(3, h, w, generator=g) for h, w in ((91, 57), (128, 128), (480, 640), (20, 30))]
    e = model.explanation(images)  # every class
    assert isinstance(e.masks, list) and [tuple(m.shape) for m in e.masks] == [(8, *im.shape[-2:]) for im in images]
    for i, (m, cls, _) in enumerate(plain_loop(model, images, None)):
        assert e.classes[i].tolist() == cls
        assert torch.allclose(e.masks[i], m, atol=1e-5)
        assert float(e.masks[i].min()) >= 0 and float(e.masks[i].max()) <= 1
    # explicit classes, one list per image (any lengths), and the same classes for every image
    e = model.explanation(images[:2], classes=[[5, 1], [2]])
    assert [c.tolist() for c in e.classes] == [[5, 1], [2]]
    full = model.explanation(images[:2])
    # (only those classes' channels are computed: equal to the all-class masks up to float rounding)
    assert torch.allclose(e.masks[0], full.masks[0][[5, 1]], atol=1e-6)
    assert torch.allclose(e.masks[1], full.masks[1][[2]], atol=1e-6)
    e = model.explanation(batch, classes=torch.tensor([[4, 0]] * 3))
    assert torch.allclose(e.masks, model.explanation(batch).masks[:, [4, 0]], atol=1e-6)


def test_one_fallback_for_the_input_size(model, monkeypatch):
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    at_64 = model.explanation(x, size=64)
    assert torch.allclose(at_64.masks[0], plain_loop(model, [x[0]], None, S=64)[0][0], atol=1e-5)
    monkeypatch.setattr(model, "input_size", None)  # an explainer that recorded no input size
    assert DEFAULT_INPUT_SIZE == 128
    assert torch.equal(model.explanation(x).masks, model.explanation(x, size=128).masks)


class _Tied(ExplainsImages):
    """Probabilities with ties (fixed); each mask is filled with its class index / 10."""

    def __init__(self, p):
        self.p = torch.tensor(p)

    def class_probabilities(self, x):
        return self.p[: x.shape[0]]

    def selected_masks(self, x, classes):
        return [c.float().view(-1, 1, 1).expand(-1, *x.shape[-2:]) / 10 for c in classes]


def test_top_k_ties_go_to_the_lower_index():
    p = [[0.2, 0.3, 0.3, 0.1, 0.3], [0.5, 0.5, 0.5, 0.5, 0.5]]
    e = _Tied(p).explanation([torch.rand(3, 9, 7), torch.rand(3, 4, 4)], top_k=3, size=8)
    want = [sorted(range(5), key=lambda c: (-row[c], c))[:3] for row in p]
    assert e.classes.tolist() == want == [[1, 2, 4], [0, 1, 2]]
    assert [float(m[j].mean()) for m in e.masks for j in range(3)] == pytest.approx([c / 10 for w in want for c in w])
    chosen = choose_classes(torch.tensor(p), top_k=5)
    assert [c.tolist() for c in chosen] == [sorted(range(5), key=lambda c: (-r[c], c)) for r in p]


def test_bad_arguments_say_what_was_expected(model):
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="not both"):
        model.explanation(x, classes=[1, 2], top_k=2)
    with pytest.raises(ValueError, match=r"top_k: expected an integer in 1\.\.8"):
        model.explanation(x, top_k=9)
    with pytest.raises(ValueError, match=r"classes: expected indices in 0\.\.7"):
        model.explanation(x, classes=[1, 8])
    with pytest.raises(ValueError, match=r"one entry per image \(2\), got 3"):
        model.explanation(x, classes=[1, 2, 3])
    with pytest.raises(ValueError, match="trust: expected True or False"):
        model.explanation(x, trust=1)
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"refine: expected a fraction of the masks in \[0, 1\]"):
            model.explanation(x, refine=bad)
    with pytest.raises(ValueError, match=r"x\[1\]"):
        model.explanation([torch.rand(3, 8, 8), torch.rand(8, 8)])


def test_finetuned_explainers_offer_the_same_explanation():
    assert issubclass(TrainedExplainer, ExplainsImages) and issubclass(FinetunedExplainer, ExplainsImages)
    assert FinetunedExplainer.explanation is TrainedExplainer.explanation is ExplainsImages.explanation
    assert list(inspect.signature(ExplainsImages.explanation).parameters)[:6] == [
        "self", "x", "classes", "top_k", "trust", "refine"]


# ================================================= the verb, the server and explanation() agree ==
def image_file(kind: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = (np.sin(xx / 9.0) * np.cos(yy / 7.0) + 1) / 2  # some structure, and noise
    if kind == "rgb8":
        a = np.stack([smooth, smooth[::-1], rng.random((h, w))], axis=-1)
        return Image.fromarray((a * 255).round().astype(np.uint8))
    if kind == "grey16":
        return Image.fromarray((smooth * 65535).round().astype(np.uint16))  # Pillow mode I;16
    im = Image.fromarray((smooth * 5.99).astype(np.uint8), mode="P")
    im.putpalette(rng.integers(0, 256, 6 * 3).tolist())
    return im


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("same_masks")
    out = {}
    for kind in KINDS:
        for i, (w, h) in enumerate(SIZES):
            name = f"{kind}_{w}x{h}.png"
            image_file(kind, w, h, seed=i).save(root / name)
            out[name] = root / name
    assert Image.open(out["grey16_57x91.png"]).mode == "I;16" and Image.open(out["palette_57x91.png"]).mode == "P"
    return out


def test_verb_server_and_explanation_give_identical_masks(files, explain_server, model, tmp_path, capsys,
                                                          one_thread):
    """The server (conftest's explain_server) runs on one thread, as this side does (conftest's one_thread):
    the same arithmetic, bit for bit."""
    server, _ = explain_server
    k = 3
    folder = next(iter(files.values())).parent
    rc = cli.main(["explain", "--checkpoint", str(CKPT), "--images", str(folder), "--out", str(tmp_path / "out"),
                   "--top-k", str(k), "--batch-size", "1"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "explanations.json").read_text())
    names = model.explanandum.class_names
    for name, path in files.items():
        e = model.explanation([read_image(path)], top_k=k)
        W, H = Image.open(path).size
        ours = (e.masks[0].numpy() * 255).round().astype(np.uint8)
        assert ours.shape == (k, H, W)
        assert [c["index"] for c in report[name]["top_classes"]] == e.classes[0].tolist()
        for fmt in ("png", "npy"):
            r = httpx.post(server + "/predict", timeout=120,
                           json={"image": base64.b64encode(path.read_bytes()).decode(), "top_k": k, "format": fmt})
            assert r.status_code == 200, r.text
            ans = r.json()
            assert ans["size"] == [H, W] and "trust" not in ans["masks"][0]  # only when asked
            assert [m["index"] for m in ans["masks"]] == e.classes[0].tolist()
            assert np.allclose([ans["probabilities"][n] for n in names], e.probabilities[0].numpy(), atol=1e-5)
            for j, m in enumerate(ans["masks"]):
                served = decode_mask(m["mask"])
                if fmt == "png":
                    assert np.array_equal((served * 255).round().astype(np.uint8), ours[j]), (name, j)
                else:
                    assert np.array_equal(served, e.masks[0][j].numpy().astype(np.float16).astype(np.float32))
        # trust: the verb writes it by default, the server answers it when asked; both equal explanation()'s
        t = model.explanation([read_image(path)], top_k=k, trust=True)
        assert torch.equal(t.masks[0], e.masks[0])
        for field in ("trust", "keep", "remove"):
            assert np.allclose([c[field] for c in report[name]["top_classes"]], getattr(t, field)[0].numpy(),
                               atol=1e-5), (name, field)
        r = httpx.post(server + "/predict", timeout=120,
                       json={"image": base64.b64encode(path.read_bytes()).decode(), "top_k": k, "trust": True})
        assert r.status_code == 200, r.text
        for field in ("trust", "keep", "remove"):
            assert np.allclose([m[field] for m in r.json()["masks"]], getattr(t, field)[0].numpy(), atol=1e-5)
        for j, c in enumerate(e.classes[0].tolist()):
            stem = path.name.replace(".", "_")
            written = np.asarray(Image.open(tmp_path / "out" / f"{stem}_{names[c]}_mask.png"))
            assert np.array_equal(written, ours[j]), (name, j)


def test_decoders_agree_on_16_bit_and_palette(files):
    """The float rule keeps 16-bit precision (divided by 65535); the datasets' uint8 is it rounded."""
    from explainer.data.base import read_rgb

    path = files["grey16_57x91.png"]
    v = np.asarray(Image.open(path)).astype(np.float64)
    x = read_image(path)
    assert torch.allclose(x, torch.from_numpy(v / 65535).float()[None].expand(3, -1, -1), atol=1e-7)
    assert np.array_equal(read_rgb(path), np.floor(x.permute(1, 2, 0).double().numpy() * 255 + 0.5).astype(np.uint8))
    pal = files["palette_57x91.png"]
    rgb = np.asarray(Image.open(pal).convert("RGB"))
    assert torch.equal(read_image(pal), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert torch.equal(read_image(io.BytesIO(pal.read_bytes()).getvalue()), read_image(pal))


def test_input_resolution_of_a_fixed_size_classifier(tiny_vit, tiny_cnn):
    """An explainer with no trained input size is fed the one size a ViT classifier takes (32 here), else 128."""
    from types import SimpleNamespace

    from explainer.explainers.explanation import input_resolution

    assert input_resolution(SimpleNamespace(explanandum=tiny_vit, input_size=None)) == 32
    assert input_resolution(SimpleNamespace(explanandum=tiny_cnn, input_size=None)) == DEFAULT_INPUT_SIZE
    assert input_resolution(SimpleNamespace(explanandum=tiny_vit, input_size=64)) == 64
    assert input_resolution(SimpleNamespace(explanandum=tiny_vit, input_size=None), size=48) == 48
