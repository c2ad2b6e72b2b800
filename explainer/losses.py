"""Mask losses of the Explainer (Stalder et al., NeurIPS 2022), LTX (Barkan et al., 2023) and distillation.

Shapes: masks ``(B, K, H, W)`` in [0, 1]; logits ``(B, C)``; labels multi-hot ``(B, C)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from explainer.core.masking import apply_mask

NEG = -1e4  # stands for -inf in masked maxima (keeps gradients finite)


def masked_max(S: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """``max_{c : select[b, c]} S[b, c]`` per pixel: (B, C, H, W), (B, C) bool -> (B, 1, H, W).

    An image with no selected class gets ``NEG`` (a mask of sigmoid(NEG) = 0).
    """
    fill = torch.full_like(S, NEG)
    return torch.where(select[:, :, None, None], S, fill).amax(dim=1, keepdim=True)


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``L_ent = -H(softmax(logits))`` averaged over the batch (minimising it spreads the prediction)."""
    logp = F.log_softmax(logits.float(), dim=1)
    return (logp.exp() * logp).sum(1).mean()


def total_variation(m: torch.Tensor) -> torch.Tensor:
    """``TV(m) = mean(|m[i,j] - m[i,j+1]|) + mean(|m[i,j] - m[i+1,j]|)`` (L1, not squared)."""
    return (m[..., :, 1:] - m[..., :, :-1]).abs().mean() + (m[..., 1:, :] - m[..., :-1, :]).abs().mean()


def area_loss(s: torch.Tensor, select: torch.Tensor, a_min: float = 0.05, a_max: float = 0.3) -> torch.Tensor:
    """Area bounds of the Explainer paper, at any resolution.

    Per image and selected class ``c``: sort ``s_c`` descending; the top
    ``a_min * H * W`` pixels are penalised by ``relu(1 - s)``, every pixel
    ranked beyond ``a_max * H * W`` by ``relu(s)``; mean over pixels, summed
    over the selected classes, mean over the batch.

    Args:
        s: class masks (B, C, H, W) in [0, 1].
        select: (B, C) bool, the classes whose masks are bounded (present ones).
    """
    if not 0 <= a_min <= a_max <= 1:
        raise ValueError(f"area bounds: expected 0 <= a_min <= a_max <= 1, got a_min={a_min}, a_max={a_max}")
    B, C, H, W = s.shape
    n = H * W
    k_min, k_max = int(round(a_min * n)), int(round(a_max * n))
    # only the selected masks are sorted (about one class in five of an image here: the sort was 9 % of a step).
    # (a topk of the a_max * H * W largest with the tail as the rest of the sum gives the same loss and gradient
    # 4-5x faster, but rounds otherwise, and the run's trajectory changes: one quickstart run with it gave test IoU
    # 0.421 against 0.443, one run each, a 2 % faster training; the sort that trained the committed checkpoint stays)
    srt = s.flatten(2)[select].sort(dim=1, descending=True).values
    per = (F.relu(1 - srt[:, :k_min]).sum(1) + F.relu(srt[:, k_max:]).sum(1)) / n
    return per.sum() / B


