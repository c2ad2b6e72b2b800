"""LTX's backbone mask network: a copy of the classifier's own backbone with a light decoder."""

from __future__ import annotations

import copy

import torch
from torch import nn

from explainer.core.constants import round_up_size
from explainer.core.models import is_vit


class BackboneMaskNet(nn.Module):
    """A copy of a classifier's backbone with LTX's light decoder: (B, 3, h, w) -> (B, K, h', w') logits.

    CNN (a timm model with ``forward_features`` or a torchvision ResNet): the
    last feature map -> 1x1 conv to ``K`` maps (stride 32). timm ViT: the
    patch tokens -> Linear(D, hidden) -> tanh -> Linear(hidden, K), folded onto
    the patch grid.

    Args:
        model: the explanandum's raw network (copied, never shared).
        out_channels: ``K`` mask maps.
        hidden: width of the ViT decoder (None: the embedding width).
        pretrained: keep the copied weights; False re-initialises them.
    """

    def __init__(self, model: nn.Module, out_channels: int, hidden: int | None = None, pretrained: bool = True):
        super().__init__()
        bb = copy.deepcopy(model)
        bb.requires_grad_(True)
        bb.train()
        self.vit = is_vit(bb)
        if self.vit:
            bb.reset_classifier(0)
            for name in ("fc_norm", "head_drop"):
                if isinstance(getattr(bb, name, None), nn.Module):
                    setattr(bb, name, nn.Identity())  # unused by forward_features: no dead parameters
            dim = int(bb.num_features)
            hidden = int(hidden or dim)
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out_channels))
            self.num_prefix_tokens = int(getattr(bb, "num_prefix_tokens", 1))
            self.patch = tuple(int(p) for p in bb.patch_embed.patch_size)
            self.fixed_size = None if getattr(bb, "dynamic_img_size", False) else tuple(
                int(s) for s in bb.patch_embed.img_size)
            for m in bb.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False  # the explicit attention vmaps (finetuning); the fused kernel does not
            self.features = bb
        elif hasattr(bb, "forward_features") and hasattr(bb, "reset_classifier"):
            bb.reset_classifier(0)
            self.features = bb
            self.head = nn.Conv2d(int(bb.num_features), out_channels, kernel_size=1)
        elif hasattr(bb, "fc") and hasattr(bb, "avgpool"):  # torchvision ResNet-like
            keep = [m for n, m in bb.named_children() if n not in ("avgpool", "fc")]
            self.features = nn.Sequential(*keep)
            self.head = nn.Conv2d(int(bb.fc.in_features), out_channels, kernel_size=1)
        else:
            raise ValueError(f"network: 'backbone' mode supports timm CNNs and ViTs and torchvision ResNets, not "
                             f"{type(model).__name__}; use network='smp'")
        if not pretrained:
            self._reinit()

    def _reinit(self) -> None:
        if self.vit and hasattr(self.features, "init_weights"):
            self.features.init_weights()
        for m in self.features.modules():
            if m is not self.features and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The resolution the backbone is fed for an (h, w) input."""
        if self.vit:
            if self.fixed_size is not None:
                return self.fixed_size
            ph, pw = self.patch
            return max(ph, round(h / ph) * ph), max(pw, round(w / pw) * pw)
        return round_up_size(h, w)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.vit:
            feats = self.features.forward_features(z) if hasattr(self.features, "forward_features") \
                else self.features(z)
            return self.head(feats)
        tokens = self.features.forward_features(z)[:, self.num_prefix_tokens:]
        gh, gw = z.shape[-2] // self.patch[0], z.shape[-1] // self.patch[1]
        logits = self.head(tokens)  # (B, N, K)
        return logits.transpose(1, 2).reshape(z.shape[0], -1, gh, gw)
