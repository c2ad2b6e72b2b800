"""What a metric is to the evaluator: a :class:`MetricSpec`, the :class:`PairBatch` it scores, and what it may
ask of the method beyond one batch's maps (:class:`MethodContext`, :class:`Prepared`).

Generic code (the tracker, ``evaluate``) knows no metric by name: a spec
says what it needs (``needs_gt_masks``; ``prepare``, which gets the method
object and may build more from it, e.g. the method on a randomised
explanandum or its maps on validation images) and why it is left out when
it is (``skip_reason``, or :class:`MetricSkipped` from ``prepare``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

Stats = dict[str, torch.Tensor]
TARGET_TEXT = "the evaluated target class of each (image, class) pair: ground truth or predicted, as configured"
BASELINE_TEXT = "the configured baseline (mean | black | blur), via explainer.core.masking.apply_mask"
NO_BASELINE = "none (no perturbation)"
NO_PAIR = "no pair could be evaluated"
NO_GT_PAIR = "no evaluated pair: the explained classes have no pixels in the ground-truth masks"
NO_GT_MASKS = "no ground-truth segmentation masks in the evaluated split"


@dataclass
class PairBatch:
    """The (image, class) pairs of one batch, as metrics receive them.

    Attributes:
        f: the explanandum.
        x: pair images (N, 3, H, W) in [0, 1] (an image appears once per pair).
        maps: attribution maps (N, 1, H, W).
        target: class of each pair, long (N,).
        image_id: which image each pair belongs to, long (N,) (pairs of one
            image are grouped by it).
        gt: ground-truth segmentation (N, H, W) long, or None.
        has_mask: bool (N,): whether ``gt`` holds ground truth for the pair.
        baseline: fill of removed pixels (``"mean"``, ``"black"``, ``"blur"``).
        max_batch: images per forward pass of the explanandum.
        random_maps: maps of the same method on a randomised explanandum
            (N, 1, H, W), for the sanity check; None otherwise.
    """

    f: nn.Module
    x: torch.Tensor
    maps: torch.Tensor
    target: torch.Tensor
    image_id: torch.Tensor
    gt: torch.Tensor | None = None
    has_mask: torch.Tensor | None = None
    baseline: str = "mean"
    max_batch: int = 256
    random_maps: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)

    def groups(self) -> list[torch.Tensor]:
        """Indices of the pairs of each image, in order of first appearance."""
        ids = self.image_id.tolist()
        order: dict[int, list[int]] = {}
        for i, k in enumerate(ids):
            order.setdefault(k, []).append(i)
        return [torch.tensor(v, device=self.x.device) for v in order.values()]


class MetricSkipped(Exception):
    """Raised by a spec's ``prepare``: the metric cannot be computed for this method (the message says why)."""


@dataclass
class MethodContext:
    """What the evaluator offers a spec's ``prepare``, once per method before its batches.

    Attributes:
        f: the explanandum.
        method: the method object (``.attribute(x, target)``).
        rebuild: the same method, with the same options, on another explanandum.
        attribute: ``attribute(method, x, target) -> maps`` as the evaluator runs methods.
        validation: ``() -> list[PairBatch]``: the method's maps on the validation images (None: no
            validation images were configured).
        cache: shared by the preparations of one method (see :meth:`shared`).
    """

    f: nn.Module
    method: Any
    rebuild: Callable[[nn.Module], Any]
    attribute: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
    validation: Callable[[], list[PairBatch]] | None = None
    cache: dict = field(default_factory=dict)

    def shared(self, key: Any, fn: Callable[[], Any]) -> Any:
        """``fn()`` once per method for ``key`` (preparations of several metrics share it)."""
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]


@dataclass
class Prepared:
    """What a spec's ``prepare`` gives the tracker for one method.

    Attributes:
        inputs: ``(x, target) -> dict`` of extra :class:`PairBatch` fields per batch (e.g. ``random_maps``).
        options: option values that replace the configured ones for this method (e.g. a validated threshold).
        record: entries for the method's results (dicts are merged key by key across metrics).
    """

    inputs: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricSpec:
    """A metric: its name, direction, baseline fill, target, and how to compute it.

    ``compute(batch, options) -> stats`` gives per-item tensors for one
    batch (concatenated over batches); ``reduce(stats) -> float | None`` the
    dataset value (None: nothing could be evaluated, for ``skip_reason``).
    ``group`` names options shared with other metrics. What the metric needs
    besides a batch's maps: ``needs_gt_masks`` (ground-truth segmentation;
    skipped with a reason when the split has none), and ``prepare(context,
    options) -> Prepared | None`` (the method object, once per method before
    its batches; it may raise :class:`MetricSkipped`). ``prepare_options``
    are options only ``prepare`` reads (not passed to ``compute``).
    """

    name: str
    direction: str
    baseline: str
    target: str
    description: str
    compute: Callable[[PairBatch, dict], Stats]
    reduce: Callable[[Stats], float | None]
    needs_gt_masks: bool = False
    group: str = ""
    options: tuple[str, ...] = ()
    skip_reason: str = NO_PAIR
    prepare: Callable[[MethodContext, dict], Prepared | None] | None = None
    prepare_options: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"direction": self.direction, "baseline": self.baseline, "target": self.target,
                "needs_gt_masks": self.needs_gt_masks, "description": self.description}


def mean_of(key: str) -> Callable[[Stats], float | None]:
    """A ``reduce``: the mean of ``stats[key]`` over items, NaN items left out (None when none is left)."""
    def reduce(stats: Stats) -> float | None:
        v = stats.get(key)
        if v is None or v.numel() == 0:
            return None
        v = v.double()
        v = v[~torch.isnan(v)]
        return float(v.mean()) if v.numel() else None
    return reduce


def cached(batch: PairBatch, key: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` once per batch for ``key`` (metrics of one group share a computation)."""
    if key not in batch.cache:
        batch.cache[key] = fn()
    return batch.cache[key]