def tail_loss(S: torch.Tensor, select: torch.Tensor, tail_logit: float = 6.0) -> torch.Tensor:
    """The price of a faint tail: ``clamp(S + t, 0, t) / t`` per pixel of the selected classes' mask logits ``S``
    (B, C, H, W), ``t = tail_logit``; mean over pixels, summed over the selected classes (``select`` (B, C)
    bool), mean over the batch.

    A pixel that is on (``S >= 0``) costs 1 and feels nothing; one that is off but not quite (``-t < S < 0``,
    ``sigmoid(-6) = 0.0025``) is pushed down with a constant slope ``1 / t``. ``mean(sigmoid(S))`` pushes such a
    pixel with the slope ``s (1 - s)``, which vanishes as ``s`` goes to 0: masks keep a faint halo of a few
    percent over the whole background, which at the objects' sizes here holds a good part of a map's mass.
    """
    if not tail_logit > 0:
        raise ValueError(f"tail_loss: tail_logit expected > 0, got {tail_logit!r}")
    per = (S.float() + tail_logit).clamp(0, tail_logit).flatten(2).mean(2) / tail_logit
    return (per * select.to(per.dtype)).sum(1).mean()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """BCE-with-logits against multi-hot labels (multi-label) or CE against their argmax (single-label)."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels.argmax(1))


def soft_top_area(z: torch.Tensor, area: float, temperature: float) -> torch.Tensor:
    """A soft mask of the ``area`` fraction of highest logits per map: ``sigmoid((z - q) / (t * std(z)))``.

    ``q`` is each map's ``1 - area`` quantile and ``std(z)`` its spread (both
    held constant in the gradient), so the mask is ~1 on the top ``area`` of
    the pixels whatever the logits' scale, and its gradient moves the pixels
    near the threshold: it ranks the pixels, as deletion and insertion curves
    read them.

    Args:
        z: mask logits (P, 1, H, W).
        area: fraction in (0, 1).
        temperature: ``t`` > 0 (smaller: harder).
    """
    zf = z.flatten(1)
    q = torch.quantile(zf.detach().float(), 1 - area, dim=1).to(z.dtype)
    scale = zf.detach().std(1).clamp_min(1e-6) * temperature
    return torch.sigmoid((z - q.view(-1, 1, 1, 1)) / scale.view(-1, 1, 1, 1))


def _log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(logp))`` for log-probabilities ``logp <= 0``, accurate near 0 and near -inf."""
    logp = logp.clamp(max=-1e-7)
    return torch.where(logp > -0.6931, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")


def counterfactual_loss(logits_masked: torch.Tensor, target, mode: str, multilabel: bool,
                        reduction: str = "mean", classes: torch.Tensor | None = None) -> torch.Tensor:
    """LTX's ``D(f(x masked by m), target)`` (Barkan et al., 2023), per image then averaged.

    Modes:

    * ``"kl"``: ``KL(p(x) || p(x masked))`` with ``target`` the logits (B, C) on
      the unmasked image (softmax for single-label models; for multi-label
      models a Bernoulli KL per class with ``p = sigmoid``, summed over classes);
    * ``"predicted"``: CE to the predicted class of the ``target`` logits
      (single-label), BCE to the predicted classes ``target > 0`` (multi-label;
      the top class when none is above 0.5);
    * ``"groundtruth"``: CE/BCE to the multi-hot labels ``target`` (B, C).

    For multi-label models the BCE is summed over classes (as the KL is), so
    that one class's term weighs as much as a single-label CE does.

    Args:
        reduction: ``"mean"`` over images (a scalar) or ``"none"`` (B,).
        classes: ``"kl"`` only: multi-hot (B, C) classes whose probability
            alone must be kept (a class-specific mask need not keep the
            others'): the Bernoulli KL of each such class's probability
            (sigmoid, or softmax for single-label models), summed. None: the
            whole distribution.
    """
    lm = logits_masked.float()
    if mode == "kl":
        t = target.float().detach()
        if classes is not None and classes.shape != t.shape:
            raise ValueError(f"classes: expected multi-hot {tuple(t.shape)} like the logits, "
                             f"got {tuple(classes.shape)}")
        if multilabel:  # the Bernoulli KL of each class: BCE(p, q) - H(p)
            p = torch.sigmoid(t)
            per = (F.binary_cross_entropy_with_logits(lm, p, reduction="none")
                   - F.binary_cross_entropy_with_logits(t, p, reduction="none"))
        elif classes is not None:  # the Bernoulli KL of each class's softmax probability
            lp, lq = t.log_softmax(1), lm.log_softmax(1)
            ln_p, ln_q = _log1mexp(lp), _log1mexp(lq)
            per = lp.exp() * (lp - lq) + ln_p.exp() * (ln_p - ln_q)
        else:
            per = F.kl_div(F.log_softmax(lm, 1), F.log_softmax(t, 1), log_target=True, reduction="none")
        return _reduce((per if classes is None else per * classes.float()).sum(1), reduction)
        return _reduce(per, reduction)
    if mode == "predicted":
        t = target.float().detach()
        hard = (t > 0).float() if multilabel else F.one_hot(t.argmax(1), t.shape[1]).float()
        if multilabel and (hard.sum(1) == 0).any():  # nothing above 0.5: the top class
            hard = torch.where(hard.sum(1, keepdim=True) == 0, F.one_hot(t.argmax(1), t.shape[1]).float(), hard)
        labels = hard
    elif mode == "groundtruth":
        labels = target.float()
    else:
        raise ValueError(f"target mode: expected 'kl', 'predicted' or 'groundtruth', got {mode!r}")
    if multilabel:
        per = F.binary_cross_entropy_with_logits(lm, labels, reduction="none").sum(1)
    else:
        per = F.cross_entropy(lm, labels.argmax(1), reduction="none")
    return _reduce(per, reduction)


def mask_sparsity(m: torch.Tensor, penalty: str = "mean", reduction: str = "mean") -> torch.Tensor:
    """LTX's sparsity term ``R(m)``: the mean of the mask per image.

    ``penalty="softplus"`` is the official code's variant, ``mean(softplus(m)) - log 2``
    for ``m = sigmoid(z)``: a smooth L1 whose slope runs from 0.5 (m = 0) to
    0.73 (m = 1), about 0.6 on average (the ``- log 2`` makes it 0 at m = 0 and
    changes no gradient).

    Args:
        m: masks (B, K, H, W) in [0, 1].
        reduction: ``"mean"`` over images or ``"none"`` (B,).
    """
    if penalty == "mean":
        per = m.float().flatten(1).mean(1)
    elif penalty == "softplus":
        per = F.softplus(m.float()).flatten(1).mean(1) - math.log(2.0)
    else:
        raise ValueError(f"mask_penalty: expected 'mean' or 'softplus', got {penalty!r}")
    return _reduce(per, reduction)


def inverse_mask_loss(logits_inverse: torch.Tensor, targets: torch.Tensor, multilabel: bool,
                      reduction: str = "mean") -> torch.Tensor:
    """LTX's optional inverse-mask term: what remains outside the mask must not support the targets.

    ``sum_{c in targets} -log(1 - p_c(x masked by 1 - m))`` per image, with
    ``p`` the sigmoid (multi-label) or softmax (single-label) probability:
    0 when the inverse-masked image gives the target classes no probability.
    (The official code subtracts the masked-image CE instead, a term that is
    unbounded below; this bounded form pushes the same way.)

    Args:
        logits_inverse: logits (B, C) on the inverse-masked images.
        targets: multi-hot (B, C) target classes.
    """
    li = logits_inverse.float()
    if multilabel:
        nll = F.softplus(li)  # -log(1 - sigmoid(l))
    else:
        logp = F.log_softmax(li, 1)
        nll = -torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
    return _reduce((nll * targets.float()).sum(1), reduction)


# ---- the curve term: LTX's finetuning objective and distillation -----------------------------------------
CURVE_AREAS, CURVE_TEMPERATURE = (0.05, 0.1, 0.25, 0.5), 0.1
CURVE_PARTS = ("both", "keep", "lose")


def check_curve_settings(areas: Any, temperature: Any) -> None:
    """``areas``: a non-empty list of fractions in (0, 1); ``temperature``: a number > 0."""
    if not isinstance(areas, (list, tuple)) or not areas or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in areas):
        raise ValueError(f"curve_areas: expected a non-empty list of fractions in (0, 1), got {areas!r}")
    t = temperature
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0 or t == float("inf"):
        raise ValueError(f"curve_temperature: expected a number > 0, got {t!r}")


