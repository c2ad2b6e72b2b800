"""``python -m explainer attribute``: a registered method's maps (or an explainer's masks) for every image of a
dataset split, distributed with Lightning's ``Trainer.predict``, written as a resumable sharded cache.

    python -m explainer attribute --method dix --data configs/synthetic/explainer.yaml --split train \\
        --out runs/attr/dix [--options '{"steps": 10}'] [--targets present] [--trainer.devices 2 \\
        --trainer.strategy ddp]

``--data`` is a YAML with a ``data:`` section (``class_path``/``init_args``; a training config works) or the
section itself; the split is taken as that datamodule gives it (its ``limit_<split>`` subset included) without
augmentation. Shard ``k`` holds the images at positions ``[k S, (k + 1) S)``; process ``r`` of ``R`` computes
the shards ``k`` with ``k mod R = r``, so any number of processes writes the same files. Shards already on disk
are verified and skipped (resume after a kill: a shard appears complete or not at all; a damaged one, e.g.
truncated, is named on stderr and computed again), and a cache made with another
method, options, explanandum, split, targets, resolution or dtype is refused. The format:
:mod:`explainer.explainers.cache`.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from explainer.core.maps import minmax_normalize, upsample
from explainer.core.targets import predicted_classes
from explainer.data.build import build_datamodule
from explainer.explainers import cache
from explainer.explainers.base import fingerprint
from explainer.explainers.cache import DTYPES, TARGETS, read_manifest, write_manifest, write_shard
from explainer.explanandum import load_explanandum
from explainer.methods.base import get as get_method
from explainer.pipelines.args import parse

# what must agree between a cache on disk and a run that continues it
IDENTITY = ("method", "options", "explanandum", "split", "image_ids", "targets", "resolution", "dtype",
            "shard_size")


class Positioned(Dataset):
    """The samples of ``dataset`` with their position added (``"position"``)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "position": i}


class ShardBatches(Sampler[list[int]]):
    """Batches that are whole shards: shard ``k`` = positions ``[k S, (k+1) S)``, those with ``k mod R = r`` that
    are not done yet, in order."""

    def __init__(self, n: int, shard_size: int, rank: int, world: int, done: set[int]):
        self.n, self.s = n, shard_size
        self.shards = [k for k in range(num_shards(n, shard_size)) if k % world == rank and k not in done]

    def __iter__(self):
        for k in self.shards:
            yield list(range(k * self.s, min(self.n, (k + 1) * self.s)))

    def __len__(self) -> int:
        return len(self.shards)


def num_shards(n: int, shard_size: int) -> int:
    return (n + shard_size - 1) // shard_size


