"""What every dataset shares: samples, joint transforms, seeded subsets, the datamodule.

A sample is a dict:

* ``image``: float (3, H, W) in [0, 1];
* ``labels``: float multi-hot (C,) (one-hot for single-label data);
* ``mask``: long (H, W), 0 background, ``c + 1`` for class ``c``, 255 void or
  unknown (VOC's boundary band, or an image without segmentation);
* ``has_mask``: bool, whether ``mask`` holds ground truth;
* ``index``: position in the dataset;
* ``id``: the image's stable name in its dataset (:meth:`SegClsDataset.image_id`), what caches of maps are
  keyed by.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from explainer.core.constants import VOID
from explainer.data.images import ALPHA_BACKGROUND, composite_alpha, read_rgb, white_level  # noqa: F401
from explainer.data.resume import ResumableLoader


def read_index_png(path: str | os.PathLike) -> np.ndarray:
    """A palette/greyscale PNG as its raw index array (H, W) uint8."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"mask: {str(path)!r} has mode {im.mode}, expected a palette or greyscale PNG")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"mask: {str(path)!r} is not a readable PNG: {err}") from err


def build_transforms(image_size: int | None, train: bool, crop_scale: Sequence[float] | None = None,
                     hflip: bool = True, rotate90: bool = False) -> A.Compose:
    """albumentations pipeline applied jointly to image and mask.

    Train: optional random resized crop (nearest for the mask, so class
    indices and void survive; a crop may cut an object out while its label
    stays, so it is off by default), horizontal flip, optional 90-degree
    rotations. Eval: resize only.
    """
    ops: list[Any] = []
    if image_size is not None:
        if train and crop_scale is not None and tuple(crop_scale) != (1.0, 1.0):
            ops.append(A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(crop_scale), ratio=(0.8, 1.25)))
        else:
            ops.append(A.Resize(image_size, image_size))
    if train and hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if train and rotate90:
        ops.append(A.RandomRotate90(p=1.0))
    return A.Compose(ops)


class SegClsDataset(Dataset):
    """Base dataset: subclasses give ``__len__`` and ``load(i) -> (rgb, labels, mask|None)``."""

    def __init__(self, class_names: Sequence[str], transform: A.Compose | None = None):
        self.class_names = list(class_names)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image_id(self, i: int) -> str:
        """The stable name of image ``i`` (its file or annotation id; the position when there is none)."""
        return str(i)

    def check_annotations(self) -> list[str]:
        """Problems of the annotations of every item, one line each (file and problem); none by default.

        Run once when the datamodule sets a split up, so that a broken file
        stops the run before training rather than in a loader worker mid-epoch.
        """
        return []

    def load(self, i: int) -> tuple:
        """(rgb (H, W, 3) uint8, labels (C,), mask (H, W) or None[, extras]): ``extras``, a dict of
        dataset-specific fields, is optional and added to the sample as it is."""
        raise NotImplementedError

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        # (index, seed) from EpochSeededSampler makes augmentation a function of
        # (run seed, epoch, index): runs resume exactly, whatever the workers
        i, sample_seed = item if isinstance(item, tuple) else (item, None)
        if sample_seed is not None and self.transform is not None:
            self.transform.set_random_seed(sample_seed)
        rgb, labels, mask, *more = self.load(i)
        extras = more[0] if more else {}
        has_mask = mask is not None
        if mask is None:
            mask = np.full(rgb.shape[:2], VOID, np.uint8)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"sample {i}: mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
        if self.transform is not None:
            out = self.transform(image=rgb, mask=mask)
            rgb, mask = out["image"], out["mask"]
        image = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float().div_(255)
        return {"image": image, "labels": torch.as_tensor(labels, dtype=torch.float32),
                "mask": torch.from_numpy(np.array(mask, copy=True)).long(),
                "has_mask": torch.tensor(has_mask), "index": i, "id": self.image_id(i), **extras}


