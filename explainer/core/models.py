"""Facts about classifier architectures that several layers need."""

from __future__ import annotations

from torch import nn


def is_vit(model: nn.Module) -> bool:
    """A timm-style vision transformer: a ``patch_embed`` and ``blocks`` whose members have an ``attn`` with
    ``attn_drop`` (the attention probabilities that DIX, IIA and LTX's backbone read)."""
    blocks = getattr(model, "blocks", None)
    return (isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0
            and hasattr(getattr(blocks[0], "attn", None), "attn_drop") and hasattr(model, "patch_embed"))


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The one (h, w) a network accepts, if it has one: a timm patch embedding that checks its input size (a ViT
    built without ``dynamic_img_size``, as smp's ``tu-vit_*`` encoders are); None for networks of any size."""
    for m in model.modules():
        if type(m).__name__ == "PatchEmbed" and getattr(m, "strict_img_size", False) \
                and not getattr(m, "dynamic_img_pad", False) and getattr(m, "img_size", None) is not None:
            return int(m.img_size[0]), int(m.img_size[1])
    return None