class AttributionTask(pl.LightningModule):
    """``predict_step``: the maps of every (image, class) pair of a shard, min-max normalised, at ``resolution``."""

    def __init__(self, method: Any, targets: str, resolution: int | None):
        super().__init__()
        self.method, self.targets, self.resolution = method, targets, resolution
        # the modules the method holds (explanandum, a trained explainer), so that the Trainer moves them
        self.held = nn.ModuleList([v for v in vars(method).values() if isinstance(v, nn.Module)])

    def pairs(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.method.f
        if self.targets == "present":
            nz = (labels > 0.5).nonzero()
            return nz[:, 0], nz[:, 1]
        if self.targets == "predicted":
            return torch.arange(x.shape[0], device=x.device), predicted_classes(f, x)
        b = x.shape[0]
        return (torch.arange(b, device=x.device).repeat_interleave(f.num_classes),
                torch.arange(f.num_classes, device=x.device).repeat(b))

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        x = batch["image"]
        img, cls = self.pairs(x, batch["labels"])
        maps = self.method.attribute(x[img], cls) if img.numel() else x.new_zeros(0, 1, *x.shape[-2:])
        r = self.resolution or x.shape[-1]
        maps = minmax_normalize(upsample(maps.float(), (r, r)))[:, 0]
        return {"maps": maps.cpu(), "position": batch["position"][img.cpu()].cpu(), "class_index": cls.cpu(),
                "shard": int(batch["position"][0]), "images": x.shape[0]}


class ShardWriter(BasePredictionWriter):
    """Writes each predicted batch (one shard) atomically as ``shard-<k>.safetensors``."""

    def __init__(self, out: Path, shard_size: int, dtype: str):
        super().__init__(write_interval="batch")
        self.out, self.shard_size, self.dtype = out, shard_size, dtype

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        k = prediction["shard"] // self.shard_size
        write_shard(self.out, k, prediction["maps"], prediction["position"], prediction["class_index"], self.dtype)


class ImagesPerSecond(TQDMProgressBar):
    """Lightning's progress bar, with images per second."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not hasattr(self, "_t0"):
            self._t0, self._images = time.perf_counter(), 0
        self._images += int(outputs["images"])
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.predict_progress_bar is not None:
            self.predict_progress_bar.set_postfix(img_s=f"{self._images / (time.perf_counter() - self._t0):.2f}")


class ShardLoader(pl.LightningDataModule):
    """The predict loader of a process: its shards that are not done (:class:`ShardBatches`)."""

    def __init__(self, ds: Dataset, shard_size: int, done: set[int], num_workers: int):
        super().__init__()
        self.ds, self.shard_size, self.done, self.num_workers = ds, shard_size, done, num_workers

    def predict_dataloader(self) -> DataLoader:
        sampler = ShardBatches(len(self.ds), self.shard_size, self.trainer.global_rank, self.trainer.world_size,
                               self.done)
        return DataLoader(Positioned(self.ds), batch_sampler=sampler, num_workers=self.num_workers)


def load_data_config(spec: str | dict) -> dict[str, Any]:
    """The data section of a YAML file (a training config's ``data:``, or the section itself) or of a dict."""
    cfg = spec
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"data: no such config file {spec!r}")
        cfg = yaml.safe_load(path.read_text()) or {}
    if isinstance(cfg, dict) and "data" in cfg:
        cfg = cfg["data"]
    if not isinstance(cfg, dict) or "class_path" not in cfg:
        raise ValueError(f"data: expected a datamodule section {{class_path: ..., init_args: {{...}}}}, got {cfg!r}")
    return cfg


def build_split(data: dict[str, Any], split: str) -> tuple[Any, Dataset]:
    dm = build_datamodule(data)
    return dm, dm.dataset(split, train_transform=False)


def check_resume(out: Path, manifest: dict[str, Any]) -> None:
    """Refuse to continue a cache made with other settings (another explanandum first, by name)."""
    if not (out / "manifest.json").is_file():
        return
    old = read_manifest(out)
    if old.get("explanandum", {}).get("fingerprint") != manifest["explanandum"]["fingerprint"]:
        raise ValueError(f"out: {str(out)!r} holds maps of another explanandum (fingerprint "
                         f"{old.get('explanandum', {}).get('fingerprint')}, this run's is "
                         f"{manifest['explanandum']['fingerprint']}); use another --out")
    differ = [k for k in IDENTITY if json.loads(json.dumps(old.get(k))) != json.loads(json.dumps(manifest[k]))]
    if differ:
        raise ValueError(f"out: {str(out)!r} holds a cache made with other settings ({', '.join(differ)} differ); "
                         "use another --out, or the same settings to resume it")


def sound_shards(out: Path, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The shards already in ``out`` that pass verification (their file records); damaged ones are named on
    stderr (they are computed again, the atomic write replacing them)."""
    if not out.is_dir():
        return {}
    old = read_manifest(out) if (out / "manifest.json").is_file() else {}
    good, bad = cache.verify_shards(out, manifest, old.get("shards"))
    for k, why in bad.items():
        print(f"attribute: shard {str(cache.shard_path(out, k))!r} is damaged ({why}); computing it again",
              file=sys.stderr)
    return good


def attribute(method: str, data: str | dict, split: str, out: str | Path, options: dict | None = None,
              explanandum: str | None = None, targets: str = "present", resolution: int | None = None,
              dtype: str = "fp16", shard_size: int = 32, trainer: dict | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Compute and write the cache (see the module docstring); returns the manifest."""
    if targets not in TARGETS:
        raise ValueError(f"targets: expected one of {TARGETS}, got {targets!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    options = dict(options or {})
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out: {str(out)!r} is an existing file; expected a folder for the cache")
    data = load_data_config(data)
    dm, ds = build_split(data, split)
    spec = explanandum or (data.get("init_args") or {}).get("explanandum")
    if spec is None:
        raise ValueError("explanandum: give --explanandum (the classifier spec) to explain")
    f = load_explanandum(spec)
    m = get_method(method, f, **options)
    n = len(ds)
    ids = [ds.image_id(i) if hasattr(ds, "image_id") else str(i) for i in range(n)]
    manifest = {"method": method, "options": options, "split": split, "image_ids": ids, "targets": targets,
                "resolution": resolution or int(getattr(dm, "image_size", 0) or 0) or None, "dtype": dtype,
                "shard_size": shard_size, "num_shards": num_shards(n, shard_size), "data": data,
                "explanandum": {"spec": f.spec, "fingerprint": fingerprint(m.f)},
                "class_names": list(m.f.class_names)}
    check_resume(out, manifest)
    known = sound_shards(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)
    for stale in out.glob(".shard-*.tmp"):  # a write this command started and a kill interrupted
        stale.unlink()
    done = set(known)
    task = AttributionTask(m, targets, manifest["resolution"])
    tr_kwargs = {"accelerator": "cpu", "devices": 1, **(trainer or {})}
    tr = pl.Trainer(**tr_kwargs, inference_mode=False, use_distributed_sampler=False, logger=False,
                    enable_checkpointing=False, enable_progress_bar=progress,
                    callbacks=[ShardWriter(out, shard_size, dtype)] + ([ImagesPerSecond()] if progress else []))
    loader = ShardLoader(ds, shard_size, done, int(getattr(dm, "num_workers", 0) or 0))
    if len(done) < manifest["num_shards"]:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # ShardBatches returns every index of its shards; Lightning cannot know it and says so
            warnings.filterwarnings("ignore", message="You are using a custom batch sampler")
            tr.predict(task, datamodule=loader, return_predictions=False)
        if tr.is_global_zero:  # what this run cost (a resumed run: its own part only)
            todo = sum(min(n, (k + 1) * shard_size) - k * shard_size for k in range(manifest["num_shards"])
                       if k not in done)
            seconds = time.perf_counter() - t0
            manifest["last_run"] = {"images": todo, "seconds": seconds, "seconds_per_image": seconds / todo,
                                    "processes": tr.world_size}
    if tr.is_global_zero:  # each shard's size and sha256, checked by MapCache and by the next run
        manifest["shards"] = cache.shard_table(out, manifest, known)
        write_manifest(out, manifest)
    return manifest


def config_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m explainer attribute", exit_on_error=False,
                       description="A method's maps for every image of a split, as a resumable sharded cache.")
    p.add_argument("--config", action="config")
    p.add_argument("--method", type=str, required=True, help="a registered method (python -c 'import explainer; "
                   "print(explainer.methods.available())')")
    p.add_argument("--options", type=dict[str, Any], default={}, help="the method's options (JSON)")
    p.add_argument("--data", type=str, required=True, help="YAML with the datamodule (a training config works)")
    p.add_argument("--split", type=str, default="train")
    p.add_argument("--out", type=str, required=True, help="the cache folder")
    p.add_argument("--explanandum", type=str | None, default=None,
                   help="the classifier (default: the data config's model explanandum)")
    p.add_argument("--targets", type=Literal["present", "predicted", "all"], default="present",
                   help="classes explained per image: labelled, the top-1, or every class")
    p.add_argument("--resolution", type=PositiveInt | None, default=None, help="side of the stored maps")
    p.add_argument("--dtype", type=Literal["fp16", "uint8"], default="fp16")
    p.add_argument("--shard_size", type=PositiveInt, default=32, help="images per shard")
    p.add_argument("--progress", type=bool, default=True)
    p.add_class_arguments(pl.Trainer, "trainer", fail_untyped=False, skip={"callbacks", "logger", "inference_mode",
                          "use_distributed_sampler", "enable_checkpointing", "enable_progress_bar"})
    return p


def main(argv: list[str] | None = None) -> int:
    parser = config_parser()
    a = parse(parser, argv).as_dict()
    defaults = parser.get_defaults().as_dict()["trainer"]
    given = {k: v for k, v in a["trainer"].items() if v != defaults.get(k)}
    data_spec = a["data"]
    explanandum = a["explanandum"]
    if explanandum is None and Path(data_spec).is_file():
        full = yaml.safe_load(Path(data_spec).read_text()) or {}
        explanandum = (((full.get("model") or {}).get("init_args") or {}).get("explanandum")
                       if isinstance(full, dict) else None)
    man = attribute(a["method"], data_spec, a["split"], a["out"], options=a["options"], explanandum=explanandum,
                    targets=a["targets"], resolution=a["resolution"], dtype=a["dtype"],
                    shard_size=a["shard_size"], trainer=given, progress=a["progress"])
    print(f"wrote {man['num_shards']} shard(s) of {a['method']} maps for {len(man['image_ids'])} image(s) to "
          f"{a['out']}")
    return 0