class CurveTerm(NamedTuple):
    """What :func:`curve_term` read in its one explanandum pass.

    ``keep`` (A, P): ``D`` of the image kept by the soft top ``a`` of each map, per area and row; ``lose``
    (A, P): the inverse term of the image without it; None when the area list or that half is left out.
    ``kept`` and ``removed``: the same two losses, (P,) each, of the extra masks given to :func:`curve_term`.
    """

    keep: torch.Tensor | None
    lose: torch.Tensor | None
    kept: list[torch.Tensor]
    removed: list[torch.Tensor]

    def per_row(self) -> torch.Tensor:
        """(P,): the halves added, averaged over the areas (LTX's per-image term)."""
        halves = [h for h in (self.keep, self.lose) if h is not None]
        return (halves[0] + halves[1] if len(halves) == 2 else halves[0]).mean(0)

    def mean(self) -> torch.Tensor:
        """The mean of each half over areas and rows, added (distillation's term)."""
        total = 0.0
        for half in (self.keep, self.lose):
            if half is not None:
                total = total + half.mean()
        return total


def curve_term(f: Any, x: torch.Tensor, z: torch.Tensor, targets: torch.Tensor, baseline: str,
               areas: Sequence[float] = CURVE_AREAS, temperature: float = CURVE_TEMPERATURE, parts: str = "both",
               *, mode: str = "groundtruth", reference: torch.Tensor | None = None,
               classes: torch.Tensor | None = None, also_keep: Sequence[torch.Tensor] = (),
               also_lose: Sequence[torch.Tensor] = ()) -> CurveTerm:
    """The curve term: the soft top ``a`` of each map (:func:`soft_top_area`), for each area ``a``, must keep
    the target classes (``D`` = :func:`counterfactual_loss`) and the image without it must lose them
    (:func:`inverse_mask_loss`): what insertion and deletion curves read, as a differentiable loss.

    One pass of the explanandum over every masked image, those of ``also_keep`` and ``also_lose`` (masks the
    caller's own terms read, such as LTX's mask and its inverse term) first.

    Args:
        f: the explanandum (logits of images in [0, 1]; ``multilabel`` and ``mean`` attributes).
        x: images (P, 3, H, W); z: mask logits (P, 1, H, W); targets: multi-hot (P, C).
        baseline: the masking baseline (:func:`explainer.core.masking.apply_mask`).
        areas, temperature: the soft top areas and their temperature (``()``: no curve term, only the extras).
        parts: "both", "keep" (what insertion reads) or "lose" (what deletion reads).
        mode, reference, classes: ``D``'s mode, target (None: ``targets``) and classes
            (see :func:`counterfactual_loss`).
    """
    if parts not in CURVE_PARTS:
        raise ValueError(f"curve_parts: expected one of {CURVE_PARTS}, got {parts!r}")
    tops = [soft_top_area(z, float(a), temperature) for a in areas]
    keep = list(also_keep) + (tops if parts != "lose" else [])
    lose = list(also_lose) + (tops if parts != "keep" else [])
    images = [apply_mask(x, m, baseline, f.mean) for m in keep] + [apply_mask(x, 1 - m, baseline, f.mean)
                                                                   for m in lose]
    outs = f(torch.cat(images)).chunk(len(images))
    ref = targets if reference is None else reference
    d = [counterfactual_loss(o, ref, mode, f.multilabel, "none", classes=classes) for o in outs[:len(keep)]]
    inv = [inverse_mask_loss(o, targets, f.multilabel, reduction="none") for o in outs[len(keep):]]
    nk, nl = len(also_keep), len(also_lose)
    return CurveTerm(torch.stack(d[nk:]) if len(d) > nk else None, torch.stack(inv[nl:]) if len(inv) > nl else None,
                     d[:nk], inv[:nl])


