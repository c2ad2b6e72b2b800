"""The one path from images of any size to their explanation: :meth:`ExplainsImages.explanation`.

One rule each, used by ``explain``, ``serve`` and ``finetune`` alike:

* **input size**: :func:`input_resolution` (the explainer's trained size, else :data:`DEFAULT_INPUT_SIZE`);
* **resizing**: bilinear, ``align_corners=False``, antialiased where it shrinks (identical to plain bilinear where
  it enlarges), clamped to [0, 1]: images to the square input size (:func:`to_input_size`), masks back to
  each image's own size (:func:`to_image_size`);
* **classes**: those asked for, else the ``top_k`` most probable, else all; top-k ties go to the lower class
  index (a stable sort of the probabilities, :func:`top_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from explainer.core.images import check_images
from explainer.core.models import fixed_input_size
from explainer.explainers.trust import cam_pass
from explainer.explainers.trust_refine import trusted_masks

DEFAULT_INPUT_SIZE = 128  # pixels a side, for an explainer that recorded no input size

Masks = torch.Tensor | list[torch.Tensor]


@dataclass
class Explanation:
    """What :meth:`ExplainsImages.explanation` returns.

    Attributes:
        masks: float in [0, 1] at each image's own size: a tensor (B, K, H, W) when the images came as a
            (B, 3, H, W) batch and every image has K classes, else a list of B tensors (K_i, H_i, W_i).
        classes: the explained classes, in the order of the masks: a LongTensor (B, K), or a list of B
            LongTensors (K_i,) when the images were given different numbers of classes.
        probabilities: (B, C) the explanandum's probabilities of every class for each image.
        trust: with ``trust=True``, each mask's trust in [0, 1] (higher: more reliable), shaped as ``classes``
            (:mod:`explainer.explainers.trust`); else None.
        keep, remove: with ``trust=True``, the classifier's probability of each mask's class with only the mask
            kept / with the mask removed, under a blur fill no explainer trained with; shaped as ``classes``.
        refined: with ``refine > 0``, which masks were refined per image (bool, shaped as ``classes``).
    """

    masks: Masks
    classes: torch.Tensor | list[torch.Tensor]
    probabilities: torch.Tensor
    trust: torch.Tensor | list[torch.Tensor] | None = None
    keep: torch.Tensor | list[torch.Tensor] | None = None
    remove: torch.Tensor | list[torch.Tensor] | None = None
    refined: torch.Tensor | list[torch.Tensor] | None = None


def input_resolution(module: Any, size: int | None = None) -> int:
    """The square input size an explainer is fed: ``size``, else its trained ``input_size``, else the one size its
    classifier takes (a ViT without dynamic image size), else 128."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size: expected an integer >= 1 (pixels) or None, got {size!r}")
    if size or getattr(module, "input_size", None):
        return int(size or module.input_size)
    f = getattr(module, "explanandum", None)
    fixed = fixed_input_size(f.model) if isinstance(getattr(f, "model", None), torch.nn.Module) else None
    return int(fixed[0]) if fixed else DEFAULT_INPUT_SIZE


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0, 1)


def to_input_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, 3, H, W) -> (B, 3, size, size) by the resize rule; unchanged at that size."""
    return _resize(x, (size, size))


def to_image_size(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (K, S, S) or (B, K, S, S) -> their image's (H, W) by the resize rule; unchanged at that size."""
    return _resize(masks[None], size)[0] if masks.dim() == 3 else _resize(masks, size)


def top_classes(probabilities: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most probable classes of each row of (B, C) probabilities, most probable first; ties go to the
    lower index (a stable sort)."""
    order = torch.sort(torch.as_tensor(probabilities), dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def _per_image(value: Any, n: int, name: str) -> list:
    """``value`` for every image, or a list/tuple/tensor of one entry per image."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != n:
            raise ValueError(f"{name}: expected one entry per image ({n}), got a tensor of shape {tuple(value.shape)}")
        return list(value)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected one entry per image ({n}), got {len(value)}; for the same "
                             f"classes of every image give them per image, e.g. [[1, 3]] * {n}")
        return list(value)
    return [value] * n


