"""The embedded benchmark: synthetic shapes written as a PASCAL VOC-2007 tree.

Objects belong to one of :data:`CLASSES` and are told apart by *shape* only:
every object gets a random colour and a random texture, a random size,
position and rotation, and may be partly occluded by later objects.
Distractor shapes (elongated ellipses, scribbles, small random polygons with
no class) and textured backgrounds make the task need the objects' outlines.

The tree holds what VOC holds: ``JPEGImages``, palette PNGs in
``SegmentationClass`` (class index per pixel, 0 background, 255 "void" band
along object boundaries) and ``SegmentationObject``, ``Annotations`` XML,
``ImageSets/Main/{split}.txt`` with the per-class ``<class>_<split>.txt``
files, and ``ImageSets/Segmentation/{split}.txt``.

Spurious-context variant: with ``spurious_class`` set, in the *train* split
an image that contains that class gets the special ``"grid"`` background with
probability ``spurious_p``; in val/test the grid background is never tied to
the class (it appears with probability ``spurious_p`` independent of labels).

One image is drawn by :func:`~explainer.data.synthetic_render.render` (in
:mod:`explainer.data.synthetic_render`, with :data:`CLASSES`; both importable
from here); this module writes the tree and its manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image

from explainer.core.io import atomic_write_text
from explainer.data.synthetic_render import CLASSES, render

SPLITS = ("train", "val", "test")


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), 256 entries, flat RGB."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


# ----------------------------------------------------------------- files --
def _annotation_xml(stem: str, size: int, objects: list[dict]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{stem}.jpg"
    sz = ET.SubElement(root, "size")
    for k, v in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, k).text = str(v)
    ET.SubElement(root, "segmented").text = "1"
    for o in objects:
        ob = ET.SubElement(root, "object")
        ET.SubElement(ob, "name").text = o["name"]
        ET.SubElement(ob, "pose").text = "Unspecified"
        ET.SubElement(ob, "truncated").text = "0"
        ET.SubElement(ob, "difficult").text = "1" if o["visible"] < 0.6 else "0"
        bb = ET.SubElement(ob, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), o["bbox"]):
            ET.SubElement(bb, k).text = str(v)
    return ET.tostring(root)


def generate(root: str | os.PathLike, num_images: int | dict[str, int], seed: int = 0,
             image_size: int = 128, spurious_class: str | None = None,
             spurious_p: float = 0.9, *, overwrite: bool = False, workers: int | None = None) -> Path:
    """Write the synthetic benchmark as a VOC-2007 tree at ``root``, or reuse the one there.

    The tree's manifest, ``root/synthetic.json``, records the settings, the
    generator :data:`VERSION` and every file and folder the generator wrote.

    * ``root`` absent or empty: the tree is written to a temporary sibling
      and moved into place, so an interrupted run leaves no half tree under
      ``root`` (at most a ``.<name>.*`` sibling, safe to delete).
    * A complete tree with the same settings and version: reused as it is.
    * A tree of this generator with other settings, or an interrupted
      replacement: an error saying what differs, unless ``overwrite``.
    * Anything else (a non-empty folder without the manifest): refused,
      whatever ``overwrite`` says; nothing in it is touched.

    Args:
        root: directory to create (it receives ``JPEGImages/`` etc. directly).
        num_images: total count (split 70/10/20 into train/val/test), or a
            dict ``{"train": n, "val": n, "test": n}``.
        seed: the same seed gives byte-identical files.
        image_size: side of the square images in pixels (at least 32).
        spurious_class: name of a class whose train images get the ``grid``
            background with probability ``spurious_p`` (None: no spurious cue).
        spurious_p: that probability, in [0, 1].
        overwrite: replace a tree of this generator whose settings differ (or
            whose manifest lists missing files): only the files and folders
            its manifest lists are deleted; files put there by others stay
            (and a new file that would land on one of them is refused).
        workers: processes that render the images on Linux (None: one per
            CPU, at most 8, and one for fewer than 200 images; other systems
            render in this process); the files are the same whatever the
            number.

    Returns:
        The root path.
    """
    root = Path(root)
    if isinstance(num_images, int):
        if num_images < 3:
            raise ValueError(f"num_images: expected an int >= 3 or a dict of split counts, got {num_images}")
        n_tr = int(round(num_images * 0.7))
        n_va = int(round(num_images * 0.1))
        counts = {"train": n_tr, "val": n_va, "test": num_images - n_tr - n_va}
    elif isinstance(num_images, dict):
        unknown = set(num_images) - set(SPLITS)
        if unknown:
            raise ValueError(f"num_images: unknown split(s) {sorted(unknown)}; expected keys among {SPLITS}")
        counts = {k: int(num_images.get(k, 0)) for k in SPLITS}
        if any(v < 0 for v in counts.values()) or sum(counts.values()) == 0:
            raise ValueError(f"num_images: expected non-negative counts with a positive total, got {num_images}")
    else:
        raise TypeError(f"num_images: expected int or dict, got {type(num_images).__name__}")
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size: expected an int >= 32, got {image_size!r}")
    if spurious_class is not None and spurious_class not in CLASSES:
        raise ValueError(f"spurious_class: expected one of {CLASSES}, got {spurious_class!r}")
    if not 0.0 <= spurious_p <= 1.0:
        raise ValueError(f"spurious_p: expected a probability in [0, 1], got {spurious_p}")
    workers = _workers(workers, sum(counts.values()))

    want = tree_settings(counts, seed, image_size, spurious_class, spurious_p)
    old = read_manifest(root)  # None: absent or empty; raises for a foreign folder
    if old is not None:
        problems = tree_differences(root, old, want)
        if not problems:
            return root
        if not overwrite:
            raise FileExistsError(
                f"root: {str(root)!r} holds a synthetic tree that does not match the request: "
                f"{'; '.join(problems)}. Nothing was changed. To use it as it is, request its settings "
                "(SyntheticDataModule: generator_seed, num_images, image_size, spurious_class, spurious_p); "
                "to regenerate it, pass overwrite=True (SyntheticDataModule: overwrite: true), which deletes "
                f"only the files listed in {MANIFEST}; or choose another root.")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        _write_tree(tmp, counts, seed, image_size, spurious_class, spurious_p, workers)
        if old is None:
            try:
                os.replace(tmp, root)  # root absent or an empty folder
            except OSError:  # another process (a second node's prepare_data) put a tree there first
                theirs = read_manifest(root)
                if theirs is None or tree_differences(root, theirs, want):
                    raise
                shutil.rmtree(tmp)
        else:
            _replace_tree(root, old, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the temporary sibling is ours alone
        raise
    return root


def _workers(workers: int | None, n: int) -> int:
    if workers is None:
        return 1 if n < 200 else max(1, min(8, os.cpu_count() or 1))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive int (or None: one per CPU), got {workers!r}")
    return workers


VERSION = 1  # bump when the same settings would give other files; manifests without a version are version 1
MANIFEST = "synthetic.json"
GENERATOR = "explainer.data.synthetic"


def tree_settings(counts: dict[str, int], seed: int, image_size: int, spurious_class: str | None,
                  spurious_p: float) -> dict:
    """The manifest entries that decide a tree's content."""
    return {"version": VERSION, "seed": seed, "image_size": image_size,
            "counts": {k: int(counts.get(k, 0)) for k in SPLITS}, "classes": list(CLASSES),
            "spurious_class": spurious_class, "spurious_p": spurious_p if spurious_class else None}


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of the generator's tree at ``root``; None when ``root`` is absent or an empty folder.

    Raises FileExistsError for anything else: a file, or a non-empty folder
    the generator did not write.
    """
    root = Path(root)
    if not root.exists():
        return None
    if not root.is_dir():
        raise FileExistsError(f"root: {str(root)!r} is a file, expected a folder for the synthetic tree")
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        return None
    meta = None
    if (root / MANIFEST).is_file():
        try:
            meta = json.loads((root / MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = None
    if not isinstance(meta, dict) or meta.get("generator") != GENERATOR:
        raise FileExistsError(
            f"root: {str(root)!r} is not empty ({len(entries)} entries, e.g. {entries[:3]}) and holds no "
            f"{MANIFEST} manifest of the synthetic generator, so it was not written by it; nothing was changed "
            "(overwrite only replaces the generator's own trees). Choose a new or empty folder.")
    meta.setdefault("version", 1)
    if "files" not in meta:  # written before manifests listed their files: this version's names
        meta["files"], meta["dirs"] = _tree_names(meta.get("counts") or {}, meta.get("classes") or CLASSES)
    return meta


def tree_differences(root: Path, have: dict, want: dict) -> list[str]:
    """Why the tree whose manifest is ``have`` is not the requested one (empty: it is, complete)."""
    out = [f"{k}={have.get(k)!r} (requested {v!r})" for k, v in want.items() if have.get(k) != v]
    if out:
        return out
    if have.get("complete") is False:
        return ["an earlier regeneration was interrupted (the manifest is marked incomplete)"]
    missing = [f for f in have["files"] if not (root / f).is_file()]
    if missing:
        return [f"{len(missing)} of the {len(have['files'])} files its manifest lists are missing, "
                f"e.g. {missing[:3]}"]
    return []


def _tree_names(counts: dict[str, int], classes) -> tuple[list[str], list[str]]:
    """(files, folders) a tree of this generator version holds for these counts (without the manifest)."""
    dirs = ["Annotations", "ImageSets", "ImageSets/Main", "ImageSets/Segmentation", "JPEGImages",
            "SegmentationClass", "SegmentationObject"]
    files = []
    for split_i, split in enumerate(SPLITS):
        for i in range(int(counts.get(split, 0))):
            stem = f"{split_i}{i:06d}"
            files += [f"JPEGImages/{stem}.jpg", f"SegmentationClass/{stem}.png", f"SegmentationObject/{stem}.png",
                      f"Annotations/{stem}.xml"]
    for split in (*SPLITS, "trainval"):
        files += [f"ImageSets/Main/{split}.txt", f"ImageSets/Segmentation/{split}.txt"]
        files += [f"ImageSets/Main/{c}_{split}.txt" for c in classes]
    return sorted(files), dirs


def _replace_tree(root: Path, old: dict, tmp: Path) -> None:
    """Replace the generator's tree at ``root`` by the complete tree ``tmp``, touching nothing it did not write."""
    new = json.loads((tmp / MANIFEST).read_text())
    old_files = set(old["files"])
    clash = [f for f in new["files"] if f not in old_files and (root / f).exists()]
    clash += [d for d in new["dirs"] if (root / d).exists() and not (root / d).is_dir()]
    if clash:
        raise FileExistsError(f"root: {str(root)!r} holds {len(clash)} file(s) its manifest does not list where the "
                              f"new tree writes, e.g. {clash[:3]}; nothing was changed. Move them away first.")
    # from here a kill leaves a manifest marked incomplete that lists everything either tree may have
    # put there: the next run refuses the tree, and overwrite=True cleans it up
    marker = dict(old, complete=False, files=sorted(old_files | set(new["files"])),
                  dirs=sorted(set(old["dirs"]) | set(new["dirs"])))
    atomic_write_text(root / MANIFEST, json.dumps(marker, indent=1))
    for f in old["files"]:
        (root / f).unlink(missing_ok=True)
    for d in sorted(old["dirs"], key=lambda d: -d.count("/")):
        with contextlib.suppress(OSError):  # not empty: it holds files of others
            (root / d).rmdir()
    if [p.name for p in root.iterdir()] == [MANIFEST]:
        (root / MANIFEST).unlink()
        root.rmdir()
        os.replace(tmp, root)
        return
    # others' files remain: move the new tree in beside them, the manifest last
    for d in sorted(new["dirs"], key=lambda d: d.count("/")):
        (root / d).mkdir(exist_ok=True)
    for f in new["files"]:
        os.replace(tmp / f, root / f)
    os.replace(tmp / MANIFEST, root / MANIFEST)
    shutil.rmtree(tmp)