# ---- distillation: a student's mask logits against a teacher's maps ------------------------------------
MAP_LOSSES = ("bce", "kl", "rank")


def map_distillation_loss(z: torch.Tensor, t: torch.Tensor, kind: str = "bce", temperature: float = 0.1,
                          pairs: int = 1024, margin: float = 0.05,
                          generator: torch.Generator | None = None, top_weight: float = 0.0) -> torch.Tensor:
    """How far student mask logits ``z`` (P, H, W) are from teacher maps ``t`` (P, H, W) in [0, 1], mean over P.

    * ``"bce"``: per-pixel binary cross-entropy of ``sigmoid(z)`` to ``t`` (the map's values themselves); with
      ``top_weight`` ``w`` > 0, pixel ``i`` weighs ``1 + w t_i`` (normalised to a mean of 1 per map): errors where
      the teacher's map is high, the pixels deletion removes first, count more;
    * ``"kl"``: ``KL(softmax(t / temperature) || softmax(z))`` over the pixels of each map (where the mass is);
    * ``"rank"``: for ``pairs`` random pixel pairs (i, j) per map whose teacher values differ by more than
      ``margin``, ``softplus(-(z_i - z_j) sign(t_i - t_j))`` (only the order, what deletion and insertion
      read).
    """
    if isinstance(top_weight, bool) or not isinstance(top_weight, (int, float)) or not top_weight >= 0:
        raise ValueError(f"top_weight: expected a number >= 0, got {top_weight!r}")
    if top_weight and kind != "bce":
        raise ValueError(f"top_weight: only the 'bce' map loss weighs pixels, got map_loss {kind!r}")
    if kind == "bce":
        if not top_weight:
            return F.binary_cross_entropy_with_logits(z.float(), t.float())
        w = 1 + top_weight * t.float()
        w = w / w.flatten(1).mean(1).view(-1, *([1] * (w.dim() - 1)))
        return F.binary_cross_entropy_with_logits(z.float(), t.float(), weight=w)
    zf, tf = z.flatten(1).float(), t.flatten(1).float()
    if kind == "kl":
        p = torch.softmax(tf / temperature, 1)
        return (p * (torch.log(p.clamp_min(1e-12)) - F.log_softmax(zf, 1))).sum(1).mean()
    if kind == "rank":
        n = zf.shape[1]
        i = torch.randint(0, n, (zf.shape[0], pairs), generator=generator).to(zf.device)
        j = torch.randint(0, n, (zf.shape[0], pairs), generator=generator).to(zf.device)
        dt = tf.gather(1, i) - tf.gather(1, j)
        dz = zf.gather(1, i) - zf.gather(1, j)
        keep = (dt.abs() > margin).float()
        return (F.softplus(-dz * torch.sign(dt)) * keep).sum() / keep.sum().clamp_min(1)
    raise ValueError(f"map_loss: expected one of {MAP_LOSSES}, got {kind!r}")
