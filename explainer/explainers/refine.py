"""Per-image refinement of any trained explainer: LTX's second stage (per-image finetuning) for every kind.

Each row (an image and one class to explain; the same image may appear in several rows) starts from the
explainer's trained network, takes a fixed number of AdamW steps (fresh state, constant lr, ``foreach=False``)
on its image alone with a counterfactual objective for its class, and gives the refined network's mask of that
class. The objective is LTX's (:meth:`explainer.explainers.ltx.LTXModule.objective`, docs/METHODS.md section 2):
the mask must keep the class (``D``), stay small (``l_mask R(m)``) and, with the curve term, its soft top must keep
the class and the image without it must lose it. Nothing in it is specific to LTX's network: it needs only the
explanandum and the mask logits of the row's class.

Settings (:func:`refine_settings`):

* an LTX module refines with its own finetuning settings (recorded in it, by default the "validated" preset) and
  its pretraining objective with their replacements, so that :func:`refine_masks` gives exactly
  :func:`explainer.explainers.ltx_finetune.finetune`'s masks (one implementation runs both);
* any other kind refines with :data:`REFINE_DEFAULTS`: the "validated" finetuning preset (10 steps at lr 1e-4; the
  mean-colour baseline, the curve term at weight 3 over the areas 0.05, 0.1, 0.25, 0.5, no inverse term) over
  LTX's default objective (``lambda_mask=50``, mean penalty), with the given class as a one-hot target (mode
  "groundtruth"; "predicted" computes the same here, since the class is always given). The preset was chosen on
  validation images for LTX; it is a documented starting point for the other kinds, not a setting tuned for them.

The network runs in eval mode (frozen batch-norm statistics, no dropout), so a row's result does not depend on
the other rows; the explanandum's input checks are off inside the loop (``explanandum.unchecked()``); the module
is left exactly as it was (its parameters are copied per row, never stepped). The emitted mask gets the kind's
inference-time treatment of its masks (a distilled student's ``output_grid`` smoothing); the objective reads
the network's own logits, as the kinds' training does.

:func:`refine_masks` stacks the parameters once per row and runs them under ``torch.func.vmap``
(:func:`explainer.explainers.ltx_finetune.finetune_rows`); :func:`refine_masks_loop` is the plain reference (one
deep copy and one optimiser per row). ``steps=0`` gives the module's own masks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from explainer.core.images import check_images
from explainer.core.targets import check_targets
from explainer.explainers.base import TrainedExplainer
from explainer.explainers.distill import grid_smooth
from explainer.explainers.ltx import LTXModule
from explainer.explainers.ltx_finetune import (
    RowLoss,
    finetune_rows,
    finetune_rows_loop,
    finetuning_mode,
    ltx_loss,
)
from explainer.explainers.ltx_settings import FINETUNE_KEYS, FINETUNE_PRESETS, LTXObjective, check_finetuning

# the refinement of every kind but LTX (which keeps its own recorded settings): the "validated" preset's steps,
# lr and objective, with the row's class as the target
REFINE_DEFAULTS: dict[str, Any] = {**FINETUNE_PRESETS["validated"], "mode": "groundtruth",
                                   "objective": dict(FINETUNE_PRESETS["validated"]["objective"])}


class RefineSettings(NamedTuple):
    """What one refinement call runs: steps, lr, the objective's target mode and settings, AdamW's weight decay."""

    steps: int
    lr: float
    mode: str
    objective: LTXObjective
    weight_decay: float


class _Counterfactual:
    """LTX's objective for another kind's explanandum. ``LTXModule.objective`` reads nothing of its module but the
    explanandum when it is given the mode and the settings; this host holds nothing else, so no setting of the
    other kind (its own ``lambda_mask``, ``baseline``...) can slip in."""

    objective = LTXModule.objective

    def __init__(self, explanandum: Any):
        self.explanandum = explanandum


def _is_ltx(module: Any) -> bool:
    return isinstance(module, LTXModule)


def check_refinable(module: Any) -> None:
    if not isinstance(module, TrainedExplainer):
        raise TypeError(f"module: expected a trained explainer of any kind (explainer.load of a checkpoint), got "
                        f"{type(module).__name__}")


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an integer >= 0 refinement steps per row (0: the module's own masks), "
                         f"got {steps!r}")
    return steps


def refine_settings(module: TrainedExplainer, settings: str | dict | None = None, *, steps: int | None = None,
                    lr: float | None = None) -> RefineSettings:
    """The checked settings of a refinement of ``module``.

    Args:
        module: a trained explainer of any kind.
        settings: None (LTX: the finetuning settings recorded in the module; other kinds: :data:`REFINE_DEFAULTS`);
            a finetuning preset's name (``"validated"``, ``"paper"``); or a dict of some of ``steps``, ``lr``,
            ``mode``, ``objective`` over those defaults. ``objective`` replaces settings of LTX's objective (the
            module's own for LTX, :class:`LTXObjective`'s defaults for other kinds); a ``mode`` of None is the
            LTX module's target mode, else "groundtruth".
        steps, lr: replace those of ``settings`` when given (``steps`` >= 0, ``lr`` > 0).
    """
    check_refinable(module)
    ltx = _is_ltx(module)
    default = (module.hparams.get("finetuning") or FINETUNE_PRESETS["validated"]) if ltx else REFINE_DEFAULTS
    if settings is None:
        base = default
    elif isinstance(settings, str):
        if settings not in FINETUNE_PRESETS:
            raise ValueError(f"settings: expected a preset among {sorted(FINETUNE_PRESETS)}, a dict of "
                             f"{list(FINETUNE_KEYS)} or None, got {settings!r}")
        base = FINETUNE_PRESETS[settings]
    elif isinstance(settings, dict):
        unknown = sorted(set(settings) - set(FINETUNE_KEYS))
        if unknown:
            raise ValueError(f"settings: unknown key(s) {unknown}; expected among {list(FINETUNE_KEYS)}")
        base = {**default, **settings}
    else:
        raise TypeError(f"settings: expected a preset name, a dict of {list(FINETUNE_KEYS)} or None, "
                        f"got {type(settings).__name__}")
    given = {**base, **{k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None}}
    n = _check_steps(given["steps"])
    st = check_finetuning({k: v for k, v in given.items() if k != "steps"})  # lr, mode, objective
    if ltx:
        return RefineSettings(n, st["lr"], st["mode"] or module.hparams.target,
                              module.objective_settings(**st["objective"]), module.weight_decay)
    return RefineSettings(n, st["lr"], st["mode"] or "groundtruth", LTXObjective(**st["objective"]),
                          module.weight_decay)


def _row_loss(module: TrainedExplainer, st: RefineSettings) -> RowLoss:
    host = module if _is_ltx(module) else _Counterfactual(module.explanandum)
    return ltx_loss(host, st.mode, st.objective)


def _as_explained(module: TrainedExplainer, masks: torch.Tensor) -> torch.Tensor:
    """Masks (P, 1, H, W) as the kind's ``class_masks`` gives them: a distilled student's ``output_grid``
    smoothing (per map, so it applies to one map as to all)."""
    grid = getattr(module, "output_grid", None)
    return grid_smooth(masks, grid) if grid else masks


def _refine(module: TrainedExplainer, x: torch.Tensor, classes: Any, steps: int | None, lr: float | None,
            batch_size: int, settings: str | dict | None, batched: bool) -> torch.Tensor:
    st = refine_settings(module, settings, steps=steps, lr=lr)
    check_images(x)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1 (rows refined together), got {batch_size!r}")
    if classes is None:
        raise ValueError(f"classes: expected the class of each row, a LongTensor ({x.shape[0]},), got None")
    t = check_targets(classes, x.shape[0], module.num_classes, module.device, name="classes")
    if x.shape[0] == 0:
        return torch.zeros(0, 1, *x.shape[-2:], device=x.device)
    dtype = next(module.net.parameters()).dtype
    loss = _row_loss(module, st)
    with finetuning_mode(module):
        xd = x.detach().to(module.device, dtype).clone()  # cloned inside: a normal tensor under inference mode too
        k = module.mask_channel(t)
        if batched:
            masks = finetune_rows(module, xd, t, k, st.steps, st.lr, st.weight_decay, loss, batch_size)
        else:
            masks = finetune_rows_loop(module, xd, t, k, st.steps, st.lr, st.weight_decay, loss)
        masks = _as_explained(module, masks)
    return masks.to(x.device)


def refine_masks(module: TrainedExplainer, x: torch.Tensor, classes: Any, *, steps: int | None = None,
                 lr: float | None = None, batch_size: int = 16, settings: str | dict | None = None) -> torch.Tensor:
    """Refined masks: each row finetuned on its own image for its own class (see the module docstring).

    Args:
        module: a trained explainer of any kind (left unchanged).
        x: images (N, 3, S, S) RGB in [0, 1], at the explainer's input size; one row each.
        classes: the class of each row, a LongTensor (N,) (an int or a list of N ints too); an image may appear
            in several rows, with different classes.
        steps: AdamW steps per row (>= 0; 0: the module's own masks); None: from ``settings``.
        lr: AdamW's learning rate (> 0, constant; fresh state per row); None: from ``settings``.
        batch_size: rows refined together (memory holds one copy of the network, and AdamW's state, per row).
        settings: see :func:`refine_settings` (None: the LTX module's recorded finetuning settings, else
            :data:`REFINE_DEFAULTS`).

    Returns:
        masks (N, 1, S, S) in [0, 1], float32, on ``x``'s device.
    """
    return _refine(module, x, classes, steps, lr, batch_size, settings, batched=True)


def refine_masks_loop(module: TrainedExplainer, x: torch.Tensor, classes: Any, *, steps: int | None = None,
                      lr: float | None = None, batch_size: int = 16, settings: str | dict | None = None
                      ) -> torch.Tensor:
    """The plain reference of :func:`refine_masks`: one deep copy of the network and one AdamW per row.

    Same arguments and result (up to floating-point rounding); ``batch_size`` is checked and otherwise unused.
    """
    return _refine(module, x, classes, steps, lr, batch_size, settings, batched=False)