def _write_image(root: Path, split_i: int, split: str, i: int, seed: int, image_size: int,
                 sp_idx: int | None, spurious_p: float) -> tuple[str, set[str], set[str], bool]:
    """Render and write image ``i`` of ``split`` (its own random stream: any split count change leaves the other
    splits' images as they were); returns (stem, classes present, classes only difficult, grid background)."""
    rng = np.random.default_rng([seed, split_i, i])
    stem = f"{split_i}{i:06d}"
    spurious_bg = False
    classes_wanted = None
    if sp_idx is not None:
        k = int(rng.integers(1, 5))
        classes_wanted = [int(rng.integers(len(CLASSES))) for _ in range(k)]
        if split == "train":
            spurious_bg = sp_idx in classes_wanted and rng.random() < spurious_p
        else:
            spurious_bg = rng.random() < spurious_p * 0.5
    rgb, cls_map, obj_map, objs = render(rng, image_size, spurious_bg, classes_wanted)
    Image.fromarray(rgb).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
    pal = voc_palette()
    for arr, sub in ((cls_map, "SegmentationClass"), (obj_map, "SegmentationObject")):
        p = Image.fromarray(arr, mode="P")
        p.putpalette(pal)
        p.save(root / sub / f"{stem}.png")
    (root / "Annotations" / f"{stem}.xml").write_bytes(_annotation_xml(stem, image_size, objs))
    return (stem, {o["name"] for o in objs if o["visible"] >= 0.6}, {o["name"] for o in objs if o["visible"] < 0.6},
            spurious_bg)


