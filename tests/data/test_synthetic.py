"""The embedded benchmark: determinism, VOC format, the spurious-context variant."""

import hashlib
import json
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from explainer.data import synthetic


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthetic.generate(tmp_path / "a", 12, seed=3, image_size=48)
    b = synthetic.generate(tmp_path / "b", 12, seed=3, image_size=48)
    c = synthetic.generate(tmp_path / "c", 12, seed=4, image_size=48)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


@pytest.mark.parametrize("spurious", [None, "ring"])
def test_parallel_writers_write_the_same_bytes(tmp_path, spurious):
    """Images rendered in several processes: the same tree, manifest included, as one process writes."""
    counts = {"train": 9, "val": 3, "test": 4}
    one = synthetic.generate(tmp_path / "one", counts, seed=5, image_size=40, spurious_class=spurious, workers=1)
    three = synthetic.generate(tmp_path / "three", counts, seed=5, image_size=40, spurious_class=spurious,
                               workers=3)
    assert _digest(one) == _digest(three)
    with pytest.raises(ValueError, match="workers: expected a positive int"):
        synthetic.generate(tmp_path / "bad", counts, workers=0)
    assert not (tmp_path / "bad").exists()


def test_voc_tree_is_consistent(tiny_voc):
    root = tiny_voc
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "Annotations"):
        assert (root / d).is_dir()
    ids = (root / "ImageSets/Main/train.txt").read_text().split()
    assert len(ids) == 24
    assert (root / "ImageSets/Segmentation/test.txt").read_text().split() == \
        (root / "ImageSets/Main/test.txt").read_text().split()
    void_seen = False
    for sid in ids:
        seg = Image.open(root / "SegmentationClass" / f"{sid}.png")
        assert seg.mode == "P"
        arr = np.asarray(seg)
        vals = set(np.unique(arr).tolist())
        assert vals <= set(range(len(synthetic.CLASSES) + 1)) | {255}
        void_seen |= 255 in vals
        names = {o.findtext("name") for o in ET.parse(root / "Annotations" / f"{sid}.xml").getroot().iter("object")}
        # every annotated class is painted in the segmentation, and nothing else
        painted = {synthetic.CLASSES[v - 1] for v in vals if 0 < v < 255}
        assert painted == names
        # the per-class listings agree with the annotation (1 present, 0 difficult only, -1 absent)
        for c in synthetic.CLASSES:
            line = [ln for ln in (root / f"ImageSets/Main/{c}_train.txt").read_text().splitlines()
                    if ln.startswith(sid)][0]
            flag = int(line.split()[1])
            assert (flag != -1) == (c in names)
    assert void_seen


def test_spurious_context_only_in_train(tmp_path):
    root = synthetic.generate(tmp_path / "s", {"train": 60, "val": 0, "test": 60}, seed=0, image_size=48,
                              spurious_class="star", spurious_p=1.0)
    meta = json.loads((root / "synthetic.json").read_text())
    grid = {k: set(v) for k, v in meta["spurious_background"].items()}

    def has_star(split):
        out = {}
        for ln in (root / f"ImageSets/Main/star_{split}.txt").read_text().splitlines():
            sid, flag = ln.split()
            out[sid] = int(flag) != -1
        return out

    train = has_star("train")
    # train: grid background exactly when the star is present (p = 1)
    for sid, star in train.items():
        if sid in grid["train"]:
            assert star
    assert sum(train.values()) > 5 and len(grid["train"]) >= 0.8 * sum(train.values())
    # test: the grid background is not tied to the class
    test = has_star("test")
    no_star_grid = [s for s, star in test.items() if not star and s in grid["test"]]
    assert len(no_star_grid) > 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        synthetic.generate(tmp_path / "x", {"training": 3})
    with pytest.raises(ValueError, match="spurious_class"):
        synthetic.generate(tmp_path / "x", 5, spurious_class="dog")
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate(tmp_path / "x", 5, image_size=8)
    assert not (tmp_path / "x").exists()
