"""Faithfulness, localisation and sanity metrics for attribution maps (the papers' protocols).

Every metric states its direction, baseline fill and target class, in its
docstring and in its :class:`MetricSpec` (``explainer.metrics.get(name)``):

================== ========= =================================================
name               better    what
================== ========= =================================================
deletion_auc       lower     RISE deletion curve area (probability)
insertion_auc      higher    RISE insertion curve area (probability)
pos_auc            lower     remove most relevant 0..90%, AUC of accuracy
neg_auc            higher    remove least relevant 0..90%, AUC of accuracy
road_morf          lower     ROAD: remove most relevant first, noisy linear fill
road_lerf          higher    ROAD: remove least relevant first, noisy linear fill
adp                lower     Grad-CAM++ average drop %
pic                higher    Grad-CAM++ increase in confidence %
saliency_metric    lower     Explainer paper's log-area minus log-probability
class_specificity  higher    Explainer paper: diag - off-diag of p_t(x|m_c)
pointing_game      higher    TorchRay pointing game, 15 px tolerance
pixel_accuracy     higher    mean-thresholded map vs ground truth (LTX/IIA)
miou               higher    mean IoU of {bg, fg} (LTX/IIA)
f1                 higher    F1 of the mean-thresholded map
f1_fixed           higher    F1 over thresholds 0.25/0.5/0.75 (Explainer)
iou_fixed          higher    IoU over thresholds 0.1..0.9 (Explainer)
pixel_ap           higher    average precision of the soft map
pixel_auroc        higher    ROC-AUC of the soft map (Explainer)
randomization_...  lower     Adebayo sanity check: rank correlation
deletion_auc_nli   lower     deletion with removed pixels filled by ROAD's imputation
insertion_auc_nli  higher    insertion, the same fill (also ``_blur`` for both)
iou                higher    foreground IoU against the class region
boundary_f1        higher    DAVIS boundary F (2 px) against the class region
energy_pointing    higher    share of the map's mass inside the class region
wrong_object       lower     share of maps peaking on an object of another class
================== ========= =================================================

Thresholded metrics (``pixel_accuracy``, ``miou``, ``f1``, ``iou``,
``boundary_f1``) take the option ``threshold``: ``"mean"`` (default), a
number, or ``"val"`` (one per method, chosen on validation images by
``evaluate``; see :mod:`explainer.metrics.localization_specs`).

Per-map helpers against object regions (the class's pixels and the void band next to them), for model
selection: :mod:`explainer.metrics.regions` (``energy_pointing``, ``iou``, ``boundary_f1``, ``wrong_object``,
``choose_threshold``).

The plain functions (``deletion_auc(f, x, maps, target, ...)`` etc.) are
the definitions; the registry and :class:`MetricTracker` only call them.
ROAD and its noisy linear imputation live in :mod:`explainer.metrics.road`
(``road(..., order="morf" | "lerf")``; ``road_morf`` and ``road_lerf`` here).
"""

from explainer.metrics.localization import (
    pointing_accuracy,
    pointing_game,
    segmentation_stats,
    segmentation_summary,
)
from explainer.metrics.perturbation import (
    adp_pic,
    class_specificity,
    deletion_auc,
    insertion_auc,
    neg_auc,
    pos_auc,
    rise_counts,
    saliency_metric,
    trapezoid_auc,
)
from explainer.metrics.regions import (
    bad_masks,
    best_threshold,
    boundary_f1,
    choose_threshold,
    class_regions,
    energy_pointing,
    iou,
    iou_grid,
    peak_off_object,
    wrong_object,
)
from explainer.metrics.registry import (
    DEFAULT_METRICS,
    METRICS,
    MetricTracker,
    available,
    describe,
    get,
)
from explainer.metrics.road import linear_impute, noisy_linear_impute, road_lerf, road_morf
from explainer.metrics.sanity import model_randomization, randomize_explanandum, rank_correlation
from explainer.metrics.spec import MethodContext, MetricSkipped, MetricSpec, PairBatch, Prepared

__all__ = ["pointing_accuracy", "pointing_game", "segmentation_stats", "segmentation_summary", "adp_pic",
           "class_specificity", "deletion_auc", "insertion_auc", "neg_auc", "pos_auc", "rise_counts",
           "saliency_metric", "trapezoid_auc", "DEFAULT_METRICS", "METRICS", "MetricSpec", "MetricTracker",
           "PairBatch", "available", "describe", "get", "model_randomization", "randomize_explanandum",
           "rank_correlation", "linear_impute", "noisy_linear_impute", "road_morf",
           "road_lerf", "best_threshold", "boundary_f1", "choose_threshold", "class_regions", "energy_pointing",
           "iou", "iou_grid", "wrong_object",
           "peak_off_object", "bad_masks", "MethodContext", "MetricSkipped", "Prepared"]
