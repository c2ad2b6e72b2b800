"""PASCAL VOC-2007 (and the synthetic benchmark, written in the same format)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import torch

from explainer.core.constants import VOID
from explainer.data import synthetic
from explainer.data.base import ImageDataModule, SegClsDataset, read_index_png, read_rgb

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def find_voc_root(root: str | os.PathLike) -> Path:
    """``root`` itself, or ``root/VOCdevkit/VOC2007`` / ``root/VOC2007``: the folder holding JPEGImages."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"root: no such directory {str(root)!r} (expected a VOC tree with JPEGImages/, "
                                "Annotations/ and ImageSets/Main/)")
    for cand in (root, root / "VOCdevkit" / "VOC2007", root / "VOC2007"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise FileNotFoundError(f"root: {str(root)!r} holds no VOC tree (no JPEGImages/ in it, in VOCdevkit/VOC2007/ "
                            "or in VOC2007/)")


def voc_class_names(root: Path) -> list[str]:
    """Class names in the tree's order.

    A generated tree declares its order in ``synthetic.json``; otherwise VOC's
    order: the sorted names of the ``ImageSets/Main/<class>_train.txt`` files.
    """
    meta = root / "synthetic.json"
    if meta.is_file():
        return list(json.loads(meta.read_text())["classes"])
    main = root / "ImageSets" / "Main"
    names = sorted(p.name[: -len("_train.txt")] for p in main.glob("*_train.txt"))
    if not names:
        raise FileNotFoundError(f"root: {str(main)!r} has no per-class '<class>_train.txt' files")
    return names


def parse_annotation(path: Path, class_index: dict[str, int]) -> np.ndarray:
    """Multi-hot (C,) labels of the objects named in a VOC Annotations XML (difficult ones included)."""
    return parse_annotation_full(path, class_index)[0]


def parse_annotation_full(path: Path, class_index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, difficult): multi-hot labels of all objects, and the classes present ONLY as difficult objects.

    VOC's protocol ignores the latter when computing AP.
    """
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"annotation: cannot parse {str(path)!r}: {err}") from err
    y = np.zeros(len(class_index), np.float32)
    easy = np.zeros(len(class_index), np.float32)
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise ValueError(f"annotation: {str(path)!r} names class {name!r}, expected one of {list(class_index)}")
        y[class_index[name]] = 1
        if (obj.findtext("difficult") or "0").strip() != "1":
            easy[class_index[name]] = 1
    return y, y * (1 - easy)


class VOCDataset(SegClsDataset):
    """Images of one split of a VOC tree with multi-hot labels and, where present, segmentation."""

    def __init__(self, root: str | os.PathLike, split: str = "train", class_names=None, transform=None,
                 segmentation_only: bool = False):
        self.root = find_voc_root(root)
        super().__init__(class_names or voc_class_names(self.root), transform)
        main = self.root / "ImageSets" / ("Segmentation" if segmentation_only else "Main")
        listing = main / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"split: {str(listing)!r} does not exist (expected ImageSets/Main/{split}.txt)")
        self.ids = [ln.split()[0] for ln in listing.read_text().splitlines() if ln.strip()]
        missing = [i for i in self.ids if not (self.root / "JPEGImages" / f"{i}.jpg").is_file()
                   or not (self.root / "Annotations" / f"{i}.xml").is_file()]
        if missing:
            raise FileNotFoundError(f"VOC tree {str(self.root)!r}: {len(missing)} image(s) of split {split!r} lack "
                                    f"JPEGImages/<id>.jpg or Annotations/<id>.xml, e.g. {missing[:3]}")
        self.index = {c: i for i, c in enumerate(self.class_names)}

    def __len__(self) -> int:
        return len(self.ids)

    def image_id(self, i: int) -> str:
        return self.ids[i]

    def check_annotations(self) -> list[str]:
        """Every Annotations XML of the split parses and names only known classes."""
        problems, told = [], False
        for sid in self.ids:
            path = self.root / "Annotations" / f"{sid}.xml"
            try:
                tree = ET.parse(path)
            except (ET.ParseError, OSError) as err:
                problems.append(f"{str(path)!r}: not a parseable XML file (truncated?): {err}")
                continue
            names = [(obj.findtext("name") or "").strip() for obj in tree.getroot().iter("object")]
            unknown = sorted({n for n in names if n not in self.index})
            if unknown:
                known = "" if told else f" (expected names among {self.class_names})"
                problems.append(f"{str(path)!r}: unknown class name(s) {unknown}{known}")
                told = True
        return problems

    def load(self, i: int):
        """(rgb, labels, mask, {"difficult": (C,) classes present only as difficult objects})."""
        sid = self.ids[i]
        rgb = read_rgb(self.root / "JPEGImages" / f"{sid}.jpg")
        labels, difficult = parse_annotation_full(self.root / "Annotations" / f"{sid}.xml", self.index)
        seg = self.root / "SegmentationClass" / f"{sid}.png"
        mask = read_index_png(seg) if seg.is_file() else None
        if mask is not None:
            bad = (mask > self.num_classes) & (mask != VOID)
            if bad.any():
                raise ValueError(f"mask: {str(seg)!r} has class indices above {self.num_classes}")
        return rgb, labels, mask, {"difficult": torch.from_numpy(difficult)}


class VOCDataModule(ImageDataModule):
    """VOC-2007: multi-hot labels from Annotations, segmentation where present (void kept as 255).

    Args:
        root: the VOC2007 folder (or a folder holding VOCdevkit/VOC2007).
        splits: ImageSets/Main listing used for each of train/val/test.
        class_names: defaults to the tree's per-class files in sorted order
            (the 20 VOC classes for the real dataset).
        test_segmentation_only: test on the images with segmentation only
            (VOC-2007 test: 210 images), as the Explainer paper does.
    """

    multilabel = True

    def __init__(self, root: str = "data/VOC2007", splits: dict[str, str] | None = None,
                 class_names: list[str] | None = None, test_segmentation_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.root = root
        self.splits = {"train": "train", "val": "val", "test": "test", **(splits or {})}
        self._class_names = class_names
        self.test_segmentation_only = test_segmentation_only

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = voc_class_names(find_voc_root(self.root))
        return list(self._class_names)

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)

    def make_dataset(self, split, transform):
        seg_only = split == "test" and self.test_segmentation_only
        return VOCDataset(self.root, self.splits[split], self.class_names, transform, segmentation_only=seg_only)


class SyntheticDataModule(VOCDataModule):
    """The embedded benchmark: generated on first use (rank 0), then read as VOC.

    Args:
        root: where the tree lives. A tree with the same settings (recorded in
            its ``synthetic.json`` manifest) is reused; one with other settings
            is an error unless ``overwrite``; a non-empty folder the generator
            did not write is always refused (see :func:`synthetic.generate`).
        num_images: split counts.
        generator_seed: seed of the generator.
        spurious_class, spurious_p: the spurious-context variant.
        overwrite: regenerate a tree of the generator whose settings differ,
            deleting only the files its manifest lists.
    """

    def __init__(self, root: str = "data/synthetic", num_images: dict[str, int] | None = None,
                 generator_seed: int = 0, spurious_class: str | None = None, spurious_p: float = 0.9,
                 image_size: int = 128, overwrite: bool = False, **kwargs):
        super().__init__(root=root, image_size=image_size, **kwargs)
        self.num_images = dict(num_images or {"train": 4000, "val": 500, "test": 500})
        self.generator_seed = generator_seed
        self.spurious_class = spurious_class
        self.spurious_p = spurious_p
        self.native_size = image_size
        self.overwrite = overwrite

    def _settings(self) -> dict:
        return synthetic.tree_settings(self.num_images, self.generator_seed, self.native_size, self.spurious_class,
                                       self.spurious_p)

    def is_current(self) -> bool:
        """Whether ``root`` holds the complete tree of these settings (raises for a foreign folder)."""
        have = synthetic.read_manifest(self.root)
        return have is not None and not synthetic.tree_differences(Path(self.root), have, self._settings())

    def prepare_data(self) -> None:
        synthetic.generate(self.root, self.num_images, seed=self.generator_seed, image_size=self.native_size,
                           spurious_class=self.spurious_class, spurious_p=self.spurious_p, overwrite=self.overwrite)

    @property
    def class_names(self) -> list[str]:
        return list(synthetic.CLASSES)
