"""A trust score for every mask of a one-pass explainer, computed without ground truth (docs/TRUST.md).

An amortized explainer answers in one forward pass and some answers are wrong: the mask lies on another object,
or covers its object poorly. The trust of the mask ``m`` of class ``c`` for image ``x`` is a calibrated
probability that the mask is good, from signals that need only the classifier ``f`` and the explainer:

``keep``      ``p_c(f(m x + (1 - m) blur(x)))``: the class with only the mask kept;
``remove``    ``p_c(f((1 - m) x + m blur(x)))``: the class with the mask removed;
``other``     the largest probability of another class with only the mask kept (a mask on another object keeps
              that object's class);
``prob``      ``p_c(f(x))``, the classifier's own belief in the class (a class it barely sees gets poor masks);
``flip``      the soft IoU of the mask with the mask of the mirrored image, mirrored back (an unstable mask is
              often a wrong one);
``area``, ``peak``, ``crisp``: the mask's mean, its maximum, and the mean of ``|2 m - 1|`` (how decided it is);
``core``      ``p_c`` with only the mask's core kept (its pixels above half its maximum, blur elsewhere): a mask
              whose peak is off the object keeps little of it;
``confusion`` the largest soft IoU of the mask with the masks of the :data:`CONFUSION_CLASSES` most probable
              other classes (a mask drawn on another class's object overlaps that class's mask);
``gradcam``   the soft IoU of the mask with the class's Grad-CAM map (min-max normalised): agreement with a
              cheap second explanation that comes from the classifier's gradients, not from the explainer;
``depth``     how deep the mask's peak lies inside its core: the peak's distance to the core's edge (the image's
              border counts as edge) over the largest such distance in the core (a peak at the rim of its own
              core is a peak beside the shape it drew);
``top2``      the share of the mask's mass in its top 2 % of pixels (a mass piled on a few pixels);
``colour``    how unlike the mask's outside the image looks at the mask's peak: with ``a`` the colour (the mean of
              the :data:`PEAK_PATCH` x :data:`PEAK_PATCH` pixels around the peak) and ``in``, ``out`` the image's
              mean colours weighted by ``m`` and by ``1 - m``, ``|a - out| / (|a - in| + |a - out|)`` (0.5 when
              both are 0, or when the mask is empty or covers everything). A peak that looks like the mask's
              surroundings is a peak beside the object.

The fill is a Gaussian blur (sigma :data:`TRUST_BLUR_SIGMA`, reflect padding, computed once per image), which no
trained kind of this project trains with, so the explainer cannot have learnt to please it. A :class:`TrustModel`
maps the signals (probabilities as logits, the area as a log) to ``sigmoid(w . z + b)`` over standardised features:
a logistic regression fitted on validation images with labels from their ground truth (:func:`fit_trust_model`, what
``python -m explainer trust`` runs; it is stored in the explainer's checkpoint). An explainer with no fitted model
uses :func:`uncalibrated_trust`: ``keep * (1 - remove)``, a plain ranking that is not a probability.

Cost: only the signals the model uses are computed. Per mask one classifier pass of the kept and one of the
removed image (batched together, 2 x 32 images a batch) and a third for ``core``; class-selective explainer
passes of the mirrored images for ``flip`` and of the rival classes for ``confusion``; for ``gradcam`` one
classifier pass per image (the layers before the Grad-CAM layer without a graph) and, per mask, a backward pass
through the layers after it (:func:`gradcam_maps`). The blur is two matrix products per image
(:func:`explainer.core.masking.matrix_blur`). :data:`FEATURE_COST` lists what each signal adds
(``benchmarks/bench_trust.py``); :func:`select_features` can keep the chosen features within a budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from explainer.core.maps import upsample
from explainer.core.masking import apply_mask, matrix_blur

TRUST_BLUR_SIGMA = 10.0
FEATURES = ("keep", "remove", "other", "prob", "flip", "area", "peak", "crisp", "core", "confusion", "gradcam",
            "depth", "top2", "colour")
CONFUSION_CLASSES = 3  # the most probable other classes whose masks ``confusion`` compares with
TOP_SHARE = 0.02  # ``top2``: the share of the pixels whose mass it measures
PEAK_PATCH = 3  # ``colour``: the side of the square of pixels around the peak whose mean colour it compares
# What each signal adds to the cost of ``explanation(top_k=2, trust=True)``, in units of the cost of
# ``explanation(top_k=2)`` itself (benchmarks/bench_trust.py, 32 images of the embedded benchmark, 2-core CPU):
# the kept and removed images' classifier passes and the blur (every signal not listed) cost about 1.25 of it
# whatever the model; ``gradcam`` a short backward pass per mask (its classifier pass is the one that gives
# ``explanation()`` its probabilities, :func:`cam_pass`; on its own it adds about 0.4), ``core`` a third
# classifier pass per mask, ``flip`` and ``confusion`` an explainer pass each. Rough: the spread between runs
# on a busy CPU is about 0.1.
# ``depth`` a distance transform per mask on the CPU (0.7 ms for a 128 x 128 mask); ``colour`` a pooling and two
# weighted means (0.8 ms an image of two masks at 128 px, about 0.05).
FEATURE_COST = {"gradcam": 0.15, "core": 0.55, "flip": 0.65, "confusion": 0.7, "depth": 0.3, "colour": 0.05}
_EPS = 1e-4
CL = torch.channels_last  # the classifier's passes take channels-last inputs: about 1.5x faster with oneDNN


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(_EPS, 1 - _EPS)
    return torch.log(p) - torch.log1p(-p)


@dataclass(frozen=True)
class TrustModel:
    """``trust = sigmoid(w . u + b)`` with ``u`` the standardised transformed features ``(z_i - mean_i) / std_i``
    (module docstring), followed, with ``interactions``, by their pairwise products ``u_i u_j`` (``i <= j``, in
    row-major order). ``features``: names among :data:`FEATURES`; ``fitted_on``: what it was fitted on."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    fitted_on: str = ""
    interactions: bool = False

    def __post_init__(self):
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"trust model: unknown features {unknown}; expected some of {list(FEATURES)}")
        n = len(self.features)
        terms = n + n * (n + 1) // 2 if self.interactions else n
        if not (len(self.mean) == len(self.std) == n and len(self.weights) == terms):
            raise ValueError(f"trust model: expected {n} means and stds (one per feature) and {terms} weights, got "
                             f"{len(self.mean)}, {len(self.std)}, {len(self.weights)}")
        values = [*self.mean, *self.std, *self.weights, self.bias]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or min(self.std) <= 0:
            raise ValueError("trust model: expected finite means, weights and bias, and stds > 0")

    def score(self, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        """Trust (P,) in [0, 1] of the signals of :func:`trust_signals`."""
        z = design_matrix(signals, self.features)
        mean, std = torch.tensor(self.mean, dtype=z.dtype), torch.tensor(self.std, dtype=z.dtype)
        w = torch.tensor(self.weights, dtype=z.dtype)
        u = (z - mean) / std
        return torch.sigmoid((with_interactions(u) if self.interactions else u) @ w + self.bias)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrustModel:
        if not isinstance(d, dict):
            raise ValueError(f"trust model: expected a mapping, got {type(d).__name__}")
        missing = {"features", "mean", "std", "weights", "bias"} - set(d)
        if missing:
            raise ValueError(f"trust model: missing {sorted(missing)}")
        return cls(tuple(d["features"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])),
                   tuple(map(float, d["weights"])), float(d["bias"]), str(d.get("fitted_on", "")),
                   bool(d.get("interactions", False)))


