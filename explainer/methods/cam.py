"""Class activation maps: Grad-CAM (wrapping Captum) and Grad-CAM++ (Captum has none; written here).

Both read a layer's activations ``A`` (B, K, h, w) and the gradient ``g = dy_c / dA`` of the target logit,
then upsample the (B, 1, h, w) map bilinearly to the input size. One forward and one backward pass per
image. ViT layers (tokens (B, N, D)) are folded onto the patch grid, class token dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explainer.core.maps import upsample
from explainer.methods.base import (
    Method,
    capture_outputs,
    chunks,
    no_validation,
    register,
    target_scores,
    tokens_to_map,
)


def layer_activations_and_gradients(f: nn.Module, model: nn.Module, module: nn.Module, x: torch.Tensor,
                                    target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``dy_target/dA`` at ``module``'s output, as spatial maps (B, K, h, w)."""
    with capture_outputs({"a": module}) as store:
        # the explanandum's parameters are frozen: an input that requires grad makes autograd record the graph
        logits = f(x.detach().requires_grad_(True))
    a = store["a"]
    (g,) = torch.autograd.grad(target_scores(logits, target).sum(), a)
    return tokens_to_map(model, a.detach()), tokens_to_map(model, g)


def gradcam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ``ReLU(sum_k w_k A_k)`` with ``w_k = mean_ij g_kij``; (B, 1, h, w)."""
    w = g.mean(dim=(2, 3), keepdim=True)
    return F.relu((w * a).sum(dim=1, keepdim=True))


def gradcam_pp_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018, exponential-score form, Eq. 19-20):

    ``alpha_kij = g_kij^2 / (2 g_kij^2 + sum_ab A_kab g_kij^3)`` (0 where the denominator is 0),
    ``w_k = sum_ij alpha_kij ReLU(g_kij)``, map ``ReLU(sum_k w_k A_k)``; ``g`` is the gradient of the
    target *logit*. Shapes: ``a``, ``g`` (B, K, h, w) -> (B, 1, h, w).
    """
    g2, g3 = g.pow(2), g.pow(3)
    denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(denom))
    w = (alpha * F.relu(g)).sum(dim=(2, 3), keepdim=True)
    return F.relu((w * a).sum(dim=1, keepdim=True))


class _LayerCAM(Method):
    def __init__(self, f: nn.Module | str, *, layer: str | None = None, interpolation: str = "bilinear",
                 **common):
        super().__init__(f, **common)
        self.layer_name, self.module = self.layer(layer)
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation: expected 'bilinear', 'bicubic' or 'nearest', got {interpolation!r}")
        self.interpolation = interpolation

    def _cam(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _layer_map(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        a, g = layer_activations_and_gradients(self.f, self.model, self.module, x, target)
        return self._cam(a, g)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = []
        with no_validation(self.f):
            for s in chunks(x.shape[0], self.internal_batch_size):
                out.append(upsample(self._layer_map(x[s], target[s]), x.shape[-2:], self.interpolation))
        return torch.cat(out)


@register("gradcam")
class GradCAM(_LayerCAM):
    """Grad-CAM: ``ReLU(sum_k mean_ij(dy_c/dA_kij) A_k)`` at ``layer``, upsampled to the input.

    CNN layers go through Captum's ``LayerGradCam`` (``relu_attributions=True``); ViT token layers use the
    same formula on the patch grid. Default layer: the last block (``layer4`` on ResNets, the last conv of
    VGG's ``features``, ``blocks.<N-1>.norm1`` on timm ViTs). Passes per image: 1 forward + 1 backward.

    Args:
        layer: dotted module name inside ``f.model`` (default: the architecture's last block).
        interpolation: ``"bilinear"`` (default), ``"bicubic"`` or ``"nearest"`` upsampling of the layer map.
    """

    def _cam(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return gradcam_map(a, g)

    _spatial: bool | None = None

    def _layer_map(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._spatial is None:  # probe the layer's output once
            with capture_outputs({"a": self.module}) as store, torch.no_grad():
                self.f(x[:1])
            self._spatial = store["a"].dim() == 4
        if not self._spatial:  # ViT tokens: Captum would average over the wrong axis
            return super()._layer_map(x, target)
        from captum.attr import LayerGradCam

        return LayerGradCam(self.f, self.module).attribute(x, target=target, relu_attributions=True)


@register("gradcam++")
class GradCAMPlusPlus(_LayerCAM):
    """Grad-CAM++ at ``layer`` (see :func:`gradcam_pp_map` for the formula), upsampled to the input.

    Passes per image: 1 forward + 1 backward. Options as :class:`GradCAM`.
    """

    def _cam(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return gradcam_pp_map(a, g)
