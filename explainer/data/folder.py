"""An ImageNet-style image folder: ``root/<class>/<image>``, one label per image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from explainer.data.base import ImageDataModule, SegClsDataset, read_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def scan_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: no such directory {str(root)!r} (expected root/<class>/<image> files)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"root: {str(root)!r} has no class sub-folders (expected root/<class>/<image>)")
    items = [(p, ci) for ci, c in enumerate(classes) for p in sorted((root / c).rglob("*"))
             if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise FileNotFoundError(f"root: {str(root)!r} has class folders but no images ({sorted(IMAGE_SUFFIXES)})")
    return classes, items


class FolderDataset(SegClsDataset):
    def __init__(self, items: list[tuple[Path, int]], class_names, transform=None):
        super().__init__(class_names, transform)
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def image_id(self, i: int) -> str:
        return str(self.items[i][0])

    def load(self, i):
        path, c = self.items[i]
        y = np.zeros(self.num_classes, np.float32)
        y[c] = 1
        return read_rgb(path), y, None


class FolderDataModule(ImageDataModule):
    """Single-label images. ``root/{train,val,test}/<class>/`` if those exist, else a seeded 80/10/10 split."""

    multilabel = False

    def __init__(self, root: str = "data/imagenet", **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root)
        self._cache: dict[str, list] | None = None
        self._names: list[str] | None = None

    def _scan(self):
        if self._cache is None:
            if all((self.root / s).is_dir() for s in ("train", "val")):
                names, _ = scan_folder(self.root / "train")
                cache = {}
                for s in ("train", "val", "test"):
                    if (self.root / s).is_dir():
                        n, items = scan_folder(self.root / s)
                        if n != names:
                            raise ValueError(f"root: split {s!r} has classes {n[:5]}..., train has {names[:5]}...")
                        cache[s] = items
                cache.setdefault("test", cache["val"])
            else:
                names, items = scan_folder(self.root)
                g = torch.Generator().manual_seed(self.seed)
                perm = torch.randperm(len(items), generator=g).tolist()
                n_val = max(1, len(items) // 10)
                cache = {"val": [items[i] for i in sorted(perm[:n_val])],
                         "test": [items[i] for i in sorted(perm[n_val:2 * n_val])],
                         "train": [items[i] for i in sorted(perm[2 * n_val:])]}
            self._cache, self._names = cache, names
        return self._names, self._cache

    @property
    def class_names(self) -> list[str]:
        return list(self._scan()[0])

    def make_dataset(self, split, transform):
        names, cache = self._scan()
        return FolderDataset(cache[split], names, transform)
