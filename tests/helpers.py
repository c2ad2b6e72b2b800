"""Small builders shared by the tests: tiny explananda and explainers, images, a served explainer."""

import base64
import io
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import explainer

TINY_DECODER = {"decoder_channels": [32, 16, 16, 8, 8]}


def tiny_classifier(path: Path, num_classes: int = 8, seed: int = 0) -> Path:
    """A random tiny ResNet explanandum saved as a project safetensors checkpoint."""
    torch.manual_seed(seed)
    from explainer.data.synthetic import CLASSES

    f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=num_classes, multilabel=True,
                                   class_names=list(CLASSES)[:num_classes])
    return explainer.save_explanandum(f, path)


def minmax_per_map(ref: torch.Tensor) -> torch.Tensor:
    """Plain per-map min-max normalisation of (N, H, W) maps, a constant map to zeros (what the map cache stores,
    written out again for the tests)."""
    lo = ref.flatten(1).min(1).values.view(-1, 1, 1)
    hi = ref.flatten(1).max(1).values.view(-1, 1, 1)
    return torch.where(hi - lo > 1e-6 * hi.abs(), (ref - lo) / (hi - lo), torch.zeros_like(ref))


def tiny_explainer_kwargs(clf: Path, **over) -> dict:
    kw = dict(explanandum=str(clf), architecture="Unet", encoder="tu-explainer_resnet_tiny",
              decoder_kwargs=TINY_DECODER, lr=1e-3, log_images=2, area_min=0.01, area_max=0.1)
    kw.update(over)
    return kw


# ---- images and a served explainer (tests of the server and of explanation()) ----
def png(a: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, **kw).save(buf, format="PNG")
    return buf.getvalue()


def noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (LitServe shuts its workers down), then SIGKILL whatever is left of the process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the server started above (start_new_session)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
