"""A cache of attribution maps on disk: what ``python -m explainer attribute`` writes and distillation reads.

Layout of a cache folder::

    manifest.json               method, options, explanandum (spec + weights fingerprint), split, image ids,
                                targets mode, resolution, dtype, shard size and count
    shard-00000.safetensors     the maps of positions [0, S) of the split, S = shard size
    shard-00001.safetensors     ...

A shard holds, for every (image, class) pair of its images, ``maps`` (P, R, R) fp16 in [0, 1] or uint8
(value / 255), ``position`` (P,) int64 (the image's position in the split) and ``class_index`` (P,) int64.
Maps are min-max normalised per map (:func:`explainer.core.maps.minmax_normalize`), so a signed or unbounded
attribution keeps its ranking; a shard file appears complete under its name or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from explainer.core.io import atomic_save_safetensors, atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "explainer.attributions/1"
DTYPES = ("fp16", "uint8")
TARGETS = ("present", "predicted", "all")


def shard_path(root: str | os.PathLike, k: int) -> Path:
    return Path(root) / f"shard-{k:05d}.safetensors"


def encode_maps(maps: torch.Tensor, dtype: str) -> torch.Tensor:
    """Maps in [0, 1] as stored: fp16, or uint8 of ``round(255 * m)``."""
    if dtype == "fp16":
        return maps.to(torch.float16)
    if dtype == "uint8":
        return (maps.clamp(0, 1) * 255).round().to(torch.uint8)
    raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")


def decode_maps(stored: torch.Tensor) -> torch.Tensor:
    """Stored maps back to float32 in [0, 1]."""
    return stored.float() / 255 if stored.dtype == torch.uint8 else stored.float()


def write_shard(root: str | os.PathLike, k: int, maps: torch.Tensor, position: torch.Tensor,
                class_index: torch.Tensor, dtype: str) -> Path:
    """Write shard ``k`` atomically: maps (P, R, R) in [0, 1], position (P,), class_index (P,)."""
    return atomic_save_safetensors({"maps": encode_maps(maps, dtype), "position": position.long(),
                                    "class_index": class_index.long()}, shard_path(root, k))


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"cache: {str(path)!r} does not exist (expected the output folder of "
                                "python -m explainer attribute)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"cache: {str(path)!r} is not valid JSON: {err}") from err
    if manifest.get("format") != FORMAT:
        raise ValueError(f"cache: {str(path)!r} holds format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    return atomic_write_text(Path(root) / MANIFEST, json.dumps({"format": FORMAT, **manifest}, indent=1) + "\n")


def done_shards(root: str | os.PathLike, num_shards: int) -> set[int]:
    """Shards already written completely (a shard file exists only once complete)."""
    return {k for k in range(num_shards) if shard_path(root, k).is_file()}


class MapCache:
    """The maps of a complete cache in memory, looked up by image id: ``maps_for(ids) -> {id: (classes, maps)}``.

    Args:
        root: the cache folder.
        fingerprint: the explanandum's weights fingerprint the maps must have been made with (None: unchecked).
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(root)
        got = self.manifest["explanandum"]["fingerprint"]
        if fingerprint is not None and got != fingerprint:
            raise ValueError(f"cache: {str(self.root)!r} holds maps of another classifier (fingerprint {got}), "
                             f"this explainer's explanandum has fingerprint {fingerprint}")
        n = int(self.manifest["num_shards"])
        missing = sorted(set(range(n)) - done_shards(root, n))
        if missing:
            raise ValueError(f"cache: {str(self.root)!r} is incomplete: shards {missing[:10]} of {n} are missing "
                             "(run the same attribute command again to finish it)")
        ids = self.manifest["image_ids"]
        per_image: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for k in range(n):
            shard = load_file(str(shard_path(root, k)))
            for p, c, m in zip(shard["position"].tolist(), shard["class_index"].tolist(), shard["maps"]):
                per_image.setdefault(ids[p], []).append((c, m))
        self.entries = {i: (torch.tensor([c for c, _ in v]), torch.stack([m for _, m in v]))
                        for i, v in per_image.items()}
        self.resolution = int(self.manifest["resolution"])

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, image_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes (K,), maps (K, R, R) float in [0, 1]) of one image; KeyError naming the id otherwise."""
        try:
            classes, maps = self.entries[image_id]
        except KeyError:
            raise KeyError(f"cache: no maps for image {image_id!r} in {str(self.root)!r} (made for split "
                           f"{self.manifest['split']!r}, {len(self.manifest['image_ids'])} images); train on the "
                           "images the cache was made for") from None
        return classes, decode_maps(maps)
