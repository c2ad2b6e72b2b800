"""Trust and selective refinement in ``evaluate`` (docs/TRUST.md): ``trust_auroc`` and the refinement curve.

Both are for the methods that are trained explainers (a method object whose ``module`` is a
:class:`~explainer.explainers.base.TrainedExplainer`: the methods ``explainer``, ``trained``, ``distill``,
``ltx``, ``pltx``, or a factory giving such an object), chosen by the config key ``trust`` (``true``: every one
of them, the other methods list ``trust_auroc`` as skipped; or a list of method names, each of which must be
one).

``trust_auroc``
    the AUROC of ``1 - trust`` at finding the bad maps among the method's own maps (those its other metrics
    score). The trust of a map is what :func:`~explainer.explainers.trust_refine.trusted_masks` gives it (the
    explainer's fitted trust model, else ``keep * (1 - remove)``; no ground truth), with the image and the map
    at the explainer's input size. A map is bad when its IoU against its class's region is below
    :data:`MIN_IOU` at the threshold of the ``iou`` metric (``metric_options.iou``: ``threshold`` ``mean``, a
    number or ``val``, and ``void_band``), or its peak lies off the region
    (:func:`explainer.metrics.bad_masks`); only there is the ground truth used. Pairs whose class has no
    ground-truth pixel are left out. ``threshold: val`` on ``iou`` is the issue's (and the ``trust`` verb's)
    definition: the explainer's threshold chosen on validation images.
refinement curve (``refine_curve: [r, ...]``)
    for each fraction ``r``: :data:`CURVE_METRICS` of the masks of ``explanation(x, classes=..., trust=True,
    refine=r)`` on the evaluated (image, class) pairs, with the metrics' configured options (a ``val``
    threshold is the one the method's metrics use), the wall time of those calls and the share of masks
    actually refined. Each call takes up to ``max_batch`` images, and ``r`` is a fraction of that call's masks
    (``ceil(r P)`` of its ``P`` masks, those of lowest trust). The curve starts from the explainer's one-pass
    masks (for the ``ltx`` method, pLTX's: its ``r = 1`` is per-image finetuning with the checkpoint's recorded
    settings).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Iterable

import torch

from explainer import metrics as M
from explainer.explainers.base import TrainedExplainer
from explainer.explainers.explanation import input_resolution, to_image_size, to_input_size
from explainer.explainers.trust import trust_auroc
from explainer.explainers.trust_refine import trusted_masks
from explainer.metrics.localization import VOID_BAND
from explainer.metrics.localization_specs import gt_or_none
from explainer.metrics.spec import NO_GT_MASKS, NO_GT_PAIR, TARGET_TEXT

TRUST_METRIC = "trust_auroc"
#: the metric whose threshold and void band decide which maps are bad
REGION_METRIC = "iou"
#: below this IoU a map is bad (as the ``trust`` verb's default)
MIN_IOU = 0.2
#: what the refinement curve measures at each ``r``
CURVE_METRICS = ("insertion_auc", "miou", "iou")
NO_TRUST = ("no trust score: not a trained explainer (trust needs an explainer checkpoint: the methods explainer, "
            "trained, distill, ltx, pltx, or a factory whose object has such a .module)")


def trust_spec() -> dict[str, Any]:
    """``trust_auroc`` as ``metric_specs`` describes a metric in results.json."""
    return {"direction": "higher", "baseline": "none for the score (the trust signals blur, sigma 10 px)",
            "target": TARGET_TEXT, "needs_gt_masks": True,
            "description": f"AUROC of 1 - trust (the trained explainer's trust of each of its maps, computed without "
                           f"ground truth) at finding the bad maps: IoU below {MIN_IOU} against the class region at "
                           f"the {REGION_METRIC} metric's threshold, or the map's peak off the region "
                           f"(explainer.metrics.bad_masks); over the pairs whose class has ground-truth pixels"}


def refinement_record(fractions: list[float], images_per_call: int) -> dict[str, Any]:
    """What results.json says about the curve once (``refinement``): the fractions, how it was computed, and the
    better direction of each metric of its rows."""
    return {"fractions": list(fractions), "images_per_call": images_per_call,
            "call": "explanation(x, classes=<the pairs' classes>, trust=True, refine=r)",
            "directions": {m: M.get(m).direction for m in CURVE_METRICS}}


def explainer_of(method: Any) -> TrainedExplainer | None:
    """The trained explainer behind a method object (its ``module``), or None."""
    module = getattr(method, "module", None)
    return module if isinstance(module, TrainedExplainer) else None


def trust_plan(trust: bool | list[str], built: dict[str, Any], where: str = "config.trust"
               ) -> tuple[dict[str, TrainedExplainer], dict[str, str]]:
    """``(trusted, skipped)``: the methods that get ``trust_auroc`` (name -> their trained explainer) and, with
    ``trust: true``, why each other method does not. A method named in a ``trust`` list without a trust score is
    a ValueError."""
    if trust is False:
        return {}, {}
    names = list(built) if trust is True else list(trust)
    trusted, skipped = {}, {}
    for name in names:
        module = explainer_of(built[name])
        if module is not None:
            trusted[name] = module
        elif trust is True:
            skipped[name] = NO_TRUST
        else:
            raise ValueError(f"{where}: method {name!r} has {NO_TRUST}; expected only trained explainers in the "
                             f"list, or trust: true (every trained explainer, the other methods skipped)")
    return trusted, skipped


def _options(names: Iterable[str], metric_options: dict[str, dict]) -> dict[str, dict]:
    """The configured options of these metrics (and of their groups)."""
    keys = set(names) | {M.get(n).group for n in names if M.get(n).group}
    return {k: v for k, v in metric_options.items() if k in keys}


def _prepared(names: Iterable[str], metric_options: dict[str, dict], ctx: M.MethodContext) -> M.MetricTracker:
    """A tracker of ``names`` prepared for the method of ``ctx`` (a ``val`` threshold is chosen once per method and
    settings: ``ctx`` shares it with the method's other metrics)."""
    tracker = M.MetricTracker(list(names), _options(names, metric_options))
    tracker.prepare(ctx)
    return tracker


def _groups(image_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """For pairs of images ``image_id`` (N,): ``order`` (the pairs grouped by image, images in order of first
    appearance, pairs in their order), the index of each image's first pair, and the pair count per image."""
    ids = image_id.cpu().tolist()
    first: dict[int, int] = {}
    for k in ids:
        first.setdefault(k, len(first))
    rank = torch.tensor([first[k] for k in ids], dtype=torch.long)
    order = torch.argsort(rank, stable=True)
    counts = torch.bincount(rank, minlength=len(first)).tolist()
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    return order, order[starts], counts


def pair_trust(module: TrainedExplainer, batch: M.PairBatch) -> torch.Tensor:
    """The trust (N,) of each pair's map, as ``explanation(trust=True)`` scores a mask: the images once each and
    the maps resized to the explainer's input size, scored with the pairs of one image together."""
    if not batch.target.numel():
        return torch.zeros(0)
    order, first, counts = _groups(batch.image_id)
    size = input_resolution(module)
    dev = batch.x.device
    xs = to_input_size(batch.x[first.to(dev)], size)
    chosen = list(torch.split(batch.target.cpu()[order], counts))
    maps = to_image_size(batch.maps[order.to(dev), 0].float(), (size, size))
    masks = list(torch.split(maps, counts))
    _, fields = trusted_masks(module, xs, chosen, masks, module.class_probabilities(xs))
    trust = torch.empty(len(order))
    trust[order] = fields["trust"].float().cpu()
    return trust


class TrustTracker:
    """``trust_auroc`` of one method over its batches of pairs (the module docstring)."""

    def __init__(self, module: TrainedExplainer, metric_options: dict[str, dict], ctx: M.MethodContext):
        self.module = module
        tracker = _prepared([REGION_METRIC], metric_options, ctx)
        self.skip = tracker.pre_skipped.get(REGION_METRIC)
        opts = tracker.options.get(REGION_METRIC, {})
        self.threshold = opts.get("threshold", "mean")
        self.void_band = opts.get("void_band", VOID_BAND)
        self.trust: list[torch.Tensor] = []
        self.bad: list[torch.Tensor] = []
        self.seconds = 0.0
        self.saw_masks = False

    def update(self, batch: M.PairBatch) -> None:
        t0 = time.perf_counter()
        trust = pair_trust(self.module, batch)
        self.seconds += time.perf_counter() - t0
        g = gt_or_none(batch)
        self.saw_masks |= g is not None and bool(g[1].any())
        if g is None or self.skip:
            bad = torch.full((len(trust),), float("nan"), dtype=torch.float64)
        else:
            bad = M.bad_masks(batch.maps, g[0], batch.target, self.threshold, min_iou=MIN_IOU,
                              void_band=self.void_band).cpu()
        self.trust.append(trust)
        self.bad.append(bad)

    def compute(self) -> tuple[float | None, dict[str, Any], str | None]:
        """``(value, record, reason)``: the AUROC (None when it cannot be computed, with the reason) and what
        results.json records beside it (``threshold``, ``min_iou``, ``masks`` scored, ``bad_share``,
        ``seconds_per_map`` of the trust)."""
        trust = torch.cat(self.trust) if self.trust else torch.zeros(0)
        bad = torch.cat(self.bad) if self.bad else torch.zeros(0, dtype=torch.float64)
        scored = ~torch.isnan(bad)
        is_bad = bad[scored] > 0.5
        record: dict[str, Any] = {"threshold": self.threshold, "void_band": self.void_band, "min_iou": MIN_IOU,
                                  "masks": int(scored.sum()), "bad_share": float(is_bad.double().mean())
                                  if len(is_bad) else None,
                                  "seconds_per_map": self.seconds / max(len(trust), 1)}
        if self.skip:
            return None, record, f"the {REGION_METRIC} threshold that decides bad maps: {self.skip}"
        if not len(is_bad):
            return None, record, NO_GT_PAIR if self.saw_masks else NO_GT_MASKS
        value = trust_auroc(trust[scored], is_bad)
        if math.isnan(value):
            kind = "bad" if bool(is_bad.all()) else "good"
            return None, record, f"every one of the {len(is_bad)} scored maps is {kind}: the AUROC is undefined"
        return value, record, None


Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def curve_trackers(fractions: list[float], metric_options: dict[str, dict], ctx: M.MethodContext
                   ) -> dict[float, M.MetricTracker]:
    """One tracker of :data:`CURVE_METRICS` per fraction, prepared for the method of ``ctx`` (before its batches,
    as the method's own metrics are: a ``val`` threshold is chosen then)."""
    return {r: _prepared(CURVE_METRICS, metric_options, ctx) for r in fractions}


def refinement_curve(module: TrainedExplainer, f: Any, chunks: Iterable[Chunk],
                     trackers: dict[float, M.MetricTracker], baseline: str, max_batch: int,
                     sync: Callable[[], None] = lambda: None
                     ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, str]]:
    """The refinement curve of ``module`` (the module docstring) at the fractions of ``trackers``
    (:func:`curve_trackers`).

    ``chunks`` yields ``(x, image_index, class, gt, has_mask)``: images (B, 3, H, W), their (image, class) pairs
    and each pair's ground truth, as the evaluator forms them; each chunk is one ``explanation()`` call per
    fraction (timed, after one untimed call on the first image). Returns ``(rows, thresholds, skipped)``: one
    row per fraction ``{"r", "share_refined", "seconds", <metric>: value}``, the thresholds the thresholded
    metrics used, and why a metric is missing from the rows.
    """
    fractions = list(trackers)
    seconds = dict.fromkeys(fractions, 0.0)
    refined = dict.fromkeys(fractions, 0)
    seen = total = 0
    for x, img_idx, t, gt, has in chunks:
        if t.numel():
            order, first, counts = _groups(img_idx)
            images = x[img_idx[first.to(img_idx.device)]]
            chosen = list(torch.split(t.cpu()[order], counts))
            if not total:  # one untimed call on one image first: the first call of a process pays for set-ups
                module.explanation(images[:1], classes=chosen[:1], trust=True, refine=max(fractions))
            for r in fractions:
                sync()
                t0 = time.perf_counter()
                e = module.explanation(images, classes=chosen, trust=True, refine=r)
                sync()
                seconds[r] += time.perf_counter() - t0
                flat = torch.cat(list(e.masks)).to(x.device, torch.float32)
                maps = torch.empty_like(flat)
                maps[order.to(x.device)] = flat
                refined[r] += int(torch.cat([v.reshape(-1) for v in e.refined]).sum())
                trackers[r].update(M.PairBatch(f, x[img_idx], maps[:, None], t, img_idx + seen, gt, has, baseline,
                                               max_batch))
            total += len(t)
        seen += x.shape[0]
    rows, skipped = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a metric left out is said once below, not once per fraction
        for r in fractions:
            values, why = trackers[r].compute()
            skipped.update(why)
            rows.append({"r": r, "share_refined": refined[r] / max(total, 1), "seconds": seconds[r], **values})
    for name, reason in skipped.items():
        warnings.warn(f"refinement curve: metric {name!r} skipped: {reason}", stacklevel=2)
    tracker = trackers[fractions[0]]
    thresholds = {s.name: tracker.options[s.name].get("threshold", "mean") for s in tracker.specs
                  if "threshold" in s.options}
    return rows, thresholds, skipped
