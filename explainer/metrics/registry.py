"""The metric registry: one :class:`MetricSpec` per metric name, and a tracker that accumulates them.

Each spec states the metric's direction (``"higher"`` or ``"lower"`` is
better), its baseline fill, its target class and whether it needs
ground-truth masks; :func:`describe` gives these as plain dicts for
results files. The evaluator hands the metrics a :class:`PairBatch`: the
(image, class) pairs of one data batch with their attribution maps.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from explainer.core.registry import Registry
from explainer.metrics import perturbation as pert
from explainer.metrics.localization_specs import REGION_SPECS
from explainer.metrics.localization_specs import SPECS as LOCALIZATION_SPECS
from explainer.metrics.road import road
from explainer.metrics.sanity import randomize_explanandum, rank_correlation
from explainer.metrics.spec import (
    BASELINE_TEXT,
    NO_BASELINE,
    NO_GT_MASKS,
    TARGET_TEXT,
    MethodContext,
    MetricSkipped,
    MetricSpec,
    PairBatch,
    Prepared,
    Stats,
    cached,
    mean_of,
)

NLI_TEXT = ("noisy linear imputation (ROAD): each removed pixel the weighted mean of its 8 neighbours, solved as one "
            "sparse system per image and step, plus Gaussian noise (std 0.01 in [0, 1] pixel units unless the "
            "option noise says otherwise), clamped to [0, 1]")
FILL_TEXT = BASELINE_TEXT + ", unless the metric option fill (mean | black | blur | nli) says otherwise"
_mean, _cached = mean_of, cached


# ---- perturbation metrics ---------------------------------------------------
def _with_fill(b: PairBatch, o: dict) -> dict:
    o = dict(o)
    return {"baseline": o.pop("fill", b.baseline), **o}


def _deletion(b: PairBatch, o: dict) -> Stats:
    return {"auc": pert.deletion_auc(b.f, b.x, b.maps, b.target, max_batch=b.max_batch, **_with_fill(b, o))}


def _insertion(b: PairBatch, o: dict) -> Stats:
    return {"auc": pert.insertion_auc(b.f, b.x, b.maps, b.target, max_batch=b.max_batch, **_with_fill(b, o))}


def _road(order: str) -> Callable[[PairBatch, dict], Stats]:
    def compute(b: PairBatch, o: dict) -> Stats:
        return {"value": road(b.f, b.x, b.maps, b.target, order=order, max_batch=b.max_batch, **o)}
    return compute


def _pos(b: PairBatch, o: dict) -> Stats:
    return {"auc": pert.pos_auc(b.f, b.x, b.maps, b.target, baseline=b.baseline, max_batch=b.max_batch, **o)}


def _neg(b: PairBatch, o: dict) -> Stats:
    return {"auc": pert.neg_auc(b.f, b.x, b.maps, b.target, baseline=b.baseline, max_batch=b.max_batch, **o)}


def _adp_pic(b: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return _cached(b, "adp_pic", lambda: pert.adp_pic(b.f, b.x, b.maps, b.target, baseline=b.baseline,
                                                      max_batch=b.max_batch))


def _saliency(b: PairBatch, o: dict) -> Stats:
    groups = b.groups()
    norm = bool(o.get("normalize", True))
    maps = pert.minmax(b.maps) if norm else b.maps.clamp(0, 1)
    first = torch.stack([g[0] for g in groups])
    union = torch.stack([maps[g].amax(0) for g in groups])
    classes = torch.zeros(len(groups), b.f.num_classes, dtype=torch.bool, device=b.x.device)
    for i, g in enumerate(groups):
        classes[i, b.target[g]] = True
    vals = pert.saliency_metric(b.f, b.x[first], union, classes, baseline=b.baseline, normalize=False,
                                max_batch=b.max_batch, min_area=float(o.get("min_area", 0.05)))
    return {"value": vals}


def _specificity(b: PairBatch, o: dict) -> Stats:
    # all (image, class-mask) rows of the batch's multi-class images go through f together
    groups = [g for g in b.groups() if g.numel() >= 2]
    if not groups:
        return {"value": torch.empty(0, device=b.x.device)}
    rows = torch.cat(groups)
    norm = bool(o.get("normalize", True))
    m = pert.minmax(b.maps[rows]) if norm else b.maps[rows].clamp(0, 1)
    probs = pert.masked_probabilities(b.f, b.x[rows], m, b.baseline, b.max_batch)
    vals, start = [], 0
    for g in groups:
        s = probs[start:start + g.numel()][:, b.target[g]]  # S[c, t] = p_t(x masked by m_c)
        start += g.numel()
        eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        vals.append(s[eye].mean() - s[~eye].mean())
    return {"value": torch.stack(vals)}


# ---- sanity -------------------------------------------------------------------
def _randomization(b: PairBatch, o: dict) -> Stats:
    if b.random_maps is None:
        raise ValueError("randomization_spearman: the batch has no random_maps (the maps of the method on a "
                         "randomised explanandum); see explainer.metrics.sanity.model_randomization")
    return {"value": rank_correlation(b.maps, b.random_maps, absolute=bool(o.get("absolute", False)))}


def _randomized_method(ctx: MethodContext, o: dict) -> Prepared:
    """The method rebuilt on a randomised explanandum; its maps of every batch become ``random_maps``."""
    f_rand = randomize_explanandum(ctx.f, **{k: o[k] for k in ("cascade", "seed") if k in o})
    try:
        method = ctx.rebuild(f_rand)
    except (ValueError, RuntimeError, TypeError) as err:
        # e.g. an amortized explainer bound to the trained classifier's weights
        raise MetricSkipped(f"the method cannot run on a randomised explanandum: {err}") from None
    return Prepared(inputs=lambda x, t: {"random_maps": ctx.attribute(method, x, t)})


_SPECS: list[MetricSpec] = [
    MetricSpec("deletion_auc", "lower", FILL_TEXT, TARGET_TEXT,
               "RISE deletion: remove pixels by decreasing attribution in steps of ceil(HW/steps) pixels (default "
               "steps=100), area under the target-probability curve, trapezoid over the removed fractions",
               _deletion, _mean("auc"), options=("steps", "score", "fill", "noise", "seed")),
    MetricSpec("insertion_auc", "higher", FILL_TEXT, TARGET_TEXT,
               "RISE insertion: insert pixels into the fully removed image by decreasing attribution, same "
               "schedule and area as deletion", _insertion, _mean("auc"),
               options=("steps", "score", "fill", "noise", "seed")),
    MetricSpec("road_morf", "lower", NLI_TEXT, TARGET_TEXT,
               "ROAD, most relevant first: remove the most relevant 10,20,...,90% of pixels, fill them by noisy "
               "linear imputation, mean over the percentiles of the target probability",
               _road("morf"), _mean("value"), options=("percentiles", "noise", "seed", "score")),
    MetricSpec("road_lerf", "higher", NLI_TEXT, TARGET_TEXT,
               "ROAD, least relevant first: remove the least relevant 10,20,...,90% of pixels, as road_morf",
               _road("lerf"), _mean("value"), options=("percentiles", "noise", "seed", "score")),
    MetricSpec("pos_auc", "lower", BASELINE_TEXT, TARGET_TEXT,
               "positive perturbation: remove the most relevant 0,10,...,90% of pixels, 100 * trapz of the "
               "target's top-1 accuracy (multi-label: sigmoid > 0.5) over the fraction axis",
               _pos, _mean("auc"), options=("fractions", "score")),
    MetricSpec("neg_auc", "higher", BASELINE_TEXT, TARGET_TEXT,
               "negative perturbation: remove the least relevant 0,10,...,90% of pixels, as pos_auc",
               _neg, _mean("auc"), options=("fractions", "score")),
    MetricSpec("adp", "lower", BASELINE_TEXT, TARGET_TEXT,
               "Grad-CAM++ Average Drop %: 100 * mean(max(0, Y - O) / Y), O on the image masked by the min-max "
               "normalised map", lambda b, o: {"v": _adp_pic(b)[0]}, _mean("v"), group="adp_pic"),
    MetricSpec("pic", "higher", BASELINE_TEXT, TARGET_TEXT,
               "Grad-CAM++ Increase in Confidence: 100 * mean(O > Y)", lambda b, o: {"v": _adp_pic(b)[1]},
               _mean("v"), group="adp_pic"),
    MetricSpec("saliency_metric", "lower", BASELINE_TEXT, TARGET_TEXT + "; Y = all classes explained for the image",
               "Explainer paper: log(max(area, 0.05)) - log(sum_{c in Y} p_c(x masked by m)), m the pixel-wise max "
               "of the image's min-max normalised maps, area = mean(m)", _saliency, _mean("value"),
               options=("normalize", "min_area")),
    MetricSpec("class_specificity", "higher", BASELINE_TEXT,
               "the ground-truth classes of images with at least two of them (pairs of one image)",
               "Explainer paper: S[c, t] = p_t(x masked by the map of class c); mean(diag) - mean(off-diag) per "
               "image, mean over images", _specificity, _mean("value"), options=("normalize",),
               skip_reason="needs images with at least two explained classes (target: groundtruth, multi-label)"),
    *LOCALIZATION_SPECS,
    MetricSpec("randomization_spearman", "lower", NO_BASELINE, TARGET_TEXT,
               "Adebayo et al. model-parameter randomisation: Spearman rank correlation between the maps of the "
               "trained and of the fully re-initialised explanandum, mean over pairs", _randomization,
               _mean("value"), options=("absolute", "cascade", "seed"), prepare=_randomized_method,
               prepare_options=("cascade", "seed")),
]
# deletion and insertion under a fixed fill, beside the configured one (a results table can show both: the fill
# an explainer trained with and one it never saw)
for _fill in ("blur", "nli"):
    for _base in _SPECS[:2]:
        _SPECS.append(MetricSpec(
            f"{_base.name}_{_fill}", _base.direction, NLI_TEXT if _fill == "nli" else f"{_fill}, via apply_mask",
            _base.target, f"{_base.description}; removed pixels filled by {_fill} whatever the configured baseline",
            (lambda fn, fill: lambda b, o: fn(b, {**o, "fill": fill}))(_base.compute, _fill), _base.reduce,
            options=tuple(k for k in _base.options if k != "fill")))

_SPECS += REGION_SPECS

METRICS: Registry[MetricSpec] = Registry("metric")
for _spec in _SPECS:
    METRICS.add(_spec.name, _spec)


def register(spec: MetricSpec) -> MetricSpec:
    """Add a metric (a :class:`MetricSpec`) under ``spec.name``; a taken name is an error."""
    return METRICS.add(spec.name, spec)
DEFAULT_METRICS = ("deletion_auc", "insertion_auc", "pos_auc", "neg_auc", "adp", "pic", "pointing_game",
                   "pixel_accuracy", "miou", "f1", "pixel_ap", "saliency_metric")


def available() -> list[str]:
    """Names of all registered metrics."""
    return list(METRICS)


def get(name: str) -> MetricSpec:
    """The spec of metric ``name``; ValueError naming the close and the known metrics otherwise."""
    return METRICS.get(name)


def describe(names: list[str] | None = None, options: dict[str, dict] | None = None) -> dict[str, dict[str, Any]]:
    """Direction, baseline, target and description of each metric, as plain dicts.

    With ``options`` (per-metric option dicts, as given to
    :class:`MetricTracker`), a metric whose ``fill`` option is set states
    that fill as its baseline, and one whose ``threshold`` or ``void_band``
    is set (by name or by its group) says so in its description.
    """
    out = {n: get(n).describe() for n in (names if names is not None else available())}
    options = options or {}
    for n, d in out.items():
        spec = get(n)
        fill = options.get(n, {}).get("fill")
        if fill is not None and "fill" in spec.options:
            d["baseline"] = NLI_TEXT if fill == "nli" else f"{fill} (metric option fill), via apply_mask"
        o = {**options.get(spec.group, {}), **options.get(n, {})} if spec.group else options.get(n, {})
        said = []
        if "threshold" in o and "threshold" in spec.options:
            val = o["threshold"] == "val"
            said.append(f"threshold {o['threshold']!r}" + (" (one per method, chosen on validation images)"
                                                           if val else ""))
        if "void_band" in o and "void_band" in spec.options:
            said.append(f"void_band {o['void_band']} (the void within that many pixels of an object is the "
                        "object's)")
        if said:
            d["description"] += "; as configured: " + ", ".join(said)
    return out


class MetricTracker:
    """Accumulate metrics over batches of pairs; ``compute()`` gives dataset values and reasons for skips.

    Args:
        names: metric names (ValueError for an unknown one).
        options: per-metric option dicts keyed by metric name (or by a
            group name, ``"segmentation"`` / ``"adp_pic"``, shared by its
            metrics). Unknown keys raise ValueError.

    Metrics with a ``prepare`` (they need the method object: the sanity
    check, validated thresholds) get it through :meth:`prepare`, once per
    method before its batches; :meth:`batch_inputs` then gives the extra
    :class:`PairBatch` fields they asked for.
    """

    def __init__(self, names: list[str], options: dict[str, dict] | None = None):
        self.specs = [get(n) for n in names]
        if len(set(names)) != len(names):
            raise ValueError(f"metrics: duplicate names in {names}")
        self.options: dict[str, dict] = {}
        options = dict(options or {})
        groups = {s.group for s in self.specs if s.group}
        for key, opts in options.items():
            if key not in METRICS and key not in groups:
                raise ValueError(f"metric_options: {key!r} is neither a selected metric group nor a metric "
                                 f"(known: {available()})")
            if not isinstance(opts, dict):
                raise ValueError(f"metric_options.{key}: expected a dict of options, got {opts!r}")
        for s in self.specs:
            o = {**options.get(s.group, {}), **options.get(s.name, {})} if s.group else dict(options.get(s.name, {}))
            bad = set(o) - set(s.options)
            if bad:
                raise ValueError(f"metric_options.{s.name}: unknown option(s) {sorted(bad)}; expected some of "
                                 f"{list(s.options)}")
            self.options[s.name] = o
        self.stats: dict[str, list[Stats]] = {s.name: [] for s in self.specs}
        self.saw_masks = False
        self.inputs: list[Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]] = []
        self.pre_skipped: dict[str, str] = {}

    def prepare(self, context: MethodContext) -> dict[str, Any]:
        """Run the specs' ``prepare`` for one method; returns what they record for its results.

        A metric whose preparation raises :class:`MetricSkipped` is left out (with the reason, in
        :meth:`compute`'s skipped metrics); option values it returns replace the configured ones.
        """
        record: dict[str, Any] = {}
        for s in list(self.specs):
            if s.prepare is None:
                continue
            try:
                p = s.prepare(context, self.options[s.name])
            except MetricSkipped as err:
                self.pre_skipped[s.name] = str(err)
                self.specs.remove(s)
                continue
            if p is None:
                continue
            self.options[s.name] = {**self.options[s.name], **p.options}
            if p.inputs is not None:
                self.inputs.append(p.inputs)
            for k, v in p.record.items():
                record[k] = {**record[k], **v} if isinstance(v, dict) and isinstance(record.get(k), dict) else v
        return record

    def batch_inputs(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        """The extra :class:`PairBatch` fields the prepared metrics need for these pairs."""
        out: dict[str, Any] = {}
        for fn in self.inputs:
            out.update(fn(x, target))
        return out

    def update(self, batch: PairBatch) -> None:
        if batch.gt is not None and (batch.has_mask is None or bool(batch.has_mask.any())):
            self.saw_masks = True
        for s in self.specs:
            opts = {k: v for k, v in self.options[s.name].items() if k not in s.prepare_options}
            st = s.compute(batch, opts)
            if st:
                self.stats[s.name].append(st)

    def compute(self) -> tuple[dict[str, float], dict[str, str]]:
        """``(values, skipped)``: dataset value per metric, and the reason for every metric left out."""
        values, skipped = {}, {}
        for s in self.specs:
            parts = self.stats[s.name]
            st = {k: torch.cat([p[k].reshape(-1).cpu() for p in parts]) for k in parts[0]} if parts else {}
            v = s.reduce(st) if st else None
            if v is None or v != v:
                reason = NO_GT_MASKS if s.needs_gt_masks and not self.saw_masks else s.skip_reason
                skipped[s.name] = reason
                warnings.warn(f"metric {s.name!r} skipped: {reason}", stacklevel=2)
            else:
                values[s.name] = v
        skipped.update(self.pre_skipped)
        return values, skipped
