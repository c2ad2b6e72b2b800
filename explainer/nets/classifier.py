"""Small classifiers for the embedded benchmark, registered with timm.

Registering them with timm lets configs, checkpoints and smp's universal
encoder (``tu-<name>``) speak of them by name, so an explainer's encoder can
be built with the same architecture as the explanandum and initialised from
its weights.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, _create_resnet


def _cfg(**kwargs):
    return {"url": "", "num_classes": 8, "input_size": (3, 128, 128), "pool_size": (4, 4),
            "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "first_conv": "conv1.0",
            "classifier": "fc", **kwargs}


# read by timm's register_model when the functions below are decorated
default_cfgs = generate_default_cfgs({
    "explainer_resnet_small.untrained": _cfg(),
    "explainer_resnet_tiny.untrained": _cfg(),
})


@register_model
def explainer_resnet_small(pretrained: bool = False, **kwargs):
    """ResNet-style CNN, blocks [1,1,1,1], widths 32-256, ~1.2 M parameters.

    A deep 3x3 stem and ``zero_init_last=False``: with timm's defaults
    (7x7 stem, zero-initialised last BN) this small network trained from
    scratch stays at the label prior for hundreds of steps.
    """
    args = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=16,
                stem_type="deep", zero_init_last=False)
    args.update(kwargs)
    return _create_resnet("explainer_resnet_small", pretrained, **args)


@register_model
def explainer_resnet_tiny(pretrained: bool = False, **kwargs):
    """A very small ResNet (widths 8-32) for fast tests."""
    args = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 16, 16, 32), stem_width=8,
                stem_type="deep", zero_init_last=False)
    args.update(kwargs)
    return _create_resnet("explainer_resnet_tiny", pretrained, **args)
