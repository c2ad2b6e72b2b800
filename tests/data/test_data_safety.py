"""Issue 14, data side: nothing lost (generator trees), nothing silently wrong (images, splits, annotations)."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explainer.data import COCODataModule, FolderDataModule, SyntheticDataModule, VOCDataModule, base, synthetic
from explainer.data.base import read_rgb
from explainer.pipelines.evaluate import build_dataset

SMALL = {"train": 4, "val": 2, "test": 2}
WHITE = (255, 255, 255)  # the documented background of transparent pixels


def _files(root: Path, skip=()) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in skip}


# ------------------------------------------------------- generator trees --
def test_foreign_folder_is_refused_and_kept(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not written by it"):
            synthetic.generate(root, SMALL, seed=0, image_size=32, overwrite=overwrite)
        with pytest.raises(FileExistsError, match="not written by it"):
            SyntheticDataModule(root=str(root), num_images=SMALL, image_size=32, overwrite=overwrite).prepare_data()
    assert [p.name for p in root.iterdir()] == ["thesis.tex"]
    assert (root / "thesis.tex").read_text() == "years of work"
    # an empty folder is fine to fill
    empty = tmp_path / "empty"
    empty.mkdir()
    synthetic.generate(empty, SMALL, seed=0, image_size=32)
    assert json.loads((empty / "synthetic.json").read_text())["complete"] is True


def test_matching_tree_is_reused_as_is(tmp_path):
    root = synthetic.generate(tmp_path / "syn", SMALL, seed=2, image_size=32)
    (root / "notes.txt").write_text("mine")
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")}
    for overwrite in (False, True):  # nothing to replace: overwrite does not regenerate a matching tree
        assert synthetic.generate(root, SMALL, seed=2, image_size=32, overwrite=overwrite) == root
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")} == before


def test_other_settings_are_an_error_and_overwrite_deletes_only_listed_files(tmp_path):
    root = synthetic.generate(tmp_path / "syn", SMALL, seed=3, image_size=32)
    (root / "notes.txt").write_text("mine")
    (root / "JPEGImages" / "extra.jpg").write_bytes(b"my own picture")
    (root / "mine").mkdir()
    before = _files(root)
    with pytest.raises(FileExistsError, match=r"seed=3 \(requested 0\).*overwrite=True"):
        synthetic.generate(root, SMALL, seed=0, image_size=32)
    with pytest.raises(FileExistsError, match=r"image_size=32 \(requested 48\); counts="):
        synthetic.generate(root, {"train": 5, "val": 2, "test": 2}, seed=3, image_size=48)
    assert _files(root) == before
    # what evaluate does with the configured datamodule: an error, not a silent seed-0 regeneration
    cfg = {"class_path": "explainer.data.SyntheticDataModule",
           "init_args": {"root": str(root), "num_images": SMALL, "image_size": 32, "num_workers": 0}}
    with pytest.raises(FileExistsError, match=r"seed=3 \(requested 0\)"):
        build_dataset(cfg, "test", None, 0)
    assert _files(root) == before

    cfg["init_args"]["overwrite"] = True
    build_dataset(cfg, "test", None, 0)
    fresh = synthetic.generate(tmp_path / "fresh", SMALL, seed=0, image_size=32)
    assert _files(root, skip={"notes.txt", "JPEGImages/extra.jpg"}) == _files(fresh)
    assert (root / "notes.txt").read_text() == "mine"
    assert (root / "JPEGImages" / "extra.jpg").read_bytes() == b"my own picture"
    assert (root / "mine").is_dir()


def test_overwrite_refuses_to_land_on_a_file_it_did_not_write(tmp_path):
    root = synthetic.generate(tmp_path / "syn", SMALL, seed=0, image_size=32)
    stranger = root / "JPEGImages" / "0000004.jpg"  # the name the 5th train image would get
    stranger.write_bytes(b"not the generator's")
    before = _files(root)
    with pytest.raises(FileExistsError, match="0000004.jpg"):
        synthetic.generate(root, {"train": 5, "val": 2, "test": 2}, seed=0, image_size=32, overwrite=True)
    assert _files(root) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".syn.")]  # no temporary tree left


def test_interrupted_replacement_is_refused_then_repaired(tmp_path, monkeypatch):
    root = synthetic.generate(tmp_path / "syn", SMALL, seed=1, image_size=32)
    (root / "notes.txt").write_text("mine")  # forces the file-by-file move, the non-atomic path
    real_replace, calls = os.replace, []

    def dies_on_second_call(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the 1st writes the 'incomplete' manifest, the 2nd moves a new file in
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(root, SMALL, seed=0, image_size=32, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((root / "synthetic.json").read_text())["complete"] is False
    with pytest.raises(FileExistsError, match="interrupted"):
        synthetic.generate(root, SMALL, seed=0, image_size=32)
    synthetic.generate(root, SMALL, seed=0, image_size=32, overwrite=True)
    fresh = synthetic.generate(tmp_path / "fresh", SMALL, seed=0, image_size=32)
    assert _files(root, skip={"notes.txt"}) == _files(fresh)
    assert (root / "notes.txt").read_text() == "mine"


def test_concurrent_generation_of_the_same_tree(tmp_path, monkeypatch):
    """Two processes (two nodes' prepare_data) generating one tree: the second finds the first's and keeps it."""
    real_write, root = synthetic._write_tree, tmp_path / "syn"

    def another_process_finishes_first(*a, **k):
        real_write(*a, **k)
        if not root.exists():
            monkeypatch.setattr(synthetic, "_write_tree", real_write)
            synthetic.generate(root, SMALL, seed=0, image_size=32)

    monkeypatch.setattr(synthetic, "_write_tree", another_process_finishes_first)
    synthetic.generate(root, SMALL, seed=0, image_size=32)
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]
    assert _files(root) == _files(synthetic.generate(tmp_path / "fresh", SMALL, seed=0, image_size=32))


def test_missing_listed_files_are_reported(tmp_path):
    root = synthetic.generate(tmp_path / "syn", SMALL, seed=0, image_size=32)
    (root / "Annotations" / "0000001.xml").unlink()
    with pytest.raises(FileExistsError, match=r"1 of the \d+ files.*Annotations/0000001.xml"):
        SyntheticDataModule(root=str(root), num_images=SMALL, image_size=32).prepare_data()
    SyntheticDataModule(root=str(root), num_images=SMALL, image_size=32, overwrite=True).prepare_data()
    assert (root / "Annotations" / "0000001.xml").is_file()


def test_manifest_lists_what_was_written_and_older_trees_are_recognised(tmp_path):
    root = synthetic.generate(tmp_path / "syn", SMALL, seed=0, image_size=32)
    meta = json.loads((root / "synthetic.json").read_text())
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert meta["files"] == [f for f in on_disk if f != "synthetic.json"]
    assert meta["dirs"] == sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir())
    assert meta["version"] == synthetic.VERSION and meta["seed"] == 0 and meta["counts"] == SMALL
    # a tree written before manifests listed files (and versions): its files are this version's names
    legacy = {k: v for k, v in meta.items() if k not in ("files", "dirs", "version", "complete")}
    (root / "synthetic.json").write_text(json.dumps(legacy))
    (root / "notes.txt").write_text("mine")
    synthetic.generate(root, SMALL, seed=0, image_size=32)  # reused
    assert json.loads((root / "synthetic.json").read_text()) == legacy
    synthetic.generate(root, SMALL, seed=5, image_size=32, overwrite=True)
    fresh = synthetic.generate(tmp_path / "fresh", SMALL, seed=5, image_size=32)
    assert _files(root, skip={"notes.txt"}) == _files(fresh)


def test_failed_or_killed_generation_leaves_no_tree(tmp_path, monkeypatch):
    real_render, n = synthetic.render, []

    def fails_on_third(*a, **k):
        n.append(1)
        if len(n) == 3:
            raise RuntimeError("disk full")
        return real_render(*a, **k)

    monkeypatch.setattr(synthetic, "render", fails_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.generate(tmp_path / "syn", SMALL, seed=0, image_size=32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "render", real_render)

    # SIGKILL mid-generation: root never appears half-written
    code = "import sys; from explainer.data import synthetic; synthetic.generate(sys.argv[1], 3000, image_size=32)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "syn")], env=os.environ.copy())
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".syn.")]
            if tmps and len(list((tmps[0] / "JPEGImages").glob("*.jpg"))) >= 5:
                break
            assert proc.poll() is None, "the generator ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the generator wrote no image in 60 s")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "syn").exists()
    synthetic.generate(tmp_path / "syn", SMALL, seed=0, image_size=32)
    assert json.loads((tmp_path / "syn" / "synthetic.json").read_text())["complete"] is True


# ------------------------------------------------ high bit depth, alpha --
def _png16(path: Path, arr: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit RGB(A))."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _scaled(v, top) -> int:
    """round(v * 255 / top), exactly."""
    return int(Fraction(int(v) * 255, int(top)) + Fraction(1, 2))


def _over_white(c, a) -> int:
    return int(Fraction(int(c) * int(a) + WHITE[0] * (255 - int(a)), 255) + Fraction(1, 2))


def _grey_expected(v, top):
    out = np.array([[_scaled(x, top) for x in row] for row in v], np.uint8)
    return np.repeat(out[..., None], 3, axis=2)


@pytest.fixture
def rng():
    return np.random.default_rng(14)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, rng):
    v = rng.integers(0, 2 ** 16, (5, 7)).astype(np.uint16)
    v[0, 0], v[0, 1] = 0, 65535
    Image.fromarray(v).save(tmp_path / "g.png")  # Pillow: mode I;16
    Image.fromarray(v.astype(">u2")).save(tmp_path / "g.tif")  # Pillow: mode I;16B
    # binary PGM, 16-bit samples (Pillow: mode I)
    (tmp_path / "g.pgm").write_bytes(b"P5\n7 5\n65535\n" + v.astype(">u2").tobytes())
    for name in ("g.png", "g.tif", "g.pgm"):
        out = read_rgb(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
        np.testing.assert_array_equal(out, _grey_expected(v, 65535), err_msg=name)
    # 32-bit signed integer TIFF: scaled by its own white level, 2**31 - 1
    w = rng.integers(0, 2 ** 31 - 1, (5, 7)).astype(np.int32)
    Image.fromarray(w).save(tmp_path / "i.tif")
    np.testing.assert_array_equal(read_rgb(tmp_path / "i.tif"), _grey_expected(w, 2 ** 31 - 1))
    # a 16-bit PNG's colour key is transparency too
    Image.fromarray(v).save(tmp_path / "k.png", transparency=int(v[2, 3]))
    np.testing.assert_array_equal(read_rgb(tmp_path / "k.png")[v == v[2, 3]], 255)


def test_float_greyscale(tmp_path, rng):
    f = rng.random((4, 6)).astype(np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    expected = np.array([[int(Fraction(float(x)) * 255 + Fraction(1, 2)) for x in row] for row in f], np.uint8)
    np.testing.assert_array_equal(read_rgb(tmp_path / "f.tif")[..., 1], expected)
    Image.fromarray(f * 1000).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"big.tif.*floating-point.*expected values in \[0, 1\]"):
        read_rgb(tmp_path / "big.tif")


def test_16_bit_colour_png_is_its_high_byte(tmp_path, rng):
    v = rng.integers(0, 2 ** 16, (4, 5, 3)).astype(np.uint16)
    _png16(tmp_path / "rgb.png", v, 2)
    out = read_rgb(tmp_path / "rgb.png")
    np.testing.assert_array_equal(out, v >> 8)
    exact = np.vectorize(lambda x: _scaled(x, 65535))(v)
    assert np.abs(out.astype(int) - exact).max() <= 1
    va = rng.integers(0, 2 ** 16, (4, 5, 4)).astype(np.uint16)
    _png16(tmp_path / "rgba.png", va, 6)
    hi = va >> 8
    expected = np.vectorize(_over_white)(hi[..., :3], hi[..., 3:4].repeat(3, axis=2))
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png"), expected)


def test_alpha_is_composited_on_white(tmp_path, rng):
    rgba = rng.integers(0, 256, (6, 5, 4)).astype(np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    expected = np.vectorize(_over_white)(rgba[..., :3], rgba[..., 3:4].repeat(3, axis=2))
    out = read_rgb(tmp_path / "rgba.png")
    np.testing.assert_array_equal(out, expected)
    assert getattr(base, "ALPHA_BACKGROUND", None) == WHITE
    assert (out[0, 0] == WHITE).all() and (out[0, 1] == rgba[0, 1, :3]).all()

    la = rng.integers(0, 256, (6, 5, 2)).astype(np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    expected = np.vectorize(_over_white)(la[..., :1].repeat(3, axis=2), la[..., 1:2].repeat(3, axis=2))
    np.testing.assert_array_equal(read_rgb(tmp_path / "la.png"), expected)

    idx = rng.integers(0, 4, (6, 5)).astype(np.uint8)
    pal = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250], [10, 20, 30]], np.uint8)
    alpha = np.array([0, 128, 255, 64], np.uint8)
    p = Image.fromarray(idx, mode="P")
    p.putpalette(pal.ravel().tolist())
    p.save(tmp_path / "p.png", transparency=alpha.tobytes())
    expected = np.vectorize(_over_white)(pal[idx], alpha[idx][..., None].repeat(3, axis=2))
    np.testing.assert_array_equal(read_rgb(tmp_path / "p.png"), expected)


def test_dataset_readers_scale_16_bit_images(tmp_path, rng):
    v = rng.integers(0, 2 ** 16, (16, 16)).astype(np.uint16)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for k in range(10):
            Image.fromarray(v).save(tmp_path / c / f"{k}.png")
    dm = FolderDataModule(root=str(tmp_path), image_size=None, augment=False, num_workers=0)
    img = dm.dataset("train")[0]["image"]
    np.testing.assert_array_equal((img.numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0),
                                  _grey_expected(v, 65535))


# ----------------------------------------------------------------- splits --
def _tiny_coco(root: Path, bad: bool = False) -> Path:
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for k in range(4):
        Image.new("RGB", (20, 10), (40 * k, 0, 0)).save(root / "val2014" / f"{k}.jpg")
        images.append({"id": k, "file_name": f"{k}.jpg", "width": 20, "height": 10})
        anns.append({"id": 100 + k, "image_id": k, "category_id": 1, "iscrowd": 0, "area": 16, "bbox": [2, 2, 4, 4],
                     "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]})
    if bad:
        anns[1]["segmentation"] = [[2, 2, 6, 6]]  # 2 points: pycocotools would read it as a box
        anns[2]["segmentation"] = {"size": [99, 20], "counts": "abc"}
        anns[3]["iscrowd"] = 2
        del images[0]["height"]
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return root


def _folder(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(10):
            Image.new("RGB", (8, 8), (k, 0, 0)).save(root / c / f"{k}.png")
    return root


def test_unknown_split_names_the_available_ones(tmp_path, tiny_voc):
    modules = [VOCDataModule(root=str(tiny_voc), num_workers=0),
               SyntheticDataModule(root=str(tiny_voc), num_workers=0),
               COCODataModule(root=str(_tiny_coco(tmp_path / "coco")), num_workers=0),
               FolderDataModule(root=str(_folder(tmp_path / "folder")), num_workers=0)]
    for dm in modules:
        with pytest.raises(ValueError, match=r"split: expected one of \['train', 'val', 'test'\], got 'tset'"):
            dm.dataset("tset")
    extra = VOCDataModule(root=str(tiny_voc), splits={"trainval": "trainval"}, num_workers=0)
    assert len(extra.dataset("trainval")) == 36
    with pytest.raises(ValueError, match=r"\['train', 'val', 'test', 'trainval'\], got 'tset'"):
        extra.dataset("tset")
    cfg = {"class_path": "explainer.data.VOCDataModule", "init_args": {"root": str(tiny_voc), "num_workers": 0}}
    with pytest.raises(ValueError, match="got 'tset'"):
        build_dataset(cfg, "tset", None, 0)


# ------------------------------------------------------------ annotations --
def test_voc_annotations_are_checked_in_setup(tmp_path, tiny_voc):
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    train = (root / "ImageSets/Main/train.txt").read_text().split()
    val = (root / "ImageSets/Main/val.txt").read_text().split()
    for sid in train[:2]:
        xml = root / "Annotations" / f"{sid}.xml"
        xml.write_bytes(xml.read_bytes()[:-40])  # truncated
    xml = root / "Annotations" / f"{val[0]}.xml"
    text = xml.read_text()
    name = text.split("<name>")[1].split("</name>")[0]
    xml.write_text(text.replace(f"<name>{name}</name>", "<name>dgo</name>"))
    dm = VOCDataModule(root=str(root), num_workers=0)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "2 problem(s) in split 'train'" in msg
    assert all(f"{sid}.xml" in msg for sid in train[:2]) and "truncated" in msg
    with pytest.raises(ValueError, match=rf"(?s)1 problem.*'val'.*{val[0]}.xml.*unknown class name\(s\) \['dgo'\]"):
        VOCDataModule(root=str(root), num_workers=0).setup("validate")
    VOCDataModule(root=str(root), num_workers=0).setup("test")  # the test split is intact


def test_coco_annotations_are_checked_in_setup(tmp_path):
    root = _tiny_coco(tmp_path / "coco", bad=True)
    dm = COCODataModule(root=str(root), train_images="val2014", train_ann="annotations/instances_val2014.json",
                        num_workers=0)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "4 problem(s) in split 'train'" in msg
    assert "image 0: height None" in msg
    assert "annotation 101 (image 1): polygon of 4 coordinates" in msg
    assert "annotation 102 (image 2): RLE segmentation of size [99, 20]" in msg
    assert "annotation 103 (image 3): iscrowd 2" in msg
    good = COCODataModule(root=str(_tiny_coco(tmp_path / "good")), train_images="val2014",
                          train_ann="annotations/instances_val2014.json", num_workers=0)
    good.setup("fit")
    assert len(good.datasets["train"]) == 4