def with_interactions(u: torch.Tensor) -> torch.Tensor:
    """(P, F) -> (P, F + F (F + 1) / 2): the columns, then their pairwise products ``u_i u_j`` (``i <= j``)."""
    i, j = torch.triu_indices(u.shape[1], u.shape[1])
    return torch.cat([u, u[:, i] * u[:, j]], 1)


def design_matrix(signals: dict[str, torch.Tensor], features: Sequence[str]) -> torch.Tensor:
    """(P, F) float64: probabilities as logits, the area as a log, the rest as they are."""
    cols = []
    for name in features:
        v = signals[name].double()
        if name in ("keep", "remove", "other", "prob", "core"):
            v = _logit(v)
        elif name == "area":
            v = torch.log(v.clamp(min=_EPS))
        cols.append(v)
    return torch.stack(cols, 1) if cols else torch.zeros(0, 0, dtype=torch.float64)


def uncalibrated_trust(signals: dict[str, torch.Tensor]) -> torch.Tensor:
    """``keep * (1 - remove)``: the trust of an explainer with no fitted :class:`TrustModel`."""
    return (signals["keep"] * (1 - signals["remove"])).float()


def mask_rows(classes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, class) of every mask, in mask order, for the classes (K_i,) of each image; on the CPU."""
    if not len(classes):
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    rows = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(classes)])
    return rows, torch.cat([c.cpu().long() for c in classes])


def _soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = torch.minimum(a, b).flatten(1).sum(1)
    union = torch.maximum(a, b).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.ones_like(union))


@torch.no_grad()
def trust_signals(explainer: Any, x: torch.Tensor, classes: list[torch.Tensor], masks: Sequence[torch.Tensor],
                  probabilities: torch.Tensor, features: Sequence[str] | None = None,
                  batch_size: int = 32, cam: CamPass | None = None) -> dict[str, torch.Tensor]:
    """The signals (module docstring) of each mask, in the order of the masks: each (P,) float, P the total
    number of masks. ``x`` (B, 3, S, S) the images at the explainer's input size, ``classes`` and ``masks``
    (K_i,) and (K_i, S, S) per image, ``probabilities`` (B, C) the classifier's on ``x``. ``features``: the
    signals wanted (None: all of :data:`FEATURES`); ``keep`` and ``remove`` are always given. ``cam``: the
    classifier pass :func:`cam_pass` made on ``x``, which ``gradcam`` then reuses."""
    need = set(FEATURES if features is None else features)
    unknown = need - set(FEATURES)
    if unknown:
        raise ValueError(f"features: unknown {sorted(unknown)}; expected some of {list(FEATURES)}")
    f = explainer.explanandum
    device = x.device
    rows, cls = mask_rows(classes)
    m = torch.cat([mk.to(device) for mk in masks])[:, None].float() if masks else x.new_zeros(0, 1, *x.shape[-2:])
    blurred = matrix_blur(x, TRUST_BLUR_SIGMA) if len(rows) else x  # once per image, not per mask
    out = {"keep": [], "remove": [], "other": [], **({"core": []} if "core" in need else {})}
    with f.unchecked():  # the images below are built from checked ones
        for i in range(0, len(rows), batch_size):  # batches of 2 * 32 images: faster on a CPU than bigger ones
            r, c, mi = rows[i:i + batch_size].to(device), cls[i:i + batch_size].to(device), m[i:i + batch_size]
            xi, b = x[r], blurred[r]
            d = mi * (xi - b)  # kept: m x + (1 - m) b = b + d; removed: (1 - m) x + m b = x - d
            pair = torch.cat([b + d, xi - d])
            both = f.probabilities(f(pair.contiguous(memory_format=CL))).float()
            kept, removed = both[:len(r)], both[len(r):]
            if "core" in need:
                core = (mi > 0.5 * mi.flatten(1).max(1).values.view(-1, 1, 1, 1)).to(xi.dtype)
                cored = f.probabilities(f(apply_mask(xi, core, b).contiguous(memory_format=CL))).float()
                out["core"].append(cored.gather(1, c[:, None])[:, 0])
            out["keep"].append(kept.gather(1, c[:, None])[:, 0])
            out["remove"].append(removed.gather(1, c[:, None])[:, 0])
            others = kept.scatter(1, c[:, None], float("-inf"))
            out["other"].append(others.max(1).values if kept.shape[1] > 1 else torch.zeros_like(c, dtype=kept.dtype))
    signals = {k: (torch.cat(v) if v else torch.zeros(0)).cpu() for k, v in out.items()}
    signals["prob"] = probabilities.float().cpu()[rows, cls] if len(rows) else torch.zeros(0)
    flat = m[:, 0].cpu()
    signals["area"] = flat.flatten(1).mean(1)
    signals["peak"] = flat.flatten(1).max(1).values if len(rows) else torch.zeros(0)
    signals["crisp"] = (2 * flat - 1).abs().flatten(1).mean(1)
    if "depth" in need:
        signals["depth"] = peak_depth(flat)
    if "top2" in need:
        signals["top2"] = top_share(flat, TOP_SHARE)
    if "colour" in need:
        signals["colour"] = peak_colour(x, rows, m[:, 0]).cpu()
    if "gradcam" in need:
        signals["gradcam"] = _gradcam_agreement(explainer, x, rows, cls, flat, batch_size, cam)
    if "confusion" in need:
        signals["confusion"] = _confusion(explainer, x, classes, flat, probabilities)
    if "flip" in need:
        mirrored = explainer.selected_masks(x.flip(-1), classes)
        back = torch.cat([mk.flip(-1).to(device) for mk in mirrored]).float().cpu() if mirrored else flat
        signals["flip"] = _soft_iou(flat, back)
    return signals


def peak_depth(masks: torch.Tensor) -> torch.Tensor:
    """``depth`` of each mask (P, H, W): the Euclidean distance from its peak (the first maximum in row-major order)
    to the nearest pixel outside its core (``m <= max / 2``; outside the image counts as outside the core), over
    the largest such distance of a core pixel; 0 for an empty mask. (P,) float."""
    from scipy.ndimage import distance_transform_edt

    out = torch.zeros(len(masks))
    for i, m in enumerate(masks.float()):
        top = float(m.max()) if m.numel() else 0.0
        if top <= 0:
            continue
        core = torch.nn.functional.pad((m > 0.5 * top).to(torch.uint8), (1, 1, 1, 1)).numpy()
        d = torch.from_numpy(distance_transform_edt(core))[1:-1, 1:-1]
        out[i] = d.flatten()[int(m.flatten().argmax())] / d.max()
    return out


def peak_colour(x: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor, size: int = PEAK_PATCH) -> torch.Tensor:
    """``colour`` (module docstring) of each mask (P, H, W) of the images ``x`` (B, 3, H, W), mask ``i`` being
    of image ``rows[i]``: the distance of the mean colour of the ``size`` x ``size`` pixels around its peak (the
    first maximum in row-major order; the square cut by the image's border) to the image's mean colour
    weighted by ``1 - m``, over the sum of that distance and the one to the mean colour weighted by ``m``; 0.5
    when both are 0, or when the mask is empty or covers the whole image (no inside or no outside). (P,) float."""
    if not len(masks):
        return torch.zeros(0)
    x = x.float()
    rows = rows.to(x.device)
    m = masks.to(x.device).float().flatten(1)
    patch = torch.nn.functional.avg_pool2d(x, size, 1, size // 2, count_include_pad=False).flatten(2)
    at = patch[rows, :, m.argmax(1)]  # (P, 3)
    # the masks' weighted colour sums, 32 masks at a time (each holds a copy of its image: (32, 3, HW))
    xf = x.flatten(2)
    sums = [(torch.einsum("pcn,pn->pc", xf[rows[i:i + 32]], m[i:i + 32]),
             torch.einsum("pcn,pn->pc", xf[rows[i:i + 32]], 1 - m[i:i + 32])) for i in range(0, len(m), 32)]
    w_in, w_out = m.sum(1, keepdim=True), (1 - m).sum(1, keepdim=True)
    inside = torch.cat([s for s, _ in sums]) / w_in.clamp(min=1e-12)
    outside = torch.cat([s for _, s in sums]) / w_out.clamp(min=1e-12)
    a, b = (at - inside).norm(dim=1), (at - outside).norm(dim=1)
    # undecided (0.5): an empty mask or one that covers the whole image has no inside or no outside to compare
    defined = (a + b > 0) & (w_in[:, 0] > 1e-6) & (w_out[:, 0] > 1e-6)
    return torch.where(defined, b / (a + b).clamp(min=1e-12), torch.full_like(a, 0.5))


def top_share(masks: torch.Tensor, share: float) -> torch.Tensor:
    """The share of each mask's mass (P, H, W) in its top ``share`` of pixels (at least one); 0 for an empty
    mask. (P,) float."""
    flat = masks.float().flatten(1)
    if not len(flat):
        return torch.zeros(0)
    k = max(1, math.ceil(share * flat.shape[1]))
    return flat.topk(k, 1).values.sum(1) / flat.sum(1).clamp(min=1e-12)


def _gradcam_agreement(explainer: Any, x: torch.Tensor, rows: torch.Tensor, cls: torch.Tensor, flat: torch.Tensor,
                       batch_size: int, cam: CamPass | None = None) -> torch.Tensor:
    """Per mask: soft IoU with the min-max normalised Grad-CAM map of its class (:mod:`explainer.methods`)."""
    if not len(rows):
        return torch.zeros(0)
    g = gradcam_maps(explainer.explanandum, x, rows, cls, batch_size, cam).cpu()
    g = g - g.flatten(1).min(1).values.view(-1, 1, 1)
    g = g / g.flatten(1).max(1).values.clamp(min=1e-12).view(-1, 1, 1)
    return _soft_iou(g, flat)


@dataclass
class CamPass:
    """A classifier pass kept for Grad-CAM (:func:`cam_pass`): the Grad-CAM layer's output ``a`` (a leaf that
    requires grad) and the logits with the graph of the layers after it, for the images ``x``."""

    a: torch.Tensor
    logits: torch.Tensor


def _cam_forward(f: Any, x: torch.Tensor, cam: Any) -> CamPass:
    store: dict[str, torch.Tensor] = {}

    def leaf(_m, _i, a):
        store["a"] = a.detach().requires_grad_(True)
        return store["a"].clone()  # in-place ops downstream must not touch the leaf

    handle = cam.module.register_forward_hook(leaf)
    try:
        with torch.inference_mode(False), torch.enable_grad(), f.unchecked():
            logits = f(x.clone())
    finally:
        handle.remove()
    return CamPass(store["a"], logits)


def cam_pass(f: Any, x: torch.Tensor) -> tuple[torch.Tensor, CamPass]:
    """The classifier's probabilities (B, C) of images ``x`` (B, 3, S, S), as
    :meth:`~explainer.explainers.explanation.ExplainsImages.class_probabilities` gives them, and the pass kept
    for :func:`gradcam_maps`: ``explanation(trust=True)`` of a trust model that uses ``gradcam`` makes the one
    classifier pass on the images serve both."""
    from explainer.methods import get as get_method

    if x.requires_grad:
        raise ValueError("cam_pass: expected images that do not require grad")
    kept = _cam_forward(f, x, get_method("gradcam", f))
    return f.probabilities(kept.logits.detach()).float(), kept


def gradcam_maps(f: Any, x: torch.Tensor, rows: torch.Tensor, cls: torch.Tensor, batch_size: int = 64,
                 kept: CamPass | None = None) -> torch.Tensor:
    """Grad-CAM maps (P, S, S) (float, ReLU'd, not normalised) of class ``cls[p]`` for image ``x[rows[p]]``: the
    maps of :class:`explainer.methods.cam.GradCAM` at its default layer, with one classifier pass per image
    instead of one per mask (none with ``kept``, the pass :func:`cam_pass` made on ``x``). The layers before the
    Grad-CAM layer run without recording a graph (its output is made a leaf that requires grad), and each mask's
    gradient goes back only through the layers after it, one backward pass per class slot of an image."""
    from explainer.methods import get as get_method
    from explainer.methods.base import target_scores, tokens_to_map
    from explainer.methods.cam import gradcam_map

    cam = get_method("gradcam", f)
    out = torch.zeros(len(rows), *x.shape[-2:])
    images = torch.arange(len(x)) if kept is not None else torch.unique(rows)
    step = len(images) if kept is not None else batch_size
    with torch.inference_mode(False), torch.enable_grad():
        for i in range(0, len(images), step):
            imgs = images[i:i + step]
            pos = torch.full((max(int(rows.max()) + 1, len(x)),), -1, dtype=torch.long)
            pos[imgs] = torch.arange(len(imgs))
            run = kept if kept is not None else _cam_forward(
                f, x[imgs.to(x.device)].contiguous(memory_format=CL), cam)
            masks = torch.nonzero(pos[rows] >= 0)[:, 0]
            local = pos[rows[masks]]
            slot, seen = torch.zeros_like(masks), {}  # an image's k-th mask goes in the k-th backward pass
            for k, image in enumerate(local.tolist()):
                slot[k] = seen[image] = seen.get(image, -1) + 1
            for s in range(int(slot.max()) + 1 if len(slot) else 0):
                pick = masks[slot == s]
                r = pos[rows[pick]].to(run.logits.device)
                score = target_scores(run.logits[r], cls[pick].to(run.logits.device)).sum()
                (g,) = torch.autograd.grad(score, run.a, retain_graph=True)
                maps = gradcam_map(tokens_to_map(cam.model, run.a.detach()[r]), tokens_to_map(cam.model, g[r]))
                out[pick] = upsample(maps, x.shape[-2:], cam.interpolation)[:, 0].float().cpu()
    return out


def _confusion(explainer: Any, x: torch.Tensor, classes: list[torch.Tensor], flat: torch.Tensor,
               probabilities: torch.Tensor) -> torch.Tensor:
    """Per mask: the largest soft IoU with the masks of the most probable other classes of its image."""
    C = probabilities.shape[1]
    k = min(CONFUSION_CLASSES + 1, C)
    rivals = [torch.argsort(-p.cpu(), stable=True)[:k] for p in probabilities]
    masks = explainer.selected_masks(x, rivals)
    out, j = [], 0
    for cs, rv, mk in zip(classes, rivals, masks):
        mk = mk.float().cpu()
        for c in cs.tolist():
            keep = rv != c
            others = mk[keep][:CONFUSION_CLASSES]
            m = flat[j]
            out.append(_soft_iou(m.expand_as(others), others).max() if len(others) else torch.tensor(0.0))
            j += 1
    return torch.stack(out) if out else torch.zeros(0)


def trust_of(explainer: Any, signals: dict[str, torch.Tensor]) -> torch.Tensor:
    """Trust (P,) from the signals: the explainer's fitted :class:`TrustModel` if it has one, else
    :func:`uncalibrated_trust`."""
    model = getattr(explainer, "trust_model", None)
    return (model.score(signals) if model is not None else uncalibrated_trust(signals)).float()


def fit_trust_model(signals: dict[str, torch.Tensor], good: torch.Tensor, features: Sequence[str] = FEATURES,
                    l2: float = 1e-2, fitted_on: str = "", interactions: bool = False) -> TrustModel:
    """A logistic regression of ``good`` (P,) bool on the transformed, standardised signals (and their pairwise
    products with ``interactions``), with an L2 penalty ``l2`` on the weights (full-batch L-BFGS on the mean
    log-loss)."""
    features = tuple(features)
    z = design_matrix(signals, features)
    y = good.double().reshape(-1)
    if z.shape[0] != y.shape[0] or z.shape[0] < 2:
        raise ValueError(f"fit_trust_model: expected one label per mask and at least 2 masks, got {z.shape[0]} "
                         f"masks and {y.shape[0]} labels")
    if y.min() == y.max():
        raise ValueError("fit_trust_model: expected good and bad masks among the labels, got only one kind")
    mean, std = z.mean(0), z.std(0).clamp(min=1e-6)
    zs = (z - mean) / std
    zs = with_interactions(zs) if interactions else zs
    w = torch.zeros(zs.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(zs @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return TrustModel(features, tuple(mean.tolist()), tuple(std.tolist()), tuple(w.detach().tolist()),
                      float(b.detach()), fitted_on, interactions)


def trust_auroc(trust: torch.Tensor, bad: torch.Tensor) -> float:
    """How well low trust finds the bad masks: the AUROC of ``1 - trust`` against ``bad`` (torchmetrics);
    NaN with only one kind of mask."""
    from torchmetrics.functional.classification import binary_auroc

    bad = bad.reshape(-1).bool()
    if bad.all() or not bad.any():
        return float("nan")
    return float(binary_auroc(1 - trust.reshape(-1).float(), bad.long()))


def feature_cost(features: Sequence[str]) -> float:
    """The extra cost of computing ``features`` (:data:`FEATURE_COST`, in units of ``explanation()``'s own cost)
    beyond the kept and removed images' passes, which every trust needs."""
    return float(sum(FEATURE_COST.get(f, 0.0) for f in set(features)))


def select_features(signals: dict[str, torch.Tensor], good: torch.Tensor, candidates: Sequence[str] = FEATURES,
                    l2: float = 1e-2, min_gain: float = 0.002, seed: int = 0,
                    interactions: bool = False, max_cost: float | None = None) -> tuple[list[str], float]:
    """Greedy forward selection of features by the two-fold cross-validated AUROC on the given (validation)
    masks: add the feature that helps most until none adds ``min_gain``; with ``max_cost``, only features that
    keep :func:`feature_cost` of the chosen ones within it are candidates. Returns the features and their
    cross-validated AUROC."""
    n = len(good)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    folds = ((idx[: n // 2], idx[n // 2:]), (idx[n // 2:], idx[: n // 2]))

    def part(i):
        return {k: v[i] for k, v in signals.items()}

    def score(feats):
        total = 0.0
        for train, test in folds:
            model = fit_trust_model(part(train), good[train], feats, l2, interactions=interactions)
            total += trust_auroc(model.score(part(test)), ~good[test])
        return total / 2

    chosen, best = [], 0.5
    while len(chosen) < len(candidates):
        gains = [(score(chosen + [f]), f) for f in candidates if f not in chosen
                 and (max_cost is None or feature_cost(chosen + [f]) <= max_cost)]
        if not gains:
            break
        value, name = max(gains)
        if value < best + min_gain:
            break
        chosen.append(name)
        best = value
    return chosen, best
