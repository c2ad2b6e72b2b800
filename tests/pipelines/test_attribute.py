"""python -m explainer attribute: sharded, distributed, resumable caches of a method's maps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import minmax_per_map, tiny_classifier
from safetensors.torch import load_file

import explainer
from explainer.data import synthetic
from explainer.explainers.cache import MapCache, read_manifest, shard_path
from explainer.pipelines.attribute import attribute

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tiny_voc, tmp_path_factory):
    d = tmp_path_factory.mktemp("attr")
    clf = tiny_classifier(d / "tiny.safetensors")
    data = {"class_path": "explainer.data.VOCDataModule",
            "init_args": {"root": str(tiny_voc), "image_size": 64, "num_workers": 0}}
    cfg = d / "data.yaml"
    cfg.write_text(json.dumps({"data": data}))
    return d, str(clf), cfg


def shards(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(out.glob("shard-*.safetensors"))}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][t], b[k][t]) for t in a[k]) for k in a)


def test_cache_holds_the_method_maps(setup, tiny_voc, tmp_path):
    """Each stored map equals the method's own map of that (image, class), min-max normalised (fp16)."""
    d, clf, cfg = setup
    man = attribute("gradcam", str(cfg), "test", tmp_path / "c", explanandum=clf, shard_size=5, progress=False)
    assert man["num_shards"] == 3 and len(man["image_ids"]) == 12
    cache = MapCache(tmp_path / "c", fingerprint=man["explanandum"]["fingerprint"])
    dm = explainer.data.VOCDataModule(root=str(tiny_voc), image_size=64, num_workers=0)
    ds = dm.dataset("test", train_transform=False)
    f = explainer.load_explanandum(clf)
    m = explainer.methods.get("gradcam", f)
    n_pairs = 0
    for i in range(len(ds)):
        s = ds[i]
        present = (s["labels"] > 0.5).nonzero().flatten()
        if not len(present):
            continue
        classes, maps = cache.get(s["id"])
        assert classes.tolist() == present.tolist()
        ref = m.attribute(s["image"][None].expand(len(present), -1, -1, -1), present)[:, 0]
        ref = minmax_per_map(ref)
        assert (maps - ref).abs().max() < 2e-3  # fp16 storage
        n_pairs += len(present)
    assert n_pairs > 0


def test_two_processes_write_exactly_the_maps_of_one(setup, tmp_path):
    """Bit for bit: each of the 2 DDP processes runs 1 torch thread (Lightning's split of the 2 cores), so the
    single process does too (a thread count changes float summation order)."""
    d, clf, cfg = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        attribute("saliency", str(cfg), "train", tmp_path / "one", explanandum=clf, shard_size=4, dtype="uint8",
                  progress=False)
    finally:
        torch.set_num_threads(threads)
    attribute("saliency", str(cfg), "train", tmp_path / "two", explanandum=clf, shard_size=4, dtype="uint8",
              progress=False, trainer={"devices": 2, "strategy": "ddp_spawn"})
    one, two = shards(tmp_path / "one"), shards(tmp_path / "two")
    assert len(one) == 6 and same(one, two)


def test_killed_run_resumes_to_the_uninterrupted_result(setup, tmp_path):
    """A real SIGKILL mid-run, then the same command: the cache equals an uninterrupted run's, no temp left."""
    d, clf, cfg = setup
    cmd = [sys.executable, "-m", "explainer", "attribute", "--method", "occlusion", "--options",
           '{"window": 8, "stride": 4}', "--data", str(cfg), "--split", "train", "--explanandum", clf,
           "--shard_size", "2", "--progress", "false", "--out"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full = subprocess.run(cmd + [str(tmp_path / "full")], env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("shard-*.safetensors"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(out.glob("shard-*.safetensors")))
    assert 2 <= n_before < 12, "the run must be killed part-way (make the method slower if this fails)"
    again = subprocess.run(cmd + [str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert same(shards(out), shards(tmp_path / "full"))
    assert not list(out.glob(".*tmp"))


def test_cache_of_another_explanandum_or_settings_is_refused(setup, tmp_path):
    d, clf, cfg = setup
    out = tmp_path / "c"
    attribute("saliency", str(cfg), "val", out, explanandum=clf, shard_size=6, progress=False)
    torch.manual_seed(1)
    other = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=len(synthetic.CLASSES),
                                       multilabel=True, class_names=list(synthetic.CLASSES))
    other_path = explainer.save_explanandum(other, d / "other.safetensors")
    with pytest.raises(ValueError, match="another explanandum"):
        attribute("saliency", str(cfg), "val", out, explanandum=str(other_path), shard_size=6, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        attribute("saliency", str(cfg), "val", out, explanandum=clf, shard_size=3, progress=False)
    with pytest.raises(ValueError, match="another classifier"):
        MapCache(out, fingerprint="0" * 16)
    shard_path(out, 1).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        MapCache(out)
    assert read_manifest(out)["method"] == "saliency"
