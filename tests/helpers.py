"""Small builders shared by the explainer tests."""

from pathlib import Path

import torch

import explainer

TINY_DECODER = {"decoder_channels": [32, 16, 16, 8, 8]}


def tiny_classifier(path: Path, num_classes: int = 8, seed: int = 0) -> Path:
    """A random tiny ResNet explanandum saved as a project safetensors checkpoint."""
    torch.manual_seed(seed)
    from explainer.data.synthetic import CLASSES

    f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=num_classes, multilabel=True,
                                   class_names=list(CLASSES)[:num_classes])
    return explainer.save_explanandum(f, path)


def tiny_explainer_kwargs(clf: Path, **over) -> dict:
    kw = dict(explanandum=str(clf), architecture="Unet", encoder="tu-explainer_resnet_tiny",
              decoder_kwargs=TINY_DECODER, lr=1e-3, log_images=2, area_min=0.01, area_max=0.1)
    kw.update(over)
    return kw
