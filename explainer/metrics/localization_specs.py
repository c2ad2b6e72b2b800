"""The localisation metrics as :class:`MetricSpec` objects: maps against ground-truth segmentation.

Thresholded metrics (``pixel_accuracy``, ``miou``, ``f1``, ``iou``,
``boundary_f1``) take the option ``threshold``: ``"mean"`` (each map's mean
after min-max normalisation, the LTX/IIA rule; the default), a number (on
the min-max normalised map), or ``"val"``: one threshold per method, chosen
on validation images (the grid 0.05, 0.10, ..., 0.95; the one maximising the
mean per-map foreground IoU of :func:`explainer.metrics.regions.iou_grid`)
and applied to the evaluated images. ``"val"`` needs the method's maps on
validation images, which ``evaluate`` provides (``threshold_images``); the
chosen value is recorded per method and metric.

``void_band``: how far (pixels, through void) an object owns the void band
next to it (:func:`explainer.metrics.localization.class_regions`); 0 ignores
void. Default 0 for the LTX/IIA group (``segmentation``: their protocol), 5
for the region metrics (``iou``, ``boundary_f1``, ``energy_pointing``,
``wrong_object``).
"""

from __future__ import annotations

from typing import Callable

import torch

from explainer.metrics import localization as loc
from explainer.metrics import regions
from explainer.metrics import spec as S

THRESHOLD_TEXT = ("threshold (option): 'mean' of the min-max normalised map (default), a number, or 'val' (chosen "
                  "per method on validation images)")


