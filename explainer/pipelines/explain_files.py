"""``python -m explainer explain``: masks for a file or a folder of images."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from explainer.core import viz
from explainer.core.io import atomic_write_text
from explainer.data.folder import IMAGE_SUFFIXES
from explainer.data.images import read_image
from explainer.explainers.explanation import ExplainsImages, input_resolution

REPORT = "explanations.json"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def list_images(path: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The image files of ``path`` (a file, or a folder searched recursively), without any below ``exclude``
    (the output folder: outputs are never inputs)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"images: no such file or directory {str(path)!r}")
    skip = Path(exclude).resolve() if exclude is not None else None
    if skip is not None and _inside(path.resolve(), skip):
        raise ValueError(f"out: {str(exclude)!r} holds the images folder {str(path)!r}; expected an output "
                         "folder that does not contain the images (one inside the images folder is skipped when "
                         "reading them)")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and not (skip is not None and _inside(p.resolve(), skip)))
    if not files:
        raise FileNotFoundError(f"images: {str(path)!r} holds no images ({sorted(IMAGE_SUFFIXES)})")
    return files


def output_stem(image: Path, root: Path | None) -> Path:
    """Where an image's outputs go, relative to the output folder: its path relative to ``root`` (the folder
    given), its extension kept in the name (``s1/img.jpg`` -> ``s1/img_jpg``), so that no two inputs share
    outputs and the same input always gets the same names."""
    rel = image.relative_to(root) if root is not None else Path(image.name)
    return rel.parent / rel.name.replace(".", "_")


def _write(module, img, masks, classes, probabilities, stem: Path, extra: dict | None = None) -> dict:
    names = module.explanandum.class_names
    entries = []
    for k, (m, c) in enumerate(zip(masks, classes.tolist())):
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in names[c])
        q = (m.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        viz.save_png(q, stem.parent / f"{stem.name}_{safe}_mask.png")
        viz.save_png(viz.overlay(img, m), stem.parent / f"{stem.name}_{safe}_overlay.png")
        entries.append({"class": names[c], "index": c, "probability": float(probabilities[c]),
                        "mask_area": float(m.mean()),
                        **{name: bool(v[k]) if name == "refined" else float(v[k])
                           for name, v in (extra or {}).items()}})
    return {"top_classes": entries}


def explain_files(module: ExplainsImages, images: list[Path], out: str | os.PathLike, top_k: int = 3,
                  batch_size: int = 16, size: int | None = None, progress: bool = True,
                  root: str | os.PathLike | None = None, trust: bool = False, refine: float = 0.0) -> dict:
    """Write ``<name>_<class>_mask.png`` and ``_overlay.png`` for the top-k classes, and explanations.json.

    Outputs mirror the input tree below ``root`` (see :func:`output_stem`); explanations.json is keyed by the
    same relative paths. Each batch of images goes through ``module.explanation`` (resized to the explainer's
    input size, masks resized back to each image's size). A file that cannot be read does not stop the run: its
    entry in explanations.json is ``{"error": reason}``, and the reason is printed on stderr. ``trust``: each
    mask's entry also holds its ``trust``, ``keep`` and ``remove``; ``refine``: the fraction of masks of lowest
    trust (per batch) refined per image, marked ``"refined": true`` (``explanation(trust=, refine=)``).
    """
    for name, v in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    input_resolution(module, size)  # checks size
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out: {str(out)!r} is an existing file; expected a folder for the masks")
    root = Path(root) if root is not None and Path(root).is_dir() else None
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict] = {}
    keys = [str(p.relative_to(root) if root is not None else p) for p in images]
    k = max(1, min(top_k, module.explanandum.num_classes))
    for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc="explain", unit="batch"):
        good, xs = [], []
        for p, key in zip(images[i:i + batch_size], keys[i:i + batch_size]):
            try:
                xs.append(read_image(p))
                good.append((p, key))
            except (ValueError, OSError) as err:
                report[key] = {"error": str(err)}
                print(f"explain: skipped {key}: {err}", file=sys.stderr)
        if not good:
            continue
        e = module.explanation(xs, top_k=k, size=size, trust=trust, refine=refine)
        fields = [f for f in ("trust", "keep", "remove", "refined") if getattr(e, f) is not None]
        for j, ((p, key), img, masks, classes, probs) in enumerate(zip(good, xs, e.masks, e.classes,
                                                                         e.probabilities)):
            extra = {f: getattr(e, f)[j].tolist() for f in fields}
            report[key] = _write(module, img, masks.cpu(), classes, probs.cpu(), out / output_stem(p, root), extra)
    report = {key: report[key] for key in keys}  # in the order of the files
    atomic_write_text(out / REPORT, json.dumps(report, indent=1))
    return report


def exit_code(report: dict, out: str | os.PathLike, skip_bad: bool = False, what: str = "masks") -> int:
    """Print what was written and which files could not be read; 1 if any could not (0 with ``skip_bad``)."""
    failed = [k for k, v in report.items() if "error" in v]
    print(f"wrote {what} of {len(report) - len(failed)} image(s) to {out}")
    if not failed:
        return 0
    print(f"{'warning' if skip_bad else 'error'}: {len(failed)} of {len(report)} file(s) could not be read "
          f"(listed with their reasons in {Path(out) / REPORT}): {', '.join(failed)}", file=sys.stderr)
    return 0 if skip_bad else 1
