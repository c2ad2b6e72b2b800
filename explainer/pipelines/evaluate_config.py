"""The evaluation config: its keys typed with their defaults (one jsonargparse parser), read and checked.

The keys and what they mean: :mod:`explainer.pipelines.evaluate`. :func:`validate_config` fails on a bad
key, type, metric name or metric option before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import NonNegativeInt, PositiveInt

from explainer import metrics as M
from explainer.pipelines.args import parse_object


def config_parser() -> ArgumentParser:
    """The jsonargparse parser of an evaluation config: every key typed, with its default."""
    p = ArgumentParser(prog="python -m explainer evaluate", exit_on_error=False,
                       description="Evaluate attribution methods with the papers' metrics (see the keys below).")
    p.add_argument("--config", action="config", help="evaluation YAML (see explainer/pipelines/evaluate.py)")
    p.add_argument("--explanandum", type=str | dict[str, Any], required=True,
                   help="classifier spec, or {spec: ..., num_classes: ..., weights: ...}")
    p.add_argument("--data", type=dict[str, Any], required=True,
                   help="the datamodule: {class_path: ..., init_args: {...}}")
    p.add_argument("--split", type=str, default="test")
    p.add_argument("--num_images", "--num-images", type=int | None, default=None,
                   help="seeded fixed subset of the split (null: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=Literal["groundtruth", "predicted"], default="groundtruth")
    p.add_argument("--baseline", type=Literal["mean", "black", "blur"], default="mean",
                   help="the fill of removed pixels in the metrics")
    p.add_argument("--methods", type=dict[str, dict[str, Any] | None], required=True,
                   help="name -> options of explainer.methods.get(name, f, **options)")
    p.add_argument("--metrics", type=list[str] | None, default=None,
                   help="metric names (null: explainer.metrics.DEFAULT_METRICS)")
    p.add_argument("--metric_options", type=dict[str, dict[str, Any]], default={})
    p.add_argument("--batch_size", type=PositiveInt, default=8, help="images per data batch")
    p.add_argument("--method_batch_size", type=PositiveInt | None, default=None,
                   help="maps per attribute() call (null: all pairs of a batch)")
    p.add_argument("--max_batch", type=PositiveInt, default=128,
                   help="images per explanandum pass inside the metrics (memory bound)")
    p.add_argument("--num_workers", type=NonNegativeInt, default=0)
    p.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:1")
    p.add_argument("--channels_last", type=bool, default=True,
                   help="run the explanandum in channels-last memory format (convnets on CPU: about 1.6x faster "
                        "removal curves with oneDNN; false for a model whose code needs contiguous tensors)")
    p.add_argument("--figure_images", type=NonNegativeInt, default=6)
    p.add_argument("--threshold_split", type=str, default="val",
                   help="split of the images a metric option threshold: val is chosen on")
    p.add_argument("--threshold_images", type=PositiveInt, default=100,
                   help="seeded subset of threshold_split for validated thresholds (each method runs on them)")
    p.add_argument("--trust", type=bool | list[str], default=False,
                   help="trust_auroc of trained explainers: true (every one among the methods; the others list it "
                        "as skipped) or a list of method names, each a trained explainer")
    p.add_argument("--refine_curve", type=list[float] | None, default=None,
                   help="fractions r in [0, 1]: insertion_auc, miou and iou of explanation(trust=True, refine=r) "
                        "for the methods trust selects, and the time of those calls (refinement.png)")
    return p


def config_keys() -> list[str]:
    """The keys of an evaluation config, as :func:`config_parser` declares them."""
    return [a.dest for a in config_parser()._actions if a.dest not in ("help", "config")]


def _parse(parser: ArgumentParser, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        out = parse_object(parser, cfg, where).as_dict()
    except ValueError as err:
        if "is not accepted" in str(err):
            keys = config_keys()
            raise ValueError(f"{where}: unknown key(s) {sorted(set(cfg) - set(keys))}; expected some of "
                             f"{keys}") from None
        raise
    out.pop("config", None)
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate an evaluation config; defaults filled in. ValueError names a bad key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {str(path)!r}")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"config: {str(path)!r} must hold a mapping, got {type(cfg).__name__}")
    return validate_config(cfg, where=f"config {str(path)!r}")


def validate_config(cfg: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """Type-check ``cfg`` with :func:`config_parser` and fill in the defaults; ValueError names a bad key."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(cfg).__name__}")
    cfg = _parse(config_parser(), {k: v for k, v in cfg.items() if k != "config"}, where)
    if "class_path" not in cfg["data"]:
        raise ValueError(f"{where}.data: expected {{class_path: ..., init_args: {{...}}}}, got {cfg['data']!r}")
    if not cfg["methods"]:
        raise ValueError(f"{where}.methods: expected at least one method")
    if cfg["num_images"] is not None and cfg["num_images"] < 1:
        raise ValueError(f"{where}.num_images (--num-images): expected a positive number of images (or null: the "
                         f"whole split), got {cfg['num_images']}")
    cfg["methods"] = {k: dict(v or {}) for k, v in cfg["methods"].items()}
    _check_trust(cfg, where)
    cfg["metrics"] = list(cfg["metrics"] or M.DEFAULT_METRICS)
    M.MetricTracker(cfg["metrics"], cfg["metric_options"])  # unknown metric names / options: ValueError now
    return cfg


def _check_trust(cfg: dict[str, Any], where: str) -> None:
    """``trust`` names configured methods; ``refine_curve`` holds distinct fractions in [0, 1] (sorted here) and
    has methods to run on. Whether a named method is a trained explainer is known once it is built
    (:func:`explainer.pipelines.evaluate_trust.trust_plan`)."""
    trust = cfg["trust"]
    if isinstance(trust, list):
        unknown = [n for n in trust if n not in cfg["methods"]]
        if not trust or unknown:
            raise ValueError(f"{where}.trust: expected true, false or a non-empty list of names among "
                             f"{where}.methods {list(cfg['methods'])}, got {trust!r}")
    curve = cfg["refine_curve"]
    if curve is None:
        return
    if not curve or not all(0 <= r <= 1 for r in curve) or len(set(curve)) != len(curve):
        raise ValueError(f"{where}.refine_curve: expected distinct fractions r in [0, 1] (the share of the masks, "
                         f"those of lowest trust, refined per image), e.g. [0, 0.1, 0.2, 0.5, 1.0]; got {curve}")
    if trust is False:
        raise ValueError(f"{where}.refine_curve: the curve is computed for the methods `trust` selects; expected "
                         "trust: true (every trained explainer) or trust: [method names], got trust: false")
    cfg["refine_curve"] = sorted(float(r) for r in curve)