class EpochSeededSampler(DistributedSampler):
    """Shuffled indices that depend only on (seed, epoch), sharded over DDP ranks.

    Yields ``(index, sample_seed)`` so that each sample's augmentation is
    seeded too. Rank ``r`` of ``R`` takes positions ``r, r + R, ...`` of the
    epoch's permutation, so with per-rank batch ``B / R`` the ranks' batches
    together are exactly the single-process batch of size ``B``. Lightning
    calls ``set_epoch`` at each epoch start; the epoch is read when iteration
    starts.

    Stateful: ``state_dict()`` is (epoch, samples handed out so far), the
    same on every rank; after ``load_state_dict`` the next iteration skips
    those samples if it is the same epoch, and starts afresh otherwise (the
    saved epoch had ended).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        # a DistributedSampler (so Lightning does not wrap it again under DDP)
        # that needs no process group: the trainer gives replicas and rank
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._position = {"epoch": 0, "yielded": 0}  # of the current iteration
        self._resume: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)

    def state_dict(self) -> dict:
        return {**self._position, "n": self.n, "num_replicas": self.num_replicas}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or not {"epoch", "yielded"} <= set(state_dict):
            raise ValueError(f"state_dict: expected a dict with 'epoch' and 'yielded' (EpochSeededSampler.state_dict), "
                             f"got {state_dict!r}")
        self._resume = dict(state_dict)

    def __iter__(self):
        epoch, start, resume, self._resume = self.epoch, 0, self._resume, None
        if resume is not None and resume["epoch"] == epoch:
            for key in ("n", "num_replicas"):
                if resume.get(key, getattr(self, key)) != getattr(self, key):
                    raise ValueError(f"{key}: the run resumed mid-epoch {epoch} with {key}={getattr(self, key)}, "
                                     f"its checkpoint was written with {key}={resume[key]}")
            start = int(resume["yielded"])
        self._position = {"epoch": epoch, "yielded": start}
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        total = len(self) * self.num_replicas
        order += order[: total - self.n]  # pad so every rank has as many
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g).tolist()
        for i in order[self.rank:total:self.num_replicas][start:]:
            self._position["yielded"] += 1
            yield (i, seeds[i])


def seeded_subset(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    """A fixed random subset of ``limit`` items (all when None or larger)."""
    if limit is None or limit >= len(ds):
        return ds
    if limit <= 0:
        raise ValueError(f"limit: expected a positive number of images, got {limit}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:limit].sort().values.tolist()
    return Subset(ds, idx)


class Subset(Dataset):
    """A fixed subset that passes ``(index, seed)`` items through (see EpochSeededSampler)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            return self.dataset[(self.indices[item[0]], item[1])]
        return self.dataset[self.indices[item]]

    def image_id(self, i: int) -> str:
        return self.dataset.image_id(self.indices[i])

    def __getattr__(self, name):
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ImageDataModule(pl.LightningDataModule):
    """Shared datamodule logic: splits, seeded subsets, loaders.

    Args:
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        image_size: side length images are resized (and cropped) to.
        augment: augment the train split (flip, plus the two options below).
        crop_scale: (min, max) area of a random resized crop; None: no crop.
        rotate90: random 90-degree rotations (for rotation-invariant data).
        limit_train, limit_val, limit_test: seeded subsets of each split.
        seed: the seed of those subsets.
    """

    multilabel: bool = True

    def __init__(self, batch_size: int = 32, num_workers: int = 2, image_size: int = 128, augment: bool = True,
                 crop_scale: tuple[float, float] | None = None, rotate90: bool = False,
                 limit_train: int | None = None, limit_val: int | None = None, limit_test: int | None = None,
                 seed: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.augment = augment
        self.crop_scale = crop_scale
        self.rotate90 = rotate90
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}

    # subclasses
    def make_dataset(self, split: str, transform: A.Compose) -> SegClsDataset:
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def split_names(self) -> list[str]:
        """The splits :meth:`dataset` accepts."""
        return ["train", "val", "test"]

    def dataset(self, split: str, train_transform: bool | None = None) -> Dataset:
        """The (subset of the) split, with train augmentation only on 'train' unless told.

        The annotations of the whole split are checked first (see
        :meth:`SegClsDataset.check_annotations`).
        """
        if split not in self.split_names:
            raise ValueError(f"split: expected one of {self.split_names}, got {split!r}")
        aug = (split == "train" and self.augment) if train_transform is None else train_transform
        tf = build_transforms(self.image_size, train=aug, crop_scale=self.crop_scale, rotate90=self.rotate90)
        ds = self.make_dataset(split, tf)
        problems = ds.check_annotations()
        if problems:
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            shown = "\n  ".join(problems[:20]) + more
            raise ValueError(f"annotations: {len(problems)} problem(s) in split {split!r} of "
                             f"{type(self).__name__}:\n  {shown}")
        return seeded_subset(ds, self.limits.get(split), self.seed)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "val", "test")):
            if split not in self.datasets:
                self.datasets[split] = self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.datasets[split] = self.dataset(split)
        ds = self.datasets[split]
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if shuffle:
            # stateful (see explainer.data.resume): a run killed mid-epoch resumes at the batch it stopped at
            sampler = EpochSeededSampler(len(ds), self.seed, True, replicas, rank)
            return ResumableLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0,
                                   drop_last=len(ds) // replicas > self.batch_size)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
