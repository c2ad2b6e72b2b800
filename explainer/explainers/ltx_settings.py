"""LTX's settings as values: the counterfactual objective's (:class:`LTXObjective`) and the finetuning presets.

:class:`explainer.explainers.ltx.LTXModule` records both in its hyperparameters; per-image finetuning
(:mod:`explainer.explainers.ltx_finetune`) passes an :class:`LTXObjective` to ``LTXModule.objective`` instead
of changing them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from explainer.core.masking import check_baseline
from explainer.losses import CURVE_AREAS, CURVE_TEMPERATURE, check_curve_settings

TARGET_MODES = ("groundtruth", "predicted", "kl")
MASK_PENALTIES = ("mean", "softplus")
KL_SCOPES = ("all", "target")


def check_objective_settings(**settings: Any) -> None:
    """Validate settings of the counterfactual objective (any of ``OBJECTIVE_KEYS``): at construction and
    when finetuning replaces them."""
    check_curve_settings(settings.get("curve_areas", CURVE_AREAS),
                         settings.get("curve_temperature", CURVE_TEMPERATURE))
    if "kl_scope" in settings and settings["kl_scope"] not in KL_SCOPES:
        raise ValueError(f"kl_scope: expected one of {KL_SCOPES}, got {settings['kl_scope']!r}")
    if "baseline" in settings:
        check_baseline(settings["baseline"])
    if "mask_penalty" in settings and settings["mask_penalty"] not in MASK_PENALTIES:
        raise ValueError(f"mask_penalty: expected one of {MASK_PENALTIES}, got {settings['mask_penalty']!r}")
    for name in ("lambda_mask", "lambda_inverse", "lambda_curve"):
        v = settings.get(name, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or v != v:
            raise ValueError(f"{name}: expected a number >= 0, got {v!r}")


@dataclass(frozen=True)
class LTXObjective:
    """The settings of the counterfactual objective (see :mod:`explainer.explainers.ltx`), validated."""

    lambda_mask: float = 50.0
    lambda_inverse: float = 0.0
    baseline: str = "black"
    mask_penalty: str = "mean"
    kl_scope: str = "all"
    lambda_curve: float = 0.0
    curve_areas: tuple[float, ...] = CURVE_AREAS
    curve_temperature: float = CURVE_TEMPERATURE

    def __post_init__(self) -> None:
        check_objective_settings(**{k: getattr(self, k) for k in OBJECTIVE_KEYS})
        object.__setattr__(self, "curve_areas", tuple(self.curve_areas))

    def replace(self, **changes: Any) -> LTXObjective:
        """A copy with ``changes`` (names among ``OBJECTIVE_KEYS``)."""
        return dataclasses.replace(self, **changes)


# the settings of the counterfactual objective, which finetuning may replace
OBJECTIVE_KEYS = tuple(f.name for f in dataclasses.fields(LTXObjective))


def check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1 finetuning steps, got {steps!r} (the pretrained "
                         "explainer without finetuning, pLTX, is module.explain(x, targets))")
    return steps


def check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr == float("inf"):
        raise ValueError(f"lr: expected a learning rate > 0, got {lr!r}")
    return float(lr)


def check_objective(objective: Any) -> dict:
    """Finetuning-time settings of the objective that replace the pretraining ones (None: keep them all)."""
    if objective is None:
        return {}
    if not isinstance(objective, dict):
        raise TypeError(f"objective: expected a dict of {list(OBJECTIVE_KEYS)}, got {type(objective).__name__}")
    unknown = sorted(set(objective) - set(OBJECTIVE_KEYS))
    if unknown:
        raise ValueError(f"objective: unknown key(s) {unknown}; expected among {list(OBJECTIVE_KEYS)}")
    out = {k: v for k, v in objective.items() if v is not None}
    try:
        check_objective_settings(**out)
    except ValueError as err:
        raise ValueError(f"objective: {err}") from err
    return out


# Finetuning settings. "validated": chosen on validation images of the embedded benchmark (docs/RESULTS.md):
# 10 steps at lr 1e-4, BCE to the explained class (mode "predicted"), the mean-colour baseline and the curve
# term in place of the inverse term. "paper": the official code's (up to 25 steps at lr 2e-3, the pretraining
# objective and target mode). A pLTX checkpoint records its own settings (LTXModule(finetuning=...));
# checkpoints that record none use "validated".
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "validated": {"steps": 10, "lr": 1e-4, "mode": "predicted",
                  "objective": {"baseline": "mean", "lambda_inverse": 0.0, "lambda_curve": 3.0,
                                "curve_areas": list(CURVE_AREAS)}},
    "paper": {"steps": 25, "lr": 2e-3, "mode": None, "objective": {}},
}
FINETUNE_KEYS = ("steps", "lr", "mode", "objective")


def check_finetuning(settings: Any) -> dict[str, Any]:
    """Complete finetuning settings (``steps``, ``lr``, ``mode``, ``objective``); None: the "validated" preset,
    a preset name: that preset, a dict: those keys over the "validated" preset."""
    if settings is None:
        settings = "validated"
    if isinstance(settings, str):
        if settings not in FINETUNE_PRESETS:
            raise ValueError(f"finetuning: expected a preset among {sorted(FINETUNE_PRESETS)} or a dict, "
                             f"got {settings!r}")
        settings = FINETUNE_PRESETS[settings]
    if not isinstance(settings, dict):
        raise TypeError(f"finetuning: expected a dict of {list(FINETUNE_KEYS)} or a preset name, "
                        f"got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(FINETUNE_KEYS))
    if unknown:
        raise ValueError(f"finetuning: unknown key(s) {unknown}; expected among {list(FINETUNE_KEYS)}")
    out = {**FINETUNE_PRESETS["validated"], **settings}
    out["steps"], out["lr"] = check_steps(out["steps"]), check_lr(out["lr"])
    if out["mode"] is not None and out["mode"] not in TARGET_MODES:
        raise ValueError(f"finetuning.mode: expected one of {TARGET_MODES} or None, got {out['mode']!r}")
    out["objective"] = check_objective(out["objective"])
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in out.items()}
