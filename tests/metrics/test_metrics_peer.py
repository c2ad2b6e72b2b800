"""explainer.metrics against a peer implementation (Quantus), only where it is importable.

Quantus is not a dependency of the project: these tests skip cleanly without it. Checked with
quantus 0.6.0 on the PYTHONPATH (installed with ``pip install --target DIR``, outside the venv): passed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import explainer
from explainer import metrics as M


def test_deletion_curve_matches_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")
    torch.manual_seed(0)
    f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=4, multilabel=False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 12, 12, generator=g)
    x[:, 0, 0, 0] = 0  # Quantus' "black" is the image minimum: make it 0, our black
    maps = torch.rand(3, 1, 12, 12, generator=g)  # distinct values: no ties in the ordering
    t = np.array([0, 1, 2])
    steps = 12  # ceil(144 / 12) = 12 pixels per step = 36 channel values per Quantus step
    pf = quantus.PixelFlipping(features_in_step=3 * 12, perturb_baseline="black", normalise=False,
                               disable_warnings=True, display_progressbar=False)
    curves_q = np.asarray(pf(model=f, x_batch=x.numpy(), y_batch=t, a_batch=maps.numpy(), softmax=True,
                             device="cpu", channel_first=True))
    _, curves = M.deletion_auc(f, x, maps, torch.as_tensor(t), baseline="black", steps=steps, return_curves=True)
    # ours starts with the intact image; Quantus' curve starts after the first step
    assert curves_q.shape == (3, steps)
    np.testing.assert_allclose(curves[:, 1:].numpy(), curves_q, atol=1e-5)