def choose_classes(probabilities: torch.Tensor, classes: Any = None, top_k: Any = None) -> list[torch.Tensor]:
    """The classes to explain per image (a list of B LongTensors (K_i,)).

    ``classes``: None; an int (that class for every image); a LongTensor (B,) or (B, K); or a sequence of B
    entries, each an int, a sequence of ints or None. ``top_k``: None, an int, or a sequence of B ints or Nones.
    Per image: its classes if given (in that order), else its top_k most probable (:func:`top_classes`), else
    every class. Giving both for the same image is an error.
    """
    B, C = probabilities.shape
    chosen = []
    for i, (c, k) in enumerate(zip(_per_image(classes, B, "classes"), _per_image(top_k, B, "top_k"))):
        if c is not None and k is not None:
            raise ValueError(f"classes, top_k: give one of them for image {i}, not both")
        if c is not None:
            t = torch.as_tensor(c).reshape(-1)
            if t.is_floating_point() or t.dtype == torch.bool or t.numel() == 0:
                raise ValueError(f"classes: expected class indices (integers) for image {i}, got {c!r}")
            if int(t.min()) < 0 or int(t.max()) >= C:
                raise ValueError(f"classes: expected indices in 0..{C - 1} for image {i}, got {t.tolist()}")
            chosen.append(t.long().cpu())
        elif k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= C:
                raise ValueError(f"top_k: expected an integer in 1..{C} (the number of classes), got {k!r}")
            chosen.append(top_classes(probabilities[i].cpu(), k))
        else:
            chosen.append(torch.arange(C))
    return chosen


