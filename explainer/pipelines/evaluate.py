"""``python -m explainer evaluate --config configs/<...>.yaml --out results.json``.

Runs every configured attribution method on a seeded, fixed subset of a split, times it, scores its maps
with :mod:`explainer.metrics`, and writes ``results.json`` (format below; a metric that does not apply is
never written as a number), ``results.md`` (the same numbers as a markdown table) and ``results.png`` (a
grid of images by methods) beside it.

Targets. ``target: predicted`` explains the classifier's top-1 class of each image (one map per image).
``target: groundtruth`` explains *every class present in the image*: a multi-label image with ``k``
labelled classes gives ``k`` (image, class) pairs, each with its own map and its own scores; faithfulness
metrics average over pairs, the pointing game over classes (TorchRay), ``miou``/``pixel_accuracy``
accumulate pixels over pairs (LTX/IIA). This is the TorchRay and Explainer-paper protocol, and it avoids
choosing one arbitrary class of a multi-label image. ``seconds_per_image`` is the method's time over the
images (all their pairs), ``seconds_per_map`` over the maps.

results.json (one JSON object; what :func:`run` returns)::

    {"explanandum": "<spec>", "dataset": "<DataModule>(<root>)", "split": "test", "num_images": 200,
     "target": "groundtruth | predicted", "baseline": "mean | black | blur", "device": "cpu", "seed": 0,
     "metric_specs": {"<metric>": {"direction": "higher | lower", "baseline": "...", "target": "...",
                                   "needs_gt_masks": false, "description": "..."}},
     "metric_options": {"<metric or group>": {...}},
     "methods": {"<method>": {"seconds_per_image": 0.0, "seconds_per_map": 0.0, "num_maps": 0,
                              "options": {...}, "metrics": {"<metric>": 0.0},
                              "skipped_metrics": {"<metric>": "<why it was left out>"},
                              "thresholds": {"<metric>": {"threshold": 0.35, "mean_iou": 0.0, "num_maps": 0,
                                                          "normalize": "minmax", "void_band": 5}}}},
     "validation_images": {"split": "val", "num_images": 100},
     "num_images_requested": 500, "notes": ["split 'test' has 200 images, fewer than the 500 asked for ..."]}

With ``trust`` (and ``refine_curve``), a trained explainer's entry also has (docs/TRUST.md;
:mod:`explainer.pipelines.evaluate_trust`)::

     "metrics": {..., "trust_auroc": 0.83},
     "trust": {"threshold": 0.35, "void_band": 5, "min_iou": 0.2, "masks": 229, "bad_share": 0.27,
               "seconds_per_map": 0.02},
     "refinement_curve": [{"r": 0.2, "share_refined": 0.2, "seconds": 41.9, "<metric>": 0.0, ...}, ...],
     "refinement_thresholds": {"<metric>": "mean | 0.35"}

``metric_specs`` then describes ``trust_auroc`` too, a method without a trust score lists it (and
``refinement_curve``) in ``skipped_metrics``, and the top level has ``"refinement": {"fractions": [...],
"images_per_call": 128, "call": ..., "directions": {...}}``; the curve is also plotted as ``refinement.png``
beside results.json (``<stem>_refinement.png`` beside another name).

``metrics`` holds only metrics that were evaluated; ``skipped_metrics`` is
present only when some were not. ``thresholds`` and ``validation_images``
appear when a metric's option ``threshold`` is ``val`` (each method also
runs on ``threshold_images`` seeded images of ``threshold_split``; the grid
threshold with the best mean per-map IoU there is applied to the evaluated
images); ``num_images_requested`` and ``notes`` when a split has fewer
images than asked for (all are used; the log says so too). Metric definitions: docs/METHODS.md
sections 12 to 19.

The config (YAML)::

    explanandum: checkpoints/classifier.safetensors   # or {spec: ..., num_classes: ..., weights: ...}
    data:                                             # "datamodule" works too
      class_path: explainer.data.SyntheticDataModule
      init_args: {root: data/synthetic, image_size: 128}
    split: test
    num_images: 200          # seeded fixed subset (seed below); null: the whole split
    seed: 0
    target: groundtruth      # groundtruth | predicted
    baseline: mean           # mean | black | blur: the fill of removed pixels in the metrics
    methods:                 # name -> options of explainer.methods.get(name, f, **options)
      gradcam: {}
      explainer: {checkpoint: checkpoints/explainer.ckpt}
      mine: {factory: "path/to/file.py:make", ...}   # any (f, **options) -> object with .attribute
    metrics: [deletion_auc, insertion_auc, miou]      # default: explainer.metrics.DEFAULT_METRICS
    metric_options: {deletion_auc: {steps: 50}}
    batch_size: 8            # images per data batch
    method_batch_size: 16    # maps per attribute() call (default: all pairs of a batch)
    max_batch: 128           # images per explanandum pass inside the metrics (memory bound)
    num_workers: 0
    device: auto             # auto | cpu | cuda | cuda:1
    channels_last: true      # the explanandum in channels-last format (faster convnets on CPU)
    figure_images: 6
    threshold_split: val     # images a metric option threshold: val is chosen on
    threshold_images: 100    # seeded subset of threshold_split (every method runs on it once more)
    trust: false             # true: trust_auroc of every trained explainer (the other methods skip it); or
                             # [names]: those methods, each a trained explainer (another is an error)
    refine_curve: null       # [0, 0.1, 0.2, 0.5, 1.0]: insertion_auc, miou, iou and the time of
                             # explanation(trust=True, refine=r) per r, for the methods trust selects

``trust_auroc``: the AUROC of ``1 - trust`` (the explainer's trust of each of its maps, no ground truth) at
finding the bad maps: IoU below 0.2 at the ``iou`` metric's threshold (``metric_options.iou``; ``threshold:
val`` is TRUST.md's definition) or the peak off the class region. The refinement curve calls ``explanation()``
on up to ``max_batch`` images at a time, so ``r`` is a fraction of each call's masks.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from explainer import metrics as M
from explainer.core.targets import predicted_classes
from explainer.data.base import seeded_subset
from explainer.data.build import build_datamodule
from explainer.explanandum import import_object, load_explanandum
from explainer.methods.base import METHODS
from explainer.methods.base import get as get_method
from explainer.pipelines.args import parse
from explainer.pipelines.evaluate_config import config_keys, config_parser, load_config, validate_config  # noqa: F401
from explainer.pipelines.evaluate_outputs import (  # noqa: F401
    markdown_table,
    refinement_path,
    save_figure,
    write_outputs,
)
from explainer.pipelines.evaluate_trust import (
    TRUST_METRIC,
    TrustTracker,
    curve_trackers,
    refinement_curve,
    refinement_record,
    trust_plan,
    trust_spec,
)

TARGETS = ("groundtruth", "predicted")


# ----------------------------------------------------------------------------------------------- config --
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config.device: {name!r} requested but CUDA is not available")
    return dev


def build_explanandum(spec: Any):
    """``spec`` a string for :func:`explainer.load_explanandum`, or a dict ``{spec: ..., **kwargs}``."""
    if isinstance(spec, dict):
        spec = dict(spec)
        if "spec" not in spec:
            raise ValueError(f"config.explanandum: a mapping needs a 'spec' key, got {sorted(spec)}")
        return load_explanandum(spec.pop("spec"), **spec)
    return load_explanandum(str(spec))


def build_dataset(data_cfg: dict, split: str, num_images: int | None, seed: int):
    """The evaluated images: the split (no augmentation) of the datamodule, seeded subset of ``num_images``."""
    dm = build_datamodule(data_cfg, where="config.data")
    return dm, seeded_subset(dm.dataset(split, train_transform=False), num_images, seed)


def subset_note(ds, requested: int | None, split: str, key: str) -> str | None:
    """What to say when a split has fewer images than ``requested`` (all of them are used); None otherwise."""
    if requested is None or len(ds) >= requested:
        return None
    return f"split {split!r} has {len(ds)} images, fewer than the {requested} asked for ({key}): all {len(ds)} used"


def check_method_options(methods: dict[str, dict]) -> None:
    """Fail before any work: unknown method names, missing checkpoint files."""
    for name, opts in methods.items():
        for key, val in opts.items():
            if key in ("checkpoint", "weights") or key.endswith("_checkpoint"):
                if val is not None and not Path(str(val)).is_file():
                    raise FileNotFoundError(f"config.methods.{name}.{key}: no such file {str(val)!r} "
                                            "(train or download it first, or remove the method)")
        if "factory" in opts:
            continue
        if name not in METHODS:
            try:
                METHODS.get(name)
            except ValueError as err:
                raise ValueError(f"config.methods: {err}") from None


def build_method(name: str, f, opts: dict) -> Any:
    opts = dict(opts)
    factory = opts.pop("factory", None)
    if factory is not None:
        built = import_object(str(factory), what=f"config.methods.{name}.factory")
        try:
            return built(f, **opts)
        except TypeError as err:
            raise TypeError(f"method {name!r} ({factory}): {err}") from err
    return get_method(name, f, **opts)


# ---------------------------------------------------------------------------------------------- running --
def make_pairs(f, x: torch.Tensor, labels: torch.Tensor, target: str, max_batch: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_index, class)`` long (N,) each: every labelled class (groundtruth) or the top-1 (predicted)."""
    if target == "predicted":
        return torch.arange(x.shape[0], device=x.device), predicted_classes(f, x, max_batch)
    nz = (labels > 0.5).nonzero()
    return nz[:, 0].to(x.device), nz[:, 1].to(x.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attribute(method, x: torch.Tensor, t: torch.Tensor, chunk: int | None) -> torch.Tensor:
    chunk = chunk or max(1, x.shape[0])
    outs = [method.attribute(x[i:i + chunk], t[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
    maps = torch.cat(outs) if outs else x.new_zeros(0, 1, *x.shape[-2:])
    return maps.detach().float()


def _pairs_of(f, batch: dict, cfg: dict, device: torch.device):
    x = batch["image"].to(device)
    img_idx, t = make_pairs(f, x, batch["labels"].to(device), cfg["target"], cfg["max_batch"])
    return x, img_idx, t, batch["mask"].to(device)[img_idx], batch["has_mask"].to(device).bool()[img_idx]


def validation_pairs(f, method, dm, cfg: dict, device: torch.device, note: dict) -> list[M.PairBatch]:
    """The method's maps on the seeded validation subset (``threshold_split``, ``threshold_images``), as pair
    batches; the random state of the evaluation is left as it was. ``note`` gets the split and image count."""
    ds = seeded_subset(dm.dataset(cfg["threshold_split"], train_transform=False), cfg["threshold_images"],
                       cfg["seed"])
    note.update(split=cfg["threshold_split"], num_images=len(ds))
    said = subset_note(ds, cfg["threshold_images"], cfg["threshold_split"], "threshold_images")
    if cfg["threshold_split"] == cfg["split"]:
        said = f"thresholds chosen on the evaluated split {cfg['split']!r} itself (threshold_split)"
    if said:
        note["note"] = said
        warnings.warn(f"evaluate: {said}", stacklevel=2)
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg["seed"])
        for batch in DataLoader(ds, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg["num_workers"]):
            x, img_idx, t, gt, has = _pairs_of(f, batch, cfg, device)
            maps = _attribute(method, x[img_idx], t, cfg["method_batch_size"])
            out.append(M.PairBatch(f, x[img_idx], maps, t, img_idx, gt, has, cfg["baseline"], cfg["max_batch"]))
    return out


def run(cfg: dict[str, Any], progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate every method; returns ``(results, figure)`` (results as written to results.json)."""
    from tqdm.auto import tqdm

    cfg = validate_config(cfg)
    device = resolve_device(cfg["device"])
    check_method_options(cfg["methods"])
    f = build_explanandum(cfg["explanandum"]).to(device)
    dm, ds = build_dataset(cfg["data"], cfg["split"], cfg["num_images"], cfg["seed"])
    if cfg["channels_last"] and len(ds):
        f.try_channels_last(ds[0]["image"][None].to(device))
    n_classes = getattr(dm, "num_classes", None)
    if n_classes is not None and n_classes != f.num_classes:
        raise ValueError(f"config: the explanandum predicts {f.num_classes} classes but the data has {n_classes}")
    loader = DataLoader(ds, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg["num_workers"])
    names = cfg["metrics"]
    results: dict[str, Any] = {
        "explanandum": str(cfg["explanandum"] if not isinstance(cfg["explanandum"], dict)
                           else cfg["explanandum"]["spec"]),
        "dataset": f"{type(dm).__name__}({getattr(dm, 'root', '')})",
        "split": cfg["split"], "num_images": len(ds), "class_names": list(f.class_names), "target": cfg["target"],
        "baseline": cfg["baseline"],
        "device": str(device), "seed": cfg["seed"], "metric_specs": M.describe(names, cfg["metric_options"]),
        "metric_options": cfg["metric_options"], "methods": {}}
    said = subset_note(ds, cfg["num_images"], cfg["split"], "num_images")
    if said:  # asked for more images than the split has: said in the log and in results.json
        results.update(num_images_requested=cfg["num_images"], notes=[said])
        warnings.warn(f"evaluate: {said}", stacklevel=2)
    figure: dict[str, Any] = {"images": [], "titles": [], "regions": [], "maps": {},
                              "class_names": list(f.class_names)}
    # build every method first: a bad option fails before hours of work on the methods before it
    built = {name: build_method(name, f, opts) for name, opts in cfg["methods"].items()}
    trusted, no_trust = trust_plan(cfg["trust"], built)
    if cfg["trust"] is not False:
        results["metric_specs"][TRUST_METRIC] = trust_spec()
    if cfg["refine_curve"]:
        results["refinement"] = refinement_record(cfg["refine_curve"], cfg["max_batch"])
    for name, opts in cfg["methods"].items():
        torch.manual_seed(cfg["seed"])
        method = built[name]
        tracker = M.MetricTracker(names, cfg["metric_options"])
        val_note: dict[str, Any] = {}
        ctx = M.MethodContext(
            f, method, rebuild=lambda g, name=name, opts=opts: build_method(name, g, opts),
            attribute=lambda m, xp, t: _attribute(m, xp, t, cfg["method_batch_size"]),
            validation=lambda method=method, note=val_note: validation_pairs(f, method, dm, cfg, device, note))
        record = tracker.prepare(ctx)
        trust = TrustTracker(trusted[name], cfg["metric_options"], ctx) if name in trusted else None
        curve_of = curve_trackers(cfg["refine_curve"], cfg["metric_options"], ctx) \
            if cfg["refine_curve"] and name in trusted else None
        if val_note:
            results["validation_images"] = {k: v for k, v in val_note.items() if k != "note"}
            if "note" in val_note and val_note["note"] not in results.setdefault("notes", []):
                results["notes"].append(val_note["note"])
        seconds, n_img, n_seen, n_maps = 0.0, 0, 0, 0
        first_method = not figure["maps"]
        fig_maps: list[torch.Tensor] = []
        for batch in tqdm(loader, desc=f"evaluate {name}", disable=not progress, leave=False):
            x, img_idx, t, gt, has = _pairs_of(f, batch, cfg, device)
            xp = x[img_idx]
            _sync(device)
            t0 = time.perf_counter()
            maps = _attribute(method, xp, t, cfg["method_batch_size"])
            _sync(device)
            seconds += time.perf_counter() - t0
            n_img += int(img_idx.unique().numel())  # images with at least one map
            n_seen += x.shape[0]
            n_maps += xp.shape[0]
            extra = tracker.batch_inputs(xp, t)
            pairs = M.PairBatch(f, xp, maps, t, img_idx + n_seen - x.shape[0], gt, has, cfg["baseline"],
                                cfg["max_batch"], **extra)
            try:
                tracker.update(pairs)
            except ValueError as err:
                raise ValueError(f"method {name!r}: {err}") from err
            if trust is not None:
                trust.update(pairs)
            # figure: the first map of each of the first images (the same images for every method)
            for i in range(x.shape[0]):
                if len(fig_maps) >= cfg["figure_images"]:
                    break
                sel = (img_idx == i).nonzero()
                if not len(sel):
                    continue
                j = int(sel[0])
                fig_maps.append(maps[j, 0].cpu())
                if first_method:
                    figure["images"].append(x[i].cpu())
                    figure["titles"].append(f.class_names[int(t[j])])
                    # the class's ground-truth region, drawn as an outline (None: the image has no mask)
                    figure["regions"].append((gt[j] == int(t[j]) + 1).cpu() if bool(has[j]) else None)
        figure["maps"][name] = fig_maps
        values, skipped = tracker.compute()
        entry: dict[str, Any] = {"seconds_per_image": seconds / max(n_img, 1),
                                 "seconds_per_map": seconds / max(n_maps, 1), "num_maps": n_maps,
                                 "options": opts, "metrics": values, **record}
        if trust is not None:
            value, entry["trust"], why = trust.compute()
            if value is None:
                skipped[TRUST_METRIC] = why
                warnings.warn(f"evaluate: {TRUST_METRIC} of {name!r} skipped: {why}", stacklevel=2)
            else:
                values[TRUST_METRIC] = value
        elif name in no_trust:
            skipped[TRUST_METRIC] = no_trust[name]
        if curve_of is not None:
            chunks = DataLoader(ds, batch_size=cfg["max_batch"], shuffle=False, num_workers=cfg["num_workers"])
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(cfg["seed"])
                curve, chosen, left_out = refinement_curve(
                    trusted[name], f, (_pairs_of(f, b, cfg, device) for b in tqdm(
                        chunks, desc=f"refinement curve {name}", disable=not progress, leave=False)),
                    curve_of, cfg["baseline"], cfg["max_batch"], sync=lambda: _sync(device))
            entry.update(refinement_curve=curve, refinement_thresholds=chosen)
            skipped.update({f"{k} (refinement curve)": v for k, v in left_out.items()})
        elif cfg["refine_curve"] and name in no_trust:
            skipped["refinement_curve"] = no_trust[name]
        if skipped:
            entry["skipped_metrics"] = skipped
        results["methods"][name] = entry
    return results, figure


def evaluate(config: str | Path | dict[str, Any], out: str | Path, progress: bool = True,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the evaluation of ``config`` (a path or a dict) and write results.json / .md / .png at ``out``."""
    cfg = load_config(config) if not isinstance(config, dict) else dict(config)
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    results, figure = run(cfg, progress=progress)
    write_outputs(results, figure, out)
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m explainer evaluate --config CONFIG.yaml --out results.json [--num_images N] [--device D]``.

    Every key of the config is also a flag (``--split val``, ``--methods '{...}'``); ``--print_config`` shows the
    resolved settings.
    """
    p = config_parser()
    p.add_argument("--out", required=True, help="results.json path; results.md and results.png go beside it")
    p.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true",
                   help="hide the progress bars")
    a = parse(p, argv).as_dict()
    out, progress = a.pop("out"), not a.pop("no_progress")
    a.pop("config", None)
    results = evaluate(a, out, progress=progress)
    print(markdown_table(results))
    curve = f", {refinement_path(out)}" if any(e.get("refinement_curve") for e in results["methods"].values()) else ""
    print(f"wrote {out}, {Path(out).with_suffix('.md')}, {Path(out).with_suffix('.png')}{curve}")
    return 0