def _write_images(jobs: list[tuple], workers: int) -> list[tuple[str, set[str], set[str], bool]]:
    """:func:`_write_image` over ``jobs`` in ``workers`` forked processes (Linux; elsewhere, where forking a process
    that has loaded torch is not safe, in this one); the files do not depend on the number of workers."""
    import multiprocessing as mp

    if workers > 1 and len(jobs) > 1 and sys.platform.startswith("linux"):
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            return list(pool.map(_write_image, *zip(*jobs), chunksize=max(1, len(jobs) // (8 * workers))))
    return [_write_image(*job) for job in jobs]


def _write_tree(root: Path, counts, seed, image_size, spurious_class, spurious_p, workers: int = 1):
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "Annotations",
              "ImageSets/Main", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids: dict[str, list[str]] = {k: [] for k in SPLITS}
    present: dict[str, list[set[str]]] = {k: [] for k in SPLITS}
    difficult_only: dict[str, list[set[str]]] = {k: [] for k in SPLITS}
    sp_idx = CLASSES.index(spurious_class) if spurious_class else None
    grid_bg: dict[str, list[str]] = {k: [] for k in SPLITS}
    jobs = [(root, split_i, split, i, seed, image_size, sp_idx, spurious_p)
            for split_i, split in enumerate(SPLITS) for i in range(counts[split])]
    for job, (stem, pres, diff, grid) in zip(jobs, _write_images(jobs, workers)):
        split = job[2]
        if grid:
            grid_bg[split].append(stem)
        ids[split].append(stem)
        present[split].append(pres)
        difficult_only[split].append(diff)
    main = root / "ImageSets" / "Main"
    seg = root / "ImageSets" / "Segmentation"
    for split in SPLITS:
        text = "".join(f"{s}\n" for s in ids[split])
        (main / f"{split}.txt").write_text(text)
        (seg / f"{split}.txt").write_text(text)
        for c in CLASSES:
            lines = []
            for s, p, d in zip(ids[split], present[split], difficult_only[split]):
                flag = 1 if c in p else (0 if c in d else -1)
                lines.append(f"{s} {flag:2d}\n")
            (main / f"{c}_{split}.txt").write_text("".join(lines))
    tv = ids["train"] + ids["val"]
    (main / "trainval.txt").write_text("".join(f"{s}\n" for s in tv))
    (seg / "trainval.txt").write_text("".join(f"{s}\n" for s in tv))
    for c in CLASSES:
        a = (main / f"{c}_train.txt").read_text() + (main / f"{c}_val.txt").read_text()
        (main / f"{c}_trainval.txt").write_text(a)
    meta = {"generator": GENERATOR, **tree_settings(counts, seed, image_size, spurious_class, spurious_p),
            "spurious_background": grid_bg if spurious_class else None, "complete": True,
            # what this run wrote, so that overwrite=True deletes exactly that and nothing else
            "dirs": sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()),
            "files": sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())}
    (root / MANIFEST).write_text(json.dumps(meta, indent=1))
