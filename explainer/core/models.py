"""Facts about classifier architectures that several layers need."""

from __future__ import annotations

from torch import nn


def is_vit(model: nn.Module) -> bool:
    """A timm-style vision transformer: a ``patch_embed`` and ``blocks`` whose members have an ``attn`` with
    ``attn_drop`` (the attention probabilities that DIX, IIA and LTX's backbone read)."""
    blocks = getattr(model, "blocks", None)
    return (isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0
            and hasattr(getattr(blocks[0], "attn", None), "attn_drop") and hasattr(model, "patch_embed"))
