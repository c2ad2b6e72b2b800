"""Issue 22, item 4: the shards of an ``attribute`` cache are verified (size and sha256 in the manifest, a digest
inside each shard); a resumed run computes a damaged shard again and says so; every cache error names the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_classifier
from safetensors.torch import load_file, save_file

from explainer.explainers.cache import MANIFEST, MapCache, read_manifest, shard_path
from explainer.pipelines.attribute import main

SHARDS = 3  # 12 val images, 4 a shard


@pytest.fixture(scope="module")
def made(tiny_voc, tmp_path_factory):
    """A complete saliency cache of the val split (kept pristine; tests work on copies)."""
    d = tmp_path_factory.mktemp("integrity")
    clf = tiny_classifier(d / "tiny.safetensors")
    cfg = d / "data.yaml"
    cfg.write_text(json.dumps({"data": {"class_path": "explainer.data.VOCDataModule",
                                        "init_args": {"root": str(tiny_voc), "image_size": 64, "num_workers": 0}}}))
    argv = ["--method", "saliency", "--data", str(cfg), "--split", "val", "--explanandum", str(clf),
            "--shard_size", "4", "--progress", "false", "--out"]
    assert main(argv + [str(d / "cache")]) == 0
    return d / "cache", argv


def copy(made, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(made[0], out)
    return out


def rerun(made, out: Path, capsys) -> str:
    capsys.readouterr()
    assert main(made[1] + [str(out)]) == 0
    return capsys.readouterr().err


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_shards(a: Path, b: Path) -> bool:
    for k in range(SHARDS):
        x, y = tensors(shard_path(a, k)), tensors(shard_path(b, k))
        if x.keys() != y.keys() or not all(torch.equal(x[t], y[t]) for t in x):
            return False
    return True


def drop_table(out: Path) -> None:
    """The manifest without its ``shards`` table: as a killed run or a cache from before the checksums leaves it."""
    man = read_manifest(out)
    del man["shards"]
    (out / MANIFEST).write_text(json.dumps(man))


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_records_size_and_sha256_of_every_shard(made):
    import hashlib

    table = read_manifest(made[0])["shards"]
    assert sorted(table) == [shard_path(made[0], k).name for k in range(SHARDS)]
    for name, rec in table.items():
        data = (made[0] / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_truncated_shard_is_computed_again_on_resume(made, tmp_path, capsys):
    """The issue's case: `truncate -s 1000 shard-00001`, the same command again: named on stderr, recomputed."""
    out = copy(made, tmp_path)
    broken = shard_path(out, 1)
    with broken.open("r+b") as fh:
        fh.truncate(1000)
    untouched = shard_path(out, 2).stat().st_mtime_ns
    err = rerun(made, out, capsys)
    assert str(broken) in err and "damaged" in err and "computing it again" in err
    assert same_shards(out, made[0])
    assert shard_path(out, 2).stat().st_mtime_ns == untouched  # sound shards are not rewritten
    assert read_manifest(out)["shards"] == read_manifest(made[0])["shards"]
    assert len(MapCache(out)) == len(MapCache(made[0]))


def test_flipped_byte_is_found_by_manifest_and_by_the_shard_digest(made, tmp_path, capsys):
    """Same size, one byte changed in the maps: the manifest's sha256 catches it; without the manifest's table
    (a run killed before its end writes none) the digest stored in the shard does."""
    out = copy(made, tmp_path)
    flip_byte(shard_path(out, 0))
    with pytest.raises(ValueError, match=f"{shard_path(out, 0)}.*sha256 differs"):
        MapCache(out)
    drop_table(out)
    with pytest.raises(ValueError, match=f"{shard_path(out, 0)}.*does not match the sha256 written with it"):
        MapCache(out)
    err = rerun(made, out, capsys)
    assert str(shard_path(out, 0)) in err and "damaged" in err
    assert same_shards(out, made[0])
    MapCache(out)


def test_cache_errors_name_the_file(made, tmp_path):
    out = copy(made, tmp_path)
    with shard_path(out, 2).open("r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ValueError, match=f"{shard_path(out, 2)}.*1000 bytes, the manifest records"):
        MapCache(out)
    drop_table(out)
    with pytest.raises(ValueError, match=f"{shard_path(out, 2)}.*truncated or corrupt"):
        MapCache(out)
    shard_path(out, 2).write_bytes(b"")
    with pytest.raises(ValueError, match=f"{shard_path(out, 2)}.*truncated or corrupt"):
        MapCache(out)
    (out / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{out / MANIFEST}.*format"):
        MapCache(out)
    man = read_manifest(made[0])
    del man["image_ids"]
    (out / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ValueError, match=f"{out / MANIFEST}.*image_ids"):
        MapCache(out)


def test_old_cache_without_checksums_loads_and_resumes(made, tmp_path, capsys):
    """A cache written before checksums (no sha256 in the shards, no table in the manifest) still loads, resumes
    without recomputing, and a truncated shard of it is still found."""
    out = copy(made, tmp_path)
    for k in range(SHARDS):
        save_file(tensors(shard_path(out, k)), str(shard_path(out, k)))  # no metadata
    drop_table(out)
    old, new = MapCache(out), MapCache(made[0])
    assert old.entries.keys() == new.entries.keys()
    assert all(torch.equal(old.entries[i][1], new.entries[i][1]) for i in old.entries)
    stamps = [shard_path(out, k).stat().st_mtime_ns for k in range(SHARDS)]
    assert rerun(made, out, capsys) == ""
    assert [shard_path(out, k).stat().st_mtime_ns for k in range(SHARDS)] == stamps
    save_file(tensors(shard_path(out, 1)), str(shard_path(out, 1)))
    with shard_path(out, 1).open("r+b") as fh:
        fh.truncate(1000)
    drop_table(out)
    assert str(shard_path(out, 1)) in rerun(made, out, capsys)
    assert same_shards(out, made[0])
