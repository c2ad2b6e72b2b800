"""Class-selective decoding: a trained explainer's network computes only the requested classes' mask channels.

The last layer of a mask network maps features to one channel per class (smp's ``segmentation_head[0]``, a
1x1 convolution, or the last layer of DPT's ``segmentation_head.head``; LTX's backbone ``head``, a convolution
or, for a ViT, the last ``Linear`` over tokens); every operation after it (upsampling, convex upsampling,
sigmoid, grid smoothing) works on each channel on its own.
:func:`only_classes` swaps that layer, for the duration of a forward pass, for the same layer sliced to the
wanted classes, so that ``k`` masks of a 1000-class explainer cost ``k`` channels, not 1000. A network without
such a layer (a class-agnostic LTX: one channel for every class) computes all its channels, as before. The
swap lasts one forward pass of one caller: a module is not to be shared by threads that explain at once.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class _Sliced(nn.Module):
    """``layer`` restricted to the output channels ``index`` (the same weights, sliced at each call)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, index: torch.Tensor):
        super().__init__()
        self.layer, self.index = layer, index

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        L, i = self.layer, self.index
        b = None if L.bias is None else L.bias[i]
        if isinstance(L, nn.Linear):
            return F.linear(z, L.weight[i], b)
        return F.conv2d(z, L.weight[i], b, L.stride, L.padding, L.dilation, L.groups)


def class_layer(net: nn.Module, num_classes: int) -> tuple[nn.Module, str] | None:
    """(parent, name) of the layer of ``net`` that gives one channel per class, or None."""
    head = getattr(net, "segmentation_head", None)
    places = []
    if isinstance(head, nn.Sequential) and len(head):
        places.append((head, "0"))
    inner = getattr(head, "head", None)  # smp's DPT: segmentation_head.head, a Sequential ending in the 1x1
    if isinstance(inner, nn.Sequential) and len(inner):
        places.append((inner, str(len(inner) - 1)))
    head = getattr(net, "head", None)
    if isinstance(head, nn.Sequential) and len(head):
        places.append((head, str(len(head) - 1)))
    elif isinstance(head, (nn.Conv2d, nn.Linear)):
        places.append((net, "head"))
    for parent, name in places:
        layer = parent._modules[name]
        if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.out_channels == num_classes:
            return parent, name
        if isinstance(layer, nn.Linear) and layer.out_features == num_classes:
            return parent, name
    return None


@contextlib.contextmanager
def only_classes(net: nn.Module, num_classes: int, wanted: torch.Tensor | None) -> Iterator[torch.Tensor | None]:
    """Within: ``net`` computes only the channels of the classes in ``wanted`` (LongTensor, any shape, repeats
    allowed). Yields, for each entry of ``wanted``, the output channel that holds its class (``wanted`` itself
    when nothing is sliced; None for ``wanted=None``, every class)."""
    place = None if wanted is None else class_layer(net, num_classes)
    if place is None:
        yield wanted
        return
    classes, channel = torch.unique(wanted, return_inverse=True)
    if len(classes) == num_classes:
        yield wanted
        return
    parent, name = place
    layer = parent._modules[name]
    parent._modules[name] = _Sliced(layer, classes.to(layer.weight.device))
    try:
        yield channel
    finally:
        parent._modules[name] = layer
