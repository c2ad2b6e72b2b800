"""Shared fixtures: tiny explananda and a tiny synthetic VOC tree (made, never downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import explainer  # noqa: E402
from explainer.data import synthetic  # noqa: E402


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory):
    """A 48-image synthetic VOC tree at 64 px."""
    root = tmp_path_factory.mktemp("voc") / "VOC2007"
    synthetic.generate(root, {"train": 24, "val": 12, "test": 12}, seed=0, image_size=64)
    return root


@pytest.fixture(scope="session")
def tiny_cnn():
    """A randomly initialised tiny ResNet explanandum with 4 classes (multi-label)."""
    torch.manual_seed(0)
    return explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=4, multilabel=True)


@pytest.fixture(scope="session")
def tiny_vit():
    """A randomly initialised tiny ViT explanandum (patch 8, 32 px input), 4 classes."""
    torch.manual_seed(0)
    import timm

    m = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, depth=2,
                          embed_dim=48, num_heads=3)
    return explainer.load_explanandum(m, class_names=[f"c{i}" for i in range(4)])


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: the many tiny ops of the method tests run faster without thread hand-offs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def explain_server(tmp_path_factory):
    """``python -m explainer serve`` of the committed synthetic explainer on 127.0.0.1, one thread,
    ``--body-timeout 1``: (url, port). Shared by the tests of explanation() and of the server's limits."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_port, stop, wait_healthy

    root = Path(__file__).resolve().parents[1]
    log = tmp_path_factory.mktemp("explain_server") / "server.log"
    port = free_port()
    cmd = [sys.executable, "-m", "explainer", "serve", "--checkpoint",
           str(root / "checkpoints" / "synthetic_explainer.safetensors"), "--host", "127.0.0.1", "--port", str(port),
           "--body-timeout", "1", "--threads", "1", "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        yield url, port
    finally:
        stop(proc)
