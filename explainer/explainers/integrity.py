"""What a trained explainer must satisfy to be trained on, saved, loaded, exported or used: finite weights,
finite masks, and the class names of the classifier it was trained for.

* A training whose loss, mask logits or weights stop being finite has diverged: :class:`TrainingDiverged` says so
  with the step and the learning rate (not as a bad input further down), and no checkpoint of such weights is
  written (:meth:`TrainedExplainer.on_save_checkpoint` checks the weights and the masks of a probe image).
* Weights that are not finite, or that give masks that are not finite, are refused by ``load``, ``explain`` and
  ``export`` (:class:`NonFiniteError`).
* The explainer's metadata records the classifier's class names; the weights fingerprint does not cover them, so
  they are compared on load (:func:`check_class_names`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

PROBE_SIZE = 64
PROBE_SEED = 0


class NonFiniteError(ValueError):
    """An explainer's weights or masks hold NaN or infinite values."""


class TrainingDiverged(RuntimeError):
    """The loss, the mask logits or the weights of a training stopped being finite."""


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in tensors.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def probe_image(size: int | None = None) -> torch.Tensor:
    """A fixed random image (1, 3, S, S) in [0, 1] (its own generator: the global RNG is left as it is)."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    s = int(size or PROBE_SIZE)
    return torch.rand(1, 3, s, s, generator=g)


def unusable(module: Any) -> str | None:
    """Why an explainer's weights cannot be used (not finite, or masks of a probe image not finite), or None."""
    bad = nonfinite_tensors({k: v for k, v in module.state_dict().items() if not k.startswith("explanandum.")})
    if bad:
        return f"its weights are not finite (NaN or inf in {bad[:5]}{' ...' if len(bad) > 5 else ''})"
    was_training = module.training
    try:
        module.eval()
        dtype = next(module.net.parameters()).dtype
        with torch.no_grad():
            logits = module.net(module.net_input(probe_image(module.input_size).to(module.device, dtype)))
    finally:
        module.train(was_training)
    if not bool(torch.isfinite(logits).all()):
        return "its masks are not finite (NaN or inf from finite weights that are far too large)"
    return None


def check_usable(module: Any, where: str) -> None:
    """NonFiniteError naming ``where`` when :func:`unusable` finds a reason."""
    why = unusable(module)
    if why:
        raise NonFiniteError(f"{where}: refused: {why}; the training that wrote it diverged (retrain with a lower "
                             "learning rate)")


def diverged(step: int, lr: float, what: str) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged at step {step} (learning rate {lr:g}): {what}; lower the learning "
                            "rate (model.init_args.lr) or add a warm-up (warmup_steps)")


def check_class_names(meta: dict[str, Any], names: list[str], where: str, spec: str) -> None:
    """The class names recorded in an explainer's metadata (top level and the explanandum's) against those of
    the classifier it is loaded with; ValueError naming both lists if they differ."""
    recorded = [meta.get("class_names"), ((meta.get("explanandum") or {}).get("meta") or {}).get("class_names")]
    for rec in recorded:
        if rec is not None and list(rec) != list(names):
            raise ValueError(f"{where}: the explainer was trained for the classes {list(rec)}, but the classifier "
                             f"{spec!r} names its classes {list(names)}; masks would come out under the wrong "
                             "names (load it with the classifier it was trained for)")
