"""The server: its settings (stated once, :class:`ServeSettings`; each is a flag of ``python -m explainer serve``)
and the LitServer of an explainer checkpoint (:func:`build_server`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

import litserve as ls
import torch
from starlette.middleware.gzip import GZipMiddleware

from explainer.core.constants import VERSION
from explainer.explainers.explanation import input_resolution
from explainer.explainers.loading import load
from explainer.serving.api import ExplanationAPI, batch_stats, onnx_graphs
from explainer.serving.decoding import DEFAULT_MAX_IMAGE_PIXELS
from explainer.serving.guard import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_REQUEST_BYTES, BodyGuard
from explainer.serving.schema import MASK_FORMATS


def _setting(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class ServeSettings:
    """How the server runs: every field is a flag of ``python -m explainer serve`` (``--max-batch-size`` or
    ``--max_batch_size``), with the help text below."""

    host: str = _setting("127.0.0.1", "127.0.0.1 (this machine only) or 0.0.0.0")
    port: int = _setting(8000, "TCP port")
    max_batch_size: int = _setting(32, "requests per forward pass, at most")
    batch_timeout: float = _setting(0.01, "seconds to wait for a batch to fill")
    backend: Literal["torch", "onnx"] = _setting("torch", "torch, or ONNX Runtime on graphs exported at start-up")
    workers_per_device: int = _setting(1, "inference worker processes per device")
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = _setting("auto", "where the workers run")
    max_image_pixels: int = _setting(DEFAULT_MAX_IMAGE_PIXELS, "larger images are refused with 413")
    max_request_bytes: int = _setting(DEFAULT_MAX_REQUEST_BYTES, "larger request bodies are refused with 413")
    body_timeout: float = _setting(DEFAULT_BODY_TIMEOUT, "seconds a client has to send its whole request body; "
                                                         "a slower one gets 408 and its connection is closed")
    input_size: int | None = _setting(None, "resolution fed to the explainer (default: trained)")
    explanandum: str | None = _setting(None, "override the classifier spec of the checkpoint")
    timeout: float = _setting(30.0, "seconds a request may wait for its answer")
    threads: int | None = _setting(None, "torch / ONNX Runtime threads per worker (default on CPU: cores / workers)")
    png_compress_level: int = _setting(1, "zlib level of PNG masks, 0..9")
    fast_queue: bool = _setting(False, "answers go back over ZeroMQ (LitServe)")
    gzip: bool = _setting(False, "gzip answers when clients accept it")
    num_api_servers: int | None = _setting(None, "HTTP processes (default: one per worker)")
    log_level: Literal["debug", "info", "warning", "error"] = _setting("info", "server log level")
    access_log: bool = _setting(False, "log every request")

    def __post_init__(self):
        for name, lo in (("max_batch_size", 1), ("workers_per_device", 1), ("max_image_pixels", 1),
                         ("max_request_bytes", 1), ("port", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
        for name in ("batch_timeout", "timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected seconds >= 0, got {getattr(self, name)!r}")
        if not self.body_timeout > 0:
            raise ValueError(f"body_timeout: expected seconds > 0, got {self.body_timeout!r}")


def build_server(checkpoint: str | os.PathLike, settings: ServeSettings | None = None, **changes) -> ls.LitServer:
    """A LitServer for an explainer checkpoint (loaded here once to fail early and describe it in /info);
    ``changes`` replace fields of ``settings`` (default :class:`ServeSettings`)."""
    s = dataclasses.replace(settings or ServeSettings(), **changes)
    threads = s.threads
    if threads is None and s.accelerator in ("auto", "cpu") and not torch.cuda.is_available():
        threads = max(1, (os.cpu_count() or 1) // s.workers_per_device)  # the workers share the cores
    module = load(checkpoint, explanandum=s.explanandum)
    size = input_resolution(module, s.input_size)
    f = module.explanandum
    info = {"classes": list(f.class_names), "num_classes": f.num_classes, "input_size": size,
            "explanandum_fingerprint": module.explanandum_fingerprint, "explanandum": f.spec,
            "kind": getattr(module, "kind", type(module).__name__), "version": VERSION,
            "backend": s.backend, "max_batch_size": s.max_batch_size, "batch_timeout": s.batch_timeout,
            "workers_per_device": s.workers_per_device, "threads": threads, "max_image_pixels": s.max_image_pixels,
            "max_request_bytes": s.max_request_bytes, "body_timeout": s.body_timeout,
            "mask_formats": list(MASK_FORMATS)}
    graphs = onnx_graphs(module, size) if s.backend == "onnx" else None
    del module
    api = ExplanationAPI(str(checkpoint), info, backend=s.backend, graphs=graphs, explanandum=s.explanandum,
                         max_image_pixels=s.max_image_pixels, png_compress_level=s.png_compress_level,
                         threads=threads, max_batch_size=s.max_batch_size, batch_timeout=s.batch_timeout)
    guard = {"path": api.api_path, "max_bytes": s.max_request_bytes, "body_timeout": s.body_timeout}
    server = ls.LitServer(api, accelerator=s.accelerator, workers_per_device=s.workers_per_device, timeout=s.timeout,
                          info_path="/server-info", fast_queue=s.fast_queue, middlewares=[(BodyGuard, guard)])

    async def info_endpoint() -> dict:
        return {**api.info, "batches": batch_stats(api.batch_counts[:])}

    server.app.add_api_route("/info", info_endpoint, methods=["GET"])
    if not s.gzip:  # LitServe gzips answers by default: CPU for little gain, PNG masks are compressed already
        server.app.user_middleware = [m for m in server.app.user_middleware if m.cls is not GZipMiddleware]
    return server
