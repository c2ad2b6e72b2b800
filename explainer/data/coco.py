"""COCO-2014 through pycocotools: multi-hot labels over contiguous class indices, class masks."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import torch

from explainer.core.constants import VOID
from explainer.data.base import ImageDataModule, SegClsDataset, read_rgb


def load_coco(ann_file: str | os.PathLike):
    """A pycocotools COCO object, with annotations of unknown categories refused."""
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotations: no such file {str(ann_file)!r} (expected a COCO instances JSON)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
    except ValueError as err:
        raise ValueError(f"annotations: {str(ann_file)!r} is not valid JSON: {err}") from err
    known = set(coco.cats)
    unknown = sorted({a["category_id"] for a in coco.dataset.get("annotations", [])} - known)
    if unknown:
        raise ValueError(f"annotations: {str(ann_file)!r} has annotations of category ids {unknown[:10]} "
                         f"that its 'categories' list does not define (known ids: {sorted(known)[:10]}...)")
    return coco


def _segmentation_problem(seg, h: int, w: int) -> str | None:
    """Why pycocotools would fail on (or misread) this segmentation; None when it is well-formed."""
    if isinstance(seg, dict):
        if list(seg.get("size") or []) != [h, w] or "counts" not in seg:
            return f"RLE segmentation of size {seg.get('size')!r}, expected counts and size [{h}, {w}]"
        return None
    if not isinstance(seg, list) or not seg:
        return f"segmentation {type(seg).__name__}, expected a list of polygons or an RLE dict"
    for poly in seg:
        if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                or not all(isinstance(v, (int, float)) for v in poly)):
            n = len(poly) if isinstance(poly, list) else type(poly).__name__
            return f"polygon of {n} coordinates, expected an even number >= 6 (x, y pairs)"
    return None


class COCODataset(SegClsDataset):
    """COCO images with multi-hot labels; mask: class index + 1 per pixel (crowd regions void)."""

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, transform=None,
                 image_ids: list[int] | None = None, class_names=None):
        coco = load_coco(ann_file)
        self.coco = coco
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"images: no such directory {str(self.image_dir)!r}")
        self.cat_ids = sorted(coco.cats)
        self.cat_index = {cid: i for i, cid in enumerate(self.cat_ids)}
        names = [coco.cats[c]["name"] for c in self.cat_ids]
        if class_names is not None and list(class_names) != names:
            raise ValueError(f"class_names: the annotations define {names[:5]}..., got {list(class_names)[:5]}...")
        super().__init__(names, transform)
        self.ann_file = Path(ann_file)
        self.ids = sorted(coco.imgs) if image_ids is None else list(image_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def image_id(self, i: int) -> str:
        return str(self.ids[i])

    def check_annotations(self) -> list[str]:
        """The split's image entries and their annotations are complete and well-formed.

        Images need an existing file and positive integer height and width; an
        annotation needs ``iscrowd`` 0 or 1 and a segmentation that
        pycocotools rasterises as meant: polygons of at least three (x, y)
        points, or an RLE of the image's size. Annotations of image ids the
        file does not define would be dropped silently, so they are reported.
        """
        where = str(self.ann_file)
        problems = []
        orphans = sorted({a.get("image_id") for a in self.coco.dataset.get("annotations", [])} - set(self.coco.imgs),
                         key=str)
        if orphans:
            problems.append(f"{where!r}: annotations of image ids {orphans[:10]} that 'images' does not define")
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            h, w = info.get("height"), info.get("width")
            if not isinstance(info.get("file_name"), str) or not info["file_name"]:
                problems.append(f"{where!r} image {img_id}: no file_name")
            elif not (self.image_dir / info["file_name"]).is_file():
                problems.append(f"{where!r} image {img_id}: no such file {str(self.image_dir / info['file_name'])!r}")
            if not all(isinstance(v, int) and v > 0 for v in (h, w)):
                problems.append(f"{where!r} image {img_id}: height {h!r} and width {w!r}, expected positive integers")
                continue
            for a in self.coco.imgToAnns.get(img_id, []):
                bad = _segmentation_problem(a.get("segmentation"), h, w)
                if a.get("iscrowd", 0) not in (0, 1):
                    bad = f"iscrowd {a.get('iscrowd')!r}, expected 0 or 1"
                if bad:
                    problems.append(f"{where!r} annotation {a.get('id')} (image {img_id}): {bad}")
        return problems

    def load(self, i: int):
        img_id = self.ids[i]
        info = self.coco.imgs[img_id]
        rgb = read_rgb(self.image_dir / info["file_name"])
        h, w = rgb.shape[:2]
        labels = np.zeros(self.num_classes, np.float32)
        mask = np.zeros((h, w), np.uint8)
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, iscrowd=None))
        for a in sorted(anns, key=lambda a: -a.get("area", 0)):  # small objects drawn last stay visible
            m = self.coco.annToMask(a).astype(bool)
            if m.shape != (h, w):
                raise ValueError(f"annotation {a.get('id')}: mask {m.shape} does not match image {(h, w)}")
            if a.get("iscrowd", 0):
                mask[m] = VOID
                continue
            c = self.cat_index[a["category_id"]]
            labels[c] = 1
            mask[m] = c + 1
        return rgb, labels, mask


class COCODataModule(ImageDataModule):
    """COCO-2014: train on train2014; val and test are seeded disjoint halves of val2014."""

    multilabel = True

    def __init__(self, root: str = "data/coco", train_images: str = "train2014",
                 train_ann: str = "annotations/instances_train2014.json", val_images: str = "val2014",
                 val_ann: str = "annotations/instances_val2014.json", test_fraction: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.paths = {"train": (train_images, train_ann), "val": (val_images, val_ann)}
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction
        self._names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        if self._names is None:
            coco = load_coco(self.root / self.paths["val"][1])
            self._names = [coco.cats[c]["name"] for c in sorted(coco.cats)]
        return list(self._names)

    def make_dataset(self, split, transform):
        if split == "train":
            img, ann = self.paths["train"]
            return COCODataset(self.root / img, self.root / ann, transform)
        img, ann = self.paths["val"]
        full = COCODataset(self.root / img, self.root / ann, transform)
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(full.ids), generator=g).tolist()
        n_test = int(round(len(perm) * self.test_fraction))
        chosen = perm[:n_test] if split == "test" else perm[n_test:]
        full.ids = [full.ids[i] for i in sorted(chosen)]
        return full
