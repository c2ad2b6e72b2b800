"""Explainer networks: segmentation_models_pytorch encoder-decoders giving C mask-logit maps."""

from __future__ import annotations

import warnings

import segmentation_models_pytorch as smp
import torch
from torch import nn

from explainer.core.models import is_vit
from explainer.nets.convex import ConvexUpsampledNet


def build_segmentation_net(architecture: str, encoder: str, classes: int, encoder_weights: str | None = None,
                           **kwargs) -> nn.Module:
    """``smp.create_model(architecture, encoder, ...)`` with clear errors for unknown names.

    ``encoder`` may be any smp encoder or ``tu-<timm name>`` (smp's universal
    timm encoder), e.g. ``tu-explainer_resnet_small`` or ``tu-resnet50``.
    """
    known = {a.__name__.lower(): a.__name__ for a in smp.__dict__.values()
             if isinstance(a, type) and issubclass(a, torch.nn.Module) and hasattr(a, "_is_torch_scriptable")}
    if architecture.lower() not in known:
        raise ValueError(f"architecture: smp has no architecture {architecture!r}; expected one of "
                         f"{sorted(known.values())}")
    try:
        return smp.create_model(architecture, encoder_name=encoder, encoder_weights=encoder_weights,
                                classes=classes, **kwargs)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise ValueError(f"encoder/decoder_kwargs: cannot build {architecture!r} with encoder {encoder!r} and "
                         f"decoder settings {kwargs}: {err}") from err


UPSAMPLINGS = ("bilinear", "convex", "convex_zero")


def paper_network(explanandum) -> tuple[str, str]:
    """(architecture, encoder) of the Explainer paper's network for a classifier: DeepLabV3+ whose encoder is the
    classifier's own architecture, so that ``init_encoder_from_explanandum`` starts it from the classifier's
    weights (smp's ``tu-<name>`` for a timm CNN, smp's encoder of the same name for a torchvision ResNet); for a
    ViT, which has no dilated convolutions for DeepLabV3+, smp's DPT, the decoder made for ViT encoders."""
    arch = getattr(explanandum, "arch", "") or ""
    if arch.startswith("torchvision:"):
        name = arch[len("torchvision:"):]
        if name not in smp.encoders.get_encoder_names():
            raise ValueError(f"architecture='auto': smp has no encoder {name!r} for torchvision:{name}; give "
                             "architecture and encoder explicitly")
        return "DeepLabV3Plus", name
    if not arch:
        raise ValueError(f"architecture='auto': the explanandum {getattr(explanandum, 'spec', '')!r} is not a timm "
                         "or torchvision classifier; give architecture and encoder explicitly")
    return ("DPT" if is_vit(explanandum.model) else "DeepLabV3Plus"), f"tu-{arch}"


def build_mask_net(architecture: str, encoder: str, classes: int, encoder_weights: str | None = None,
                   decoder_kwargs: dict | None = None, init_from: nn.Module | None = None,
                   channels_last: bool = False, upsampling: str = "bilinear") -> nn.Module:
    """A trained explainer's network: :func:`build_segmentation_net`, its encoder initialised from ``init_from``
    (the explanandum's backbone; None: left as built) and its memory format channels-last if asked.

    ``upsampling``: ``"bilinear"`` (smp's head as it is) or ``"convex"``: the head's coarse output upsampled with
    image-guided weights (:class:`explainer.nets.convex.ConvexUpsampledNet`; architectures whose head
    upsamples, such as FPN), its coarse logits replicated at the border; ``"convex_zero"``: the same with logit 0
    outside the grid (the first convex models were trained so; :func:`explainer.nets.convex.convex_upsample`)."""
    if upsampling not in UPSAMPLINGS:
        raise ValueError(f"upsampling: expected one of {UPSAMPLINGS}, got {upsampling!r}")
    net = build_segmentation_net(architecture, encoder, classes, encoder_weights, **(decoder_kwargs or {}))
    if init_from is not None:
        init_encoder_from(net, init_from)
    if upsampling in ("convex", "convex_zero"):
        head = getattr(net, "segmentation_head", None)
        if head is None or len(head) < 2 or not isinstance(head[1], nn.Upsample):
            raise ValueError(f"upsampling='convex': the {architecture} head does not upsample (its output is at "
                             "full resolution already); use an architecture whose head upsamples, such as FPN")
        net = ConvexUpsampledNet(net, padding="zero" if upsampling == "convex_zero" else "replicate")
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def init_encoder_from(net: nn.Module, source: nn.Module) -> int:
    """Copy every tensor of ``source`` (a timm backbone) whose name and shape match into ``net.encoder`` (names
    compared up to timm's flattening of module names in its feature wrappers).

    Works when the encoder is smp's ``tu-<arch>`` of the explanandum's own
    architecture (its parameter names are timm's). Returns how many tensors
    were copied; warns when none fit.
    """
    enc = getattr(net, "encoder", None)
    target = getattr(enc, "model", enc)
    if target is None:
        raise ValueError("init_encoder_from: the network has no .encoder")
    src = source.state_dict()
    dst = target.state_dict()
    # timm's feature wrappers (FeatureListNet, used by smp's ``tu-`` encoders of ConvNeXts and others) flatten
    # the top modules' names ("stages.0" -> "stages_0"): names are compared with "_" read as "."
    by_norm: dict[str, list[str]] = {}
    for k in src:
        by_norm.setdefault(k.replace("_", "."), []).append(k)
    copied = {}
    for k, t in dst.items():
        names = [k] if k in src else by_norm.get(k.replace("_", "."), [])
        if len(names) == 1 and src[names[0]].shape == t.shape:
            copied[k] = src[names[0]]
    if not copied:
        warnings.warn("init_encoder_from_explanandum: no parameter of the explanandum fits the encoder "
                      "(use encoder 'tu-<explanandum arch>'); the encoder keeps its initialisation", stacklevel=2)
        return 0
    with torch.no_grad():
        for k, v in copied.items():
            dst[k].copy_(v)
    return len(copied)
