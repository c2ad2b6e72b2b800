"""Attention probes and gradient rollout for timm vision transformers (shared by DIX and IIA).

timm's ``Attention`` computes ``softmax(q k^T / sqrt(d))`` inside a fused kernel by default; the probe
switches every block to the unfused path for the duration of a ``with`` and hooks ``attn.attn_drop``,
whose output is the attention matrix (B, heads, N, N) that multiplies the values.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from explainer.core.maps import upsample
from explainer.core.models import is_vit
from explainer.methods.base import forward_hooks, grid_size, target_scores


def check_vit(model: nn.Module, what: str = "f") -> None:
    if not is_vit(model):
        raise ValueError(f"{what}: expected a timm vision transformer (blocks[i].attn.attn_drop), "
                         f"got {type(model).__name__}")


@contextlib.contextmanager
def attention_probe(model: nn.Module, edit: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None
                    ) -> Iterator[dict[int, torch.Tensor]]:
    """Record every block's attention (B, heads, N, N) of the latest forward in the yielded dict
    (block index -> tensor); ``edit[i](attn)`` replaces block ``i``'s attention (and is what is recorded).

    Fused attention is switched off inside the ``with`` and restored after it, hooks removed, also on
    error.
    """
    check_vit(model)
    blocks = list(model.blocks)
    edit = {(i % len(blocks)): fn for i, fn in (edit or {}).items()}
    store: dict[int, torch.Tensor] = {}
    fused = [getattr(b.attn, "fused_attn", False) for b in blocks]

    def make(i):
        def hook(_m, _inp, out):
            if i in edit:
                out = edit[i](out)
            store[i] = out
            return out
        return hook

    try:
        for b in blocks:
            if hasattr(b.attn, "fused_attn"):
                b.attn.fused_attn = False
        with forward_hooks((b.attn.attn_drop, make(i)) for i, b in enumerate(blocks)):
            yield store
    finally:
        for b, old in zip(blocks, fused):
            if hasattr(b.attn, "fused_attn"):
                b.attn.fused_attn = old


def weighted_attention(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``ReLU(grad * A)`` per head (Chefer et al. 2021's gradient weighting), (B, heads, N, N)."""
    return F.relu(grad * attn)


def attention_gradient_maps(att: dict[int, torch.Tensor], logits: torch.Tensor, target: torch.Tensor
                            ) -> torch.Tensor:
    """``sum_rows ReLU(dy_c/dA_b * A_b)`` for every block ``b`` an :func:`attention_probe` recorded (in block
    order) in the forward that gave ``logits`` (rows, classes), ``target`` (rows,): (blocks, heads, N, N)."""
    keys = sorted(att)
    grads = torch.autograd.grad(target_scores(logits, target).sum(), [att[k] for k in keys])
    return torch.stack([weighted_attention(att[k].detach(), g).sum(dim=0) for k, g in zip(keys, grads)])


def rollout(maps: list[torch.Tensor], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of per-head maps, one per block (B, heads, N, N):

    ``R_b = rownorm(mean_heads(M_b) + I)``, ``J = R_L ... R_2 R_1``; returns the class-token row over the
    patch tokens ``J[:, 0, prefix:]`` (B, N - prefix).
    """
    joint = None
    for m in maps:
        a = m.mean(dim=1)
        a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    return joint[:, 0, num_prefix_tokens:]


def tokens_to_image(model: nn.Module, row: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A per-patch score (B, P) folded onto the patch grid and upsampled bilinearly: (B, 1, H, W)."""
    gh, gw = grid_size(model, row.shape[1])
    return upsample(row.reshape(row.shape[0], 1, gh, gw), size, "bilinear")
