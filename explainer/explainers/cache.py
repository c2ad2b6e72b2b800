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

Integrity: each shard's safetensors metadata holds ``sha256``, a digest of its tensors (names, dtypes, shapes and
bytes; :func:`content_digest`), written in the same atomic write as the shard. When a run ends, the manifest's
``shards`` table records each shard file's ``size`` and ``sha256`` (of the whole file). :func:`read_shard` checks
both (the table when it lists the file, else the digest in the shard), and the shape of what it holds; a resumed
``attribute`` computes a damaged shard again, and every error names the file. Shards and manifests written before
the checksums existed (no ``sha256``, no ``shards``) are checked by their structure only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

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


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of tensors: each name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_shard(root: str | os.PathLike, k: int, maps: torch.Tensor, position: torch.Tensor,
                class_index: torch.Tensor, dtype: str) -> Path:
    """Write shard ``k`` atomically: maps (P, R, R) in [0, 1], position (P,), class_index (P,), and the digest of
    the three in the file's metadata."""
    tensors = {"maps": encode_maps(maps, dtype), "position": position.long().cpu(),
               "class_index": class_index.long().cpu()}
    return atomic_save_safetensors(tensors, shard_path(root, k), {"sha256": content_digest(tensors)})


def file_record(data: bytes) -> dict[str, Any]:
    """What the manifest's ``shards`` table records of a shard file."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class DamagedShard(ValueError):
    """A shard file that fails verification; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cache: shard {str(path)!r} is damaged ({reason}); run the same attribute command again "
                         "to compute it again")
        self.path, self.reason = path, reason


def _header_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def read_shard(root: str | os.PathLike, k: int, record: dict[str, Any] | None = None,
               rows: range | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Shard ``k``, verified: (tensors, its file record). ValueError naming the file if it is damaged.

    ``record``: the manifest's size and sha256 of the file (None: unlisted, the digest inside the shard is
    checked instead, when it has one). ``rows``: the positions the shard must hold (None: unchecked).
    Raises :class:`DamagedShard` (a ValueError).
    """
    path = shard_path(root, k)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DamagedShard(path, f"unreadable: {err.strerror or err}") from None
    got = file_record(data)
    if record is not None and (got["size"], got["sha256"]) != (record.get("size"), record.get("sha256")):
        what = (f"{got['size']} bytes, the manifest records {record.get('size')}" if got["size"] != record.get("size")
                else "its sha256 differs from the one the manifest records")
        raise DamagedShard(path, what)
    try:
        tensors, meta = load_safetensors(data), _header_metadata(data)
    except Exception as err:  # safetensors' SafetensorError, a bad header
        raise DamagedShard(path, f"truncated or corrupt: {err}") from None
    problem = _shard_problem(tensors, meta if record is None else {}, rows)  # a record covers the whole file
    if problem:
        raise DamagedShard(path, problem)
    return tensors, got


def _shard_problem(tensors: dict[str, torch.Tensor], meta: dict[str, str], rows: range | None) -> str | None:
    """What is wrong with a shard's content, or None."""
    if set(tensors) != {"maps", "position", "class_index"}:
        return f"holds {sorted(tensors)}, expected ['class_index', 'maps', 'position']"
    if "sha256" in meta and content_digest(tensors) != meta["sha256"]:
        return "its content does not match the sha256 written with it"
    p = tensors["maps"].shape[0]
    if tensors["maps"].dim() != 3 or tensors["position"].shape != (p,) or tensors["class_index"].shape != (p,):
        return (f"maps {tuple(tensors['maps'].shape)}, position {tuple(tensors['position'].shape)}, class_index "
                f"{tuple(tensors['class_index'].shape)}: expected (P, R, R), (P,), (P,)")
    pos = tensors["position"]
    if rows is not None and p and not (rows.start <= int(pos.min()) and int(pos.max()) < rows.stop):
        return f"positions {int(pos.min())}..{int(pos.max())} outside its images {rows.start}..{rows.stop - 1}"
    return None


def shard_rows(manifest: dict[str, Any], k: int) -> range:
    """The positions of the split that shard ``k`` of a cache holds."""
    s, n = int(manifest["shard_size"]), len(manifest["image_ids"])
    return range(k * s, min(n, (k + 1) * s))


def verify_shards(root: str | os.PathLike, manifest: dict[str, Any], records: dict[str, Any] | None = None
                  ) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """The shards on disk: ({k: file record} of the sound ones, {k: reason} of the damaged ones).

    ``records``: the ``shards`` table of the manifest the shards were written under (None or {}: none).
    """
    good, bad = {}, {}
    for k in sorted(done_shards(root, int(manifest["num_shards"]))):
        try:
            good[k] = read_shard(root, k, (records or {}).get(shard_path(root, k).name), shard_rows(manifest, k))[1]
        except DamagedShard as err:
            bad[k] = err.reason
    return good, bad


def shard_table(root: str | os.PathLike, manifest: dict[str, Any], known: dict[int, dict[str, Any]]
                ) -> dict[str, dict[str, Any]]:
    """The manifest's ``shards`` table: ``known`` records, and those of the other sound shards on disk."""
    table = {}
    for k in range(int(manifest["num_shards"])):
        record = known.get(k)
        if record is None and shard_path(root, k).is_file():
            try:
                record = read_shard(root, k, None, shard_rows(manifest, k))[1]
            except DamagedShard:
                continue  # not recorded: the next run computes it again, MapCache names it
        if record is not None:
            table[shard_path(root, k).name] = record
    return table


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"cache: {str(path)!r} does not exist (expected the output folder of "
                                "python -m explainer attribute)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cache: {str(path)!r} is not valid JSON: {err}") from err
    except OSError as err:
        raise ValueError(f"cache: cannot read {str(path)!r}: {err.strerror or err}") from None
    got = manifest.get("format") if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
    if got != FORMAT:
        raise ValueError(f"cache: {str(path)!r} holds format {got!r}, expected {FORMAT!r}")
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
        missing_keys = [k for k in ("explanandum", "num_shards", "image_ids", "shard_size", "resolution")
                        if k not in self.manifest]
        if missing_keys:
            raise ValueError(f"cache: {str(self.root / MANIFEST)!r} lacks {missing_keys} (expected the manifest of "
                             "python -m explainer attribute)")
        got = (self.manifest["explanandum"] or {}).get("fingerprint")
        if fingerprint is not None and got != fingerprint:
            raise ValueError(f"cache: {str(self.root)!r} holds maps of another classifier (fingerprint {got}), "
                             f"this explainer's explanandum has fingerprint {fingerprint}")
        n = int(self.manifest["num_shards"])
        missing = sorted(set(range(n)) - done_shards(root, n))
        if missing:
            raise ValueError(f"cache: {str(self.root)!r} is incomplete: shards {missing[:10]} of {n} are missing "
                             "(run the same attribute command again to finish it)")
        ids = self.manifest["image_ids"]
        records = self.manifest.get("shards") or {}
        per_image: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for k in range(n):
            shard, _ = read_shard(root, k, records.get(shard_path(root, k).name), shard_rows(self.manifest, k))
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
