"""Dataset loaders: VOC, COCO, image folders; joint augmentation; errors."""

import json

import albumentations as A
import pytest
import torch
from PIL import Image, ImageDraw

from explainer.data import COCODataModule, FolderDataModule, SyntheticDataModule, VOCDataModule, VOCDataset
from explainer.data.base import EpochSeededSampler
from explainer.data.synthetic import CLASSES


def test_voc_labels_and_masks(tiny_voc):
    dm = VOCDataModule(root=str(tiny_voc), image_size=64, batch_size=4, num_workers=0)
    assert dm.class_names == list(CLASSES)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    for y, m in zip(batch["labels"], batch["mask"]):
        painted = {int(v) - 1 for v in m.unique() if 0 < v < 255}
        assert painted == set(y.nonzero().flatten().tolist())


def test_joint_flip_and_crop_keep_masks_aligned(tiny_voc):
    plain = VOCDataset(tiny_voc, "train")
    flip = VOCDataset(tiny_voc, "train", transform=A.Compose([A.HorizontalFlip(p=1.0)]))
    crop = VOCDataset(tiny_voc, "train", transform=A.Compose([A.Crop(x_min=5, y_min=9, x_max=45, y_max=57)]))
    for i in range(4):
        a, b, c = plain[i], flip[i], crop[i]
        assert torch.equal(b["mask"], a["mask"].flip(-1))
        assert torch.allclose(b["image"], a["image"].flip(-1))
        assert torch.equal(c["mask"], a["mask"][9:57, 5:45])
        assert torch.allclose(c["image"], a["image"][:, 9:57, 5:45])


def test_random_resized_crop_keeps_class_indices(tiny_voc):
    dm = VOCDataModule(root=str(tiny_voc), image_size=40, crop_scale=(0.3, 1.0), rotate90=True, num_workers=0)
    ds = dm.dataset("train")
    for i in range(6):
        m = ds[(i, 1234 + i)]["mask"]
        assert set(m.unique().tolist()) <= set(range(len(CLASSES) + 1)) | {255}
    # a seeded item is the same twice (what exact resumption relies on), another seed differs
    assert torch.equal(ds[(0, 7)]["image"], ds[(0, 7)]["image"])


def test_epoch_seeded_sampler_shards_the_single_process_order():
    one = list(EpochSeededSampler(10, seed=1, num_replicas=1, rank=0))
    r0 = list(EpochSeededSampler(10, seed=1, num_replicas=2, rank=0))
    r1 = list(EpochSeededSampler(10, seed=1, num_replicas=2, rank=1))
    assert r0 == one[0::2] and r1 == one[1::2]
    s = EpochSeededSampler(10, seed=1)
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in one]


def _coco_fixture(tmp_path, unknown=False):
    img_dir = tmp_path / "val2014"
    img_dir.mkdir()
    images, anns = [], []
    aid = 1
    for k in range(4):
        im = Image.new("RGB", (40, 30), (k * 40, 20, 20))
        d = ImageDraw.Draw(im)
        d.rectangle([5, 5, 14, 14], fill=(255, 255, 255))
        name = f"im{k}.jpg"
        im.save(img_dir / name)
        images.append({"id": 10 + k, "file_name": name, "width": 40, "height": 30})
        cat = 3 if k % 2 == 0 else 7
        anns.append({"id": aid, "image_id": 10 + k, "category_id": cat, "iscrowd": 0, "area": 100,
                     "bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]})
        aid += 1
    if unknown:
        anns.append({"id": aid, "image_id": 10, "category_id": 99, "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2],
                     "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]})
    cats = [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return tmp_path


def test_coco_labels_masks_and_flip(tmp_path):
    root = _coco_fixture(tmp_path)
    dm = COCODataModule(root=str(root), train_images="val2014", train_ann="annotations/instances_val2014.json",
                        image_size=None, num_workers=0)
    assert dm.class_names == ["car", "train"]
    ds = dm.make_dataset("train", A.Compose([]))
    flipped = dm.make_dataset("train", A.Compose([A.HorizontalFlip(p=1.0)]))
    for i in range(4):
        s = ds[i]
        c = 0 if i % 2 == 0 else 1
        assert s["labels"].tolist() == [float(c == 0), float(c == 1)]
        m = s["mask"]
        assert (m == c + 1).sum() >= 90 and set(m.unique().tolist()) == {0, c + 1}
        assert m[10, 10] == c + 1 and m[25, 30] == 0
        assert torch.equal(flipped[i]["mask"], m.flip(-1))
    # val and test are disjoint seeded halves
    v, t = dm.make_dataset("val", None), dm.make_dataset("test", None)
    assert not set(v.ids) & set(t.ids) and len(v.ids) + len(t.ids) == 4


def test_coco_unknown_category_is_refused(tmp_path):
    root = _coco_fixture(tmp_path, unknown=True)
    dm = COCODataModule(root=str(root), num_workers=0)
    with pytest.raises(ValueError, match="category ids \\[99\\]"):
        _ = dm.class_names


def test_image_folder(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for k in range(10):
            Image.new("RGB", (20, 20), (k, 0, 0) if c == "cat" else (0, k, 0)).save(tmp_path / c / f"{k}.png")
    dm = FolderDataModule(root=str(tmp_path), image_size=16, num_workers=0, batch_size=4)
    assert dm.class_names == ["cat", "dog"] and dm.multilabel is False
    sizes = {s: len(dm.dataset(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 16, "val": 2, "test": 2}
    ds = dm.dataset("train")
    for i in range(len(ds)):
        s = ds[i]
        path, c = ds.items[i]
        assert s["labels"].argmax().item() == c and path.parent.name == dm.class_names[c]
        assert not s["has_mask"] and (s["mask"] == 255).all()
    again = FolderDataModule(root=str(tmp_path), image_size=16, num_workers=0)
    assert [p for p, _ in again.dataset("val").items] == [p for p, _ in dm.dataset("val").items]


def test_errors(tmp_path, tiny_voc):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        _ = VOCDataModule(root=str(tmp_path / "nope")).class_names
    with pytest.raises(FileNotFoundError, match="no such directory"):
        _ = FolderDataModule(root=str(tmp_path / "nope")).class_names
    # a VOC tree missing files
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_voc, broken)
    first = (broken / "ImageSets/Main/train.txt").read_text().split()[0]
    (broken / "JPEGImages" / f"{first}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="lack JPEGImages"):
        VOCDataset(broken, "train")
    # a corrupt image
    second = (broken / "ImageSets/Main/val.txt").read_text().split()[0]
    (broken / "JPEGImages" / f"{second}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="not a readable image"):
        VOCDataset(broken, "val")[0]


def test_synthetic_datamodule_generates_once(tmp_path):
    dm = SyntheticDataModule(root=str(tmp_path / "syn"), num_images={"train": 6, "val": 3, "test": 3},
                             image_size=48, num_workers=0, batch_size=2)
    dm.prepare_data()
    stamp = (tmp_path / "syn/synthetic.json").stat().st_mtime_ns
    dm.prepare_data()
    assert (tmp_path / "syn/synthetic.json").stat().st_mtime_ns == stamp
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6