def gt_or_none(b: S.PairBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(gt, has)`` with the pairs without ground truth all void (never valid), or None without masks."""
    if b.gt is None:
        return None
    has = b.has_mask if b.has_mask is not None else torch.ones(b.x.shape[0], dtype=torch.bool, device=b.x.device)
    gt = torch.where(has.view(-1, 1, 1).to(b.gt.device), b.gt, torch.full_like(b.gt, loc.VOID))
    return gt, has


def _threshold(name: str, o: dict) -> dict:
    if o.get("threshold") == "val":
        raise ValueError(f"{name}: threshold 'val' is chosen on validation images before the batches "
                         "(MetricTracker.prepare, as evaluate does with threshold_images); give 'mean' or a number "
                         "to score batches directly")
    return o


# ---- pointing game and the LTX/IIA segmentation group ------------------------------------------------
def _pointing(b: S.PairBatch, o: dict) -> S.Stats:
    g = gt_or_none(b)
    if g is None:
        return {}
    hit, valid = loc.pointing_game(b.maps, g[0], b.target, **o)
    return {"hit": hit, "valid": valid, "target": b.target}


def _pointing_reduce(s: S.Stats) -> float | None:
    if not s or not bool(s["valid"].any()):
        return None
    return loc.pointing_accuracy(s["hit"], s["valid"], s["target"])


def _segmentation(b: S.PairBatch, o: dict) -> S.Stats:
    g = gt_or_none(b)
    if g is None:
        return {}
    o = _threshold("segmentation", o)
    key = ("segmentation", tuple(sorted((k, repr(v)) for k, v in o.items())))
    return S.cached(b, key, lambda: loc.segmentation_stats(b.maps, g[0], b.target, **o))


def _seg_reduce(name: str) -> Callable[[S.Stats], float | None]:
    def reduce(s: S.Stats) -> float | None:
        return loc.segmentation_summary(s).get(name) if s else None
    return reduce


# ---- region metrics --------------------------------------------------------------------------------
def _region(fn: Callable, name: str) -> Callable[[S.PairBatch, dict], S.Stats]:
    def compute(b: S.PairBatch, o: dict) -> S.Stats:
        g = gt_or_none(b)
        return {} if g is None else {"value": fn(b.maps, g[0], b.target, **_threshold(name, o))}
    return compute


# ---- the validated threshold -----------------------------------------------------------------------
def choose_on_validation(ctx: S.MethodContext, normalize: str, void_band: int) -> dict:
    """The method's validated threshold (once per method and settings): its maps on the validation images,
    the grid threshold with the best mean per-map IoU."""
    def choose() -> dict:
        if ctx.validation is None:
            raise ValueError("threshold 'val': no validation images to choose it on (evaluate's threshold_images)")
        batches = ctx.validation()
        rows = [regions.iou_grid(b.maps, g[0], b.target, normalize=normalize, void_band=void_band)
                for b in batches if (g := gt_or_none(b)) is not None]
        ious = torch.cat(rows) if rows else torch.zeros(0, len(regions.VAL_GRID), dtype=torch.float64)
        scored = ious[~torch.isnan(ious).any(1)]
        if not scored.shape[0]:
            raise S.MetricSkipped("threshold 'val': no validation pair has ground-truth pixels of its class")
        t = regions.best_threshold(scored)
        return {"threshold": t, "mean_iou": float(scored.mean(0)[regions.VAL_GRID.index(t)]),
                "num_maps": int(scored.shape[0]), "normalize": normalize, "void_band": void_band}
    return ctx.shared(("validated_threshold", normalize, void_band), choose)


def _prepare_threshold(name: str, default_band: int, record: bool = True
                       ) -> Callable[[S.MethodContext, dict], S.Prepared | None]:
    def prepare(ctx: S.MethodContext, o: dict) -> S.Prepared | None:
        if o.get("threshold", "mean") != "val":
            return None
        sel = choose_on_validation(ctx, o.get("normalize", "minmax"), o.get("void_band", default_band))
        return S.Prepared(options={"threshold": sel["threshold"]}, record={"thresholds": {name: sel}} if record else {})
    return prepare


SEG_OPTIONS = ("normalize", "f1_thresholds", "iou_thresholds", "soft", "threshold", "void_band")
_SEG_DESC = {
    "pixel_accuracy": "pixel accuracy of the map min-max normalised and thresholded at its mean, over the dataset "
                      "(LTX/IIA)",
    "miou": "mean over {background, foreground} of the dataset IoU of the mean-thresholded map (LTX/IIA)",
    "f1": "F1 of the foreground of the mean-thresholded map, mean over pairs",
    "f1_fixed": "F1 averaged over fixed thresholds {0.25, 0.5, 0.75} of the min-max normalised map "
                "(Explainer paper)",
    "iou_fixed": "foreground IoU averaged over thresholds 0.1..0.9 of the min-max normalised map "
                 "(Explainer paper)",
    "pixel_ap": "average precision of the soft map against the class's pixels (torchmetrics), mean over pairs",
    "pixel_auroc": "ROC-AUC of the soft map against the class's pixels (torchmetrics), mean over pairs "
                   "(Explainer paper)",
}
_THRESHOLDED = ("pixel_accuracy", "miou", "f1")


def _gt_spec(name: str, direction: str, description: str, compute, reduce, **kw) -> S.MetricSpec:
    return S.MetricSpec(name, direction, S.NO_BASELINE, S.TARGET_TEXT, description, compute, reduce,
                        needs_gt_masks=True, skip_reason=S.NO_GT_PAIR, **kw)


SPECS: list[S.MetricSpec] = [
    _gt_spec("pointing_game", "higher", "TorchRay pointing game: hit if the map's arg-max lies within 15 px of a "
             "pixel of the class (void ignored); mean over classes of the hit rate", _pointing, _pointing_reduce,
             options=("tolerance",)),
    *[_gt_spec(name, "higher", desc, _segmentation, _seg_reduce(name), group="segmentation", options=SEG_OPTIONS,
               # every member: the group shares one computation; only the thresholded ones record the threshold
               prepare=_prepare_threshold(name, 0, record=name in _THRESHOLDED))
      for name, desc in _SEG_DESC.items()],
]
#: the metrics against class regions (the void band next to an object is the object's)
REGION_SPECS: list[S.MetricSpec] = [
    _gt_spec("iou", "higher", "foreground IoU of the thresholded min-max normalised map against the class region "
             "(its pixels and the void band next to them), mean over pairs; " + THRESHOLD_TEXT,
             _region(regions.iou, "iou"), S.mean_of("value"), options=("threshold", "normalize", "void_band"),
             prepare=_prepare_threshold("iou", loc.VOID_BAND)),
    _gt_spec("boundary_f1", "higher", "DAVIS boundary F-measure of the thresholded map's outline against the class "
             "region's, tolerance 2 px (option tolerance: pixels or 'davis', 0.008 x the diagonal), mean over "
             "pairs; " + THRESHOLD_TEXT, _region(regions.boundary_f1, "boundary_f1"), S.mean_of("value"),
             options=("threshold", "tolerance", "normalize", "void_band"),
             prepare=_prepare_threshold("boundary_f1", loc.VOID_BAND)),
    _gt_spec("energy_pointing", "higher", "energy-based pointing game (Score-CAM): share of the min-max normalised "
             "map's mass inside the class region (its pixels and the void band next to them), mean over pairs",
             _region(regions.energy_pointing, "energy_pointing"), S.mean_of("value"), options=("void_band",)),
    _gt_spec("wrong_object", "lower", "share of maps whose peak (arg-max) lies on an object of another class (void "
             "band included) and outside the class's region; a peak on background is not wrong",
             _region(regions.wrong_object, "wrong_object"), S.mean_of("value"), options=("void_band",)),
]
