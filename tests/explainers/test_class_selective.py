"""Class-selective decoding (explainer.explainers.class_head): ``explain(x, targets)`` and
``explanation(classes=..., top_k=k)`` compute only the requested classes' mask channels, and give what slicing
the all-class output gives, for every kind of mask network (smp Unet, FPN and DPT heads, LTX's backbone head on a CNN
and on a ViT, class-agnostic LTX, the committed checkpoints, among them a distilled student with output_grid)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_DECODER

import explainer
from explainer.explainers import ExplainerModule, LTXModule
from explainer.explainers.class_head import class_layer
from explainer.explainers.explanation import top_classes

ROOT = Path(__file__).resolve().parents[2]


def build(which: str, tiny_cnn, tiny_vit):
    torch.manual_seed(0)
    if which == "explainer-unet":
        return ExplainerModule(tiny_cnn, architecture="Unet", encoder="tu-explainer_resnet_tiny",
                               decoder_kwargs=TINY_DECODER)
    if which == "explainer-fpn":
        return ExplainerModule(tiny_cnn, architecture="FPN", encoder="tu-explainer_resnet_tiny",
                               decoder_kwargs={"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32})
    if which == "explainer-dpt":  # smp's DPT on a ViT encoder (what architecture "auto" gives a ViT classifier)
        return ExplainerModule(tiny_cnn, architecture="DPT", encoder="tu-vit_tiny_patch16_224",
                               init_encoder_from_explanandum=False, decoder_kwargs={
                                   "encoder_depth": 2, "decoder_intermediate_channels": [16, 16],
                                   "decoder_fusion_channels": 16})
    if which == "ltx-cnn":
        return LTXModule(tiny_cnn)
    if which == "ltx-vit":
        return LTXModule(tiny_vit)
    if which == "ltx-agnostic":
        return LTXModule(tiny_cnn, class_agnostic=True)
    return explainer.load(ROOT / "checkpoints" / f"synthetic_{which}.safetensors")


class Channels:
    """Records how many channels the mask network gives per forward pass."""

    def __init__(self, net):
        self.seen: list[int] = []
        self.handle = net.register_forward_hook(lambda mod, inp, out: self.seen.append(out.shape[1]))


@pytest.mark.parametrize("which", ["explainer-unet", "explainer-fpn", "explainer-dpt", "ltx-cnn", "ltx-vit",
                                   "ltx-agnostic", "explainer", "ltx", "faithful"])
def test_only_the_requested_channels_equal_the_sliced_all_class_output(which, tiny_cnn, tiny_vit):
    m = build(which, tiny_cnn, tiny_vit).eval()
    C = m.num_classes
    size = 32 if which == "ltx-vit" else 48
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    selective = class_layer(m.net, C) is not None
    assert selective == (which != "ltx-agnostic")
    seen = Channels(m.net)
    full = m.explain(x)
    t = torch.tensor([2, 0, 2])
    one = m.explain(x, t)
    assert torch.allclose(one[:, 0], full[torch.arange(3), t], atol=1e-5)
    e = m.explanation(x, classes=[[3, 1], [1, 0], [0, 3]], size=size)  # at x's size: no resizing
    for i, cls in enumerate([[3, 1], [1, 0], [0, 3]]):
        assert torch.allclose(e.masks[i], full[i, cls], atol=1e-5)
    top = m.explanation(x, top_k=2, size=size)
    ref = m.explanation(x, size=size)  # every class
    assert torch.equal(top.classes, top_classes(ref.probabilities, 2))
    assert torch.allclose(top.masks, torch.stack([ref.masks[i, c] for i, c in enumerate(top.classes)]), atol=1e-5)
    seen.handle.remove()
    if selective:  # all C, then {0, 2}, then {0, 1, 3}, then each top-2 union, then all C again
        assert seen.seen[:3] == [C, 2, 3], seen.seen
        assert seen.seen[3] <= min(C, 6) and seen.seen[4] == C
    else:
        assert set(seen.seen) == {1}
    assert m.explain(x).shape == full.shape and torch.equal(m.explain(x), full)  # nothing left sliced
