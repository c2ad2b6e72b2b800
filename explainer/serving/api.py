"""The LitAPI: requests decoded in the inference worker, explained in batches, answered one by one.

* per request (``decode_request``): the fields checked (:func:`~explainer.serving.schema.parse_request`), the
  image decoded (:func:`~explainer.serving.decoding.decode_image`) and resized to the explainer's input size
  by the rule of :mod:`explainer.explainers.explanation` (early, so that a batch holds small images only);
* per batch (``predict``): one forward pass of the explainer and of the classifier and the choice of classes,
  by :meth:`~explainer.explainers.explanation.ExplainsImages.explanation` (torch) or by ONNX Runtime and the
  same choice (onnx);
* per request (``encode_response``): the masks resized back to the image's own size (the same rule) and
  encoded (:func:`build_response`).

A bad request never fails the other requests of its batch: ``decode_request`` returns a :class:`Rejected`
marker that ``predict`` skips and ``encode_response`` turns into the 4xx answer.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import litserve as ls
import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from starlette.responses import JSONResponse

from explainer.explainers.explanation import Explanation, assemble, choose_classes, to_image_size, to_input_size
from explainer.explainers.export import export_onnx
from explainer.explainers.loading import load
from explainer.serving.decoding import DEFAULT_MAX_IMAGE_PIXELS, decode_image, encode_mask
from explainer.serving.schema import RequestError, parse_request

logger = logging.getLogger(__name__)


@dataclass
class Decoded:
    """One request ready for the batched forward pass: the image at the input size and its own size."""

    x: torch.Tensor  # (3, S, S) float RGB in [0, 1]
    size: tuple[int, int]  # (H, W) of the image as sent
    classes: tuple[int, ...] | None
    top_k: int | None
    format: str
    trust: bool = False


@dataclass
class Explained:
    """One request's share of a batch: probabilities of all classes, masks (at the input size) of the chosen ones."""

    size: tuple[int, int]
    probabilities: np.ndarray  # (C,)
    selected: list[int]
    masks: torch.Tensor  # (K, S, S) in [0, 1]
    format: str
    trust: dict[str, list[float]] | None = None  # "trust", "keep", "remove": one value per mask, when asked


@dataclass
class Rejected:
    """A request refused while decoding: answered with ``status`` and ``message``, skipped by the model."""

    status: int
    message: str


def select_classes(probabilities: np.ndarray, classes: Sequence[int] | None, top_k: int | None) -> list[int]:
    """The classes to answer: those asked for, the top_k most probable (ties by index), or all
    (:func:`explainer.explainers.explanation.choose_classes` for one image)."""
    p = torch.as_tensor(np.asarray(probabilities))[None]
    return choose_classes(p, [None if classes is None else list(classes)], [top_k])[0].tolist()


def build_response(out: Explained, class_names: Sequence[str], png_compress_level: int = 1) -> dict:
    """The JSON answer: size, every class's probability, and one entry per requested mask."""
    full = to_image_size(out.masks, out.size).numpy()
    masks = [{"class": class_names[c], "index": int(c), "area": float(m.mean()),
              "mask": encode_mask(m, out.format, png_compress_level)} for c, m in zip(out.selected, full)]
    for k, entry in enumerate(masks if out.trust else []):
        entry.update({name: float(values[k]) for name, values in out.trust.items()})
    return {"size": [int(out.size[0]), int(out.size[1])],
            "probabilities": {n: float(p) for n, p in zip(class_names, out.probabilities)},
            "masks": masks}


def batch_stats(counts: Sequence[int]) -> dict:
    """Counts of forward passes by batch size (``counts[n]`` = passes of n images) as /info reports them."""
    hist = {str(n): int(c) for n, c in enumerate(counts) if c}
    return {"forward_passes": int(sum(counts)), "images": int(sum(n * c for n, c in enumerate(counts))),
            "largest": max((n for n, c in enumerate(counts) if c), default=0), "by_size": hist}


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
        backend: "torch" (``explanation()``) or "onnx" (ONNX Runtime on ``graphs``).
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
        # Pillow's own bomb guard (an error above twice its limit) follows --max-image-pixels in this worker, so
        # that a larger limit is honoured and a larger image is refused by decode_image, naming the flag
        Image.MAX_IMAGE_PIXELS = self.max_image_pixels
        if self.threads:
            torch.set_num_threads(int(self.threads))
        self.torch_device = torch.device(device)
        if self.backend == "torch":
            self.module = load(self.checkpoint, explanandum=self.explanandum_spec, map_location=self.torch_device)
            # the classifier runs faster channels-last on CPU (probabilities equal within 1e-5)
            self.module.explanandum.model.to(memory_format=torch.channels_last)
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
        if req.trust and self.backend != "torch":
            return Rejected(422, "trust: computed by the torch backend only; this server runs the "
                                 f"{self.backend!r} backend (start it with --backend torch)")
        return Decoded(to_input_size(x[None], self.input_size)[0], tuple(x.shape[-2:]), req.classes, req.top_k,
                       req.format, req.trust)

    def batch(self, inputs):
        return list(inputs)

    def explain_batch(self, x: torch.Tensor, classes: list, top_k: list, trust: bool = False) -> Explanation:
        """Images (B, 3, S, S) -> their :class:`Explanation` at the input size (masks (K_i, S, S)), on the CPU;
        with each mask's trust when ``trust`` (torch backend)."""
        if self.backend == "torch":
            return self.module.explanation(x, classes=classes, top_k=top_k, trust=trust, size=self.input_size)
        feed = {"images": x.numpy()}
        masks, probs = (torch.from_numpy(s.run(None, feed)[0]) for s in self.sessions)
        chosen = choose_classes(probs, classes, top_k)
        size = tuple(x.shape[-2:])
        return assemble([m[c] for m, c in zip(masks, chosen)], chosen, probs, [size] * len(chosen), batched=False)

    def predict(self, x, **kwargs):
        single = not isinstance(x, list)  # max_batch_size 1: LitServe passes one request
        items = [x] if single else x
        ok = [it for it in items if isinstance(it, Decoded)]
        if ok:
            e = self.explain_batch(torch.stack([it.x for it in ok]), [it.classes for it in ok],
                                   [it.top_k for it in ok], trust=any(it.trust for it in ok))
            with self.batch_counts.get_lock():
                self.batch_counts[len(ok)] += 1
            logger.debug("forward pass of %d image(s)", len(ok))
            done = iter(Explained(it.size, e.probabilities[j].cpu().numpy(), e.classes[j].tolist(),
                                  e.masks[j].cpu(), it.format,
                                  {k: getattr(e, k)[j].tolist() for k in ("trust", "keep", "remove")}
                                  if it.trust else None) for j, it in enumerate(ok))
            items = [next(done) if isinstance(it, Decoded) else it for it in items]
        return items[0] if single else items

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output, **kwargs):
        if isinstance(output, Rejected):
            return JSONResponse({"detail": output.message}, status_code=output.status)
        # serialised here: the API server passes the bytes on instead of re-encoding a dict
        return JSONResponse(build_response(output, self.class_names, self.png_compress_level))
