"""Loading trained explainers of any registered kind from Lightning checkpoints or safetensors exports."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from explainer.explainers.base import CHECKPOINT_FORMAT, KINDS, TrainedExplainer
from explainer.explainers.integrity import check_class_names, check_usable
from explainer.explainers.trust import TrustModel
from explainer.explanandum import read_checkpoint_metadata


def module_class(kind: str) -> type[TrainedExplainer]:
    """The class of the explainer kind recorded in a checkpoint."""
    try:
        return KINDS.get(kind)
    except ValueError as err:
        raise ValueError(f"checkpoint: {err}") from None


def _resolve_spec(spec: str, anchor: Path) -> str:
    """A relative explanandum path is tried as given, then beside the checkpoint and its parents."""
    if ":" in spec and not Path(spec).exists() and not spec.endswith((".safetensors", ".ckpt")):
        return spec
    p = Path(spec)
    if p.is_absolute() or p.exists():
        return spec
    for base in [anchor.parent, *anchor.parent.parents]:
        if (base / p).exists():
            return str(base / p)
    return spec


def read_meta(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, state dict) of a Lightning .ckpt (weights_only) or a safetensors export."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        meta = read_checkpoint_metadata(path)
        try:
            sd = load_file(str(path))
        except Exception as err:
            raise ValueError(f"checkpoint: {str(path)!r} is truncated or corrupt: {err}") from err
        return meta, sd
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint: cannot read {str(path)!r} (truncated, corrupt, or not a weights-only "
                         f"Lightning checkpoint): {err}") from err
    if not isinstance(ck, dict) or "explainer_meta" not in ck:
        raise ValueError(f"checkpoint: {str(path)!r} is not an explainer checkpoint of this project "
                         "(no 'explainer_meta'); a classifier checkpoint loads with explainer.load_explanandum()")
    return ck["explainer_meta"], ck["state_dict"]


def load(path: str | os.PathLike, explanandum: Any = None, map_location: str | torch.device = "cpu"):
    """Restore a trained explainer (of any registered kind) with its frozen explanandum, in eval mode.

    Args:
        path: a Lightning ``.ckpt`` written by training, or a ``.safetensors``
            export (``python -m explainer export``).
        explanandum: override the explanandum recorded in the checkpoint: a spec
            (e.g. the classifier lives elsewhere on this machine) or a loaded
            Explanandum. Its weights
            must be the ones the explainer was trained against (checked by
            fingerprint).
        map_location: device to put it on.

    Returns:
        The LightningModule, with ``.explain(x, targets=None)`` and ``.explanandum``.
    """
    path = Path(path)
    meta, sd = read_meta(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint: {str(path)!r} holds {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    cls = module_class(meta["kind"])
    init = inspect.signature(cls.__init__).parameters
    hp = {k: v for k, v in meta["hparams"].items() if k in init}
    spec = explanandum or _resolve_spec(meta["explanandum"]["spec"], path)
    hp["explanandum"] = spec
    hp["explanandum_fingerprint"] = meta["explanandum"]["fingerprint"]
    module = cls(**hp)
    sd = {k: v for k, v in sd.items() if not k.startswith("explanandum.")}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("explanandum.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint: {str(path)!r} does not fit a {cls.__name__} with its recorded settings: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    module.input_size = meta.get("input_size")
    if meta.get("trust") is not None:
        try:
            module.trust_model = TrustModel.from_dict(meta["trust"])
        except ValueError as err:
            raise ValueError(f"checkpoint: {str(path)!r} holds an unreadable trust model: {err}") from err
    where = f"checkpoint {str(path)!r}"
    check_class_names(meta, module.explanandum.class_names, where, module.explanandum.spec)
    check_usable(module, where)
    return module.to(map_location).eval()