def input_batch(x: torch.Tensor | Sequence[torch.Tensor], size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Images as a (B, 3, H, W) batch or a list of (3, H_i, W_i) -> the (B, 3, size, size) batch and their sizes."""
    if isinstance(x, torch.Tensor):
        check_images(x)
        if x.shape[0] == 0:
            return torch.zeros(0, 3, size, size), []
        return to_input_size(x, size), [tuple(x.shape[-2:])] * x.shape[0]
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"x: expected a (B, 3, H, W) tensor or a list of (3, H, W) tensors, got {type(x).__name__}")
    for i, im in enumerate(x):
        if not isinstance(im, torch.Tensor) or im.dim() != 3:
            raise ValueError(f"x[{i}]: expected a (3, H, W) tensor, got "
                             f"{tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__}")
        check_images(im[None], name=f"x[{i}]")
    if not x:
        return torch.zeros(0, 3, size, size), []
    return torch.cat([to_input_size(im[None], size) for im in x]), [tuple(im.shape[-2:]) for im in x]


def _like_classes(values: torch.Tensor | None, chosen: list[torch.Tensor], stacked: bool):
    """Per-mask values (P,) split per image as the classes are: (B, K) when ``stacked``, else a list."""
    if values is None:
        return None
    parts = list(torch.split(values, [len(c) for c in chosen]))
    return (torch.stack(parts) if parts else values.reshape(0, 0)) if stacked else parts


def assemble(masks: Sequence[torch.Tensor], chosen: list[torch.Tensor], probabilities: torch.Tensor,
             sizes: list[tuple[int, int]], batched: bool, per_mask: dict[str, torch.Tensor] | None = None
             ) -> Explanation:
    """The :class:`Explanation` of masks (K_i, S, S) at the input size, each resized to its image's size; a
    (B, K, H, W) tensor for a ``batched`` input whose images all have K classes, else lists. ``per_mask``:
    fields of one value per mask (``trust``, ``keep``, ``remove``, ``refined``), each (P,) in mask order."""
    full = [to_image_size(m, s) for m, s in zip(masks, sizes)]
    stacked = len({len(c) for c in chosen}) <= 1
    extra = {k: _like_classes(v, chosen, stacked) for k, v in (per_mask or {}).items()}
    if not stacked:
        return Explanation(full, chosen, probabilities, **extra)
    classes = torch.stack(chosen) if chosen else torch.zeros(0, probabilities.shape[-1], dtype=torch.long)
    return Explanation(torch.stack(full) if batched else full, classes, probabilities, **extra)


class ExplainsImages:
    """What can explain images of any size: :meth:`explanation`. A subclass has an ``explanandum``, an optional
    ``input_size`` and implements :meth:`selected_masks` (``TrainedExplainer`` and the finetuned LTX explainer of
    ``python -m explainer finetune`` do)."""

    def selected_masks(self, x: torch.Tensor, classes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Masks (K_i, S, S) in [0, 1] of images (B, 3, S, S) for each image's classes."""
        raise NotImplementedError(f"{type(self).__name__} must implement selected_masks(x, classes)")

    def class_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) the explanandum's probabilities of images (B, 3, S, S), on ``x``'s device."""
        f = self.explanandum
        with torch.inference_mode():
            return f.probabilities(f(x.to(self.device))).float().to(x.device)

    def explanation(self, x: torch.Tensor | Sequence[torch.Tensor], classes: Any = None, top_k: Any = None,
                    trust: bool = False, refine: float = 0.0, *, size: int | None = None) -> Explanation:
        """Masks of images of any size for the chosen classes, with the classifier's probabilities.

        Args:
            x: float RGB in [0, 1]: a (B, 3, H, W) batch, or a list of (3, H_i, W_i) images of different sizes.
            classes, top_k: which classes, see :func:`choose_classes` (default: every class).
            trust: also give each mask's trust and its keep/remove probabilities
                (:func:`explainer.explainers.trust.trust_signals`; the explainer's fitted trust model, else the
                uncalibrated ``keep * (1 - remove)``).
            refine: the fraction in [0, 1] of masks, those of lowest trust, refined by per-image finetuning
                (:mod:`explainer.explainers.refine`); their trust is computed again. Implies ``trust``.
            size: the square input size the explainer is fed (default: :func:`input_resolution`).

        Each image is resized to the input size (antialiased bilinear), the explainer and the classifier run
        once on the batch, the classes are chosen (top-k ties: lower index first), and the masks are resized
        back to each image's own size (bilinear). Returns an :class:`Explanation`.
        """
        if not isinstance(trust, bool):
            raise ValueError(f"trust: expected True or False, got {trust!r}")
        if isinstance(refine, bool) or not isinstance(refine, (int, float)) or not 0 <= refine <= 1:
            raise ValueError(f"refine: expected a fraction of the masks in [0, 1], got {refine!r}")
        xs, sizes = input_batch(x, input_resolution(self, size))
        model = getattr(self, "trust_model", None)
        cam = None
        if (trust or refine > 0) and model is not None and "gradcam" in model.features and sizes:
            # one classifier pass gives the probabilities and, kept, the Grad-CAM of every mask
            probabilities, cam = cam_pass(self.explanandum, xs.to(self.device))
            probabilities = probabilities.to(xs.device)
        else:
            probabilities = self.class_probabilities(xs)
        chosen = choose_classes(probabilities, classes, top_k)
        if not sizes:  # no images
            empty = torch.zeros(0, probabilities.shape[-1], *x.shape[-2:]) if isinstance(x, torch.Tensor) else []
            return Explanation(empty, torch.zeros(0, probabilities.shape[-1], dtype=torch.long), probabilities)
        masks = self.selected_masks(xs, chosen)
        per_mask = None
        if trust or refine > 0:
            masks, per_mask = trusted_masks(self, xs, chosen, masks, probabilities, float(refine), cam)
        return assemble(masks, chosen, probabilities, sizes, isinstance(x, torch.Tensor), per_mask)
