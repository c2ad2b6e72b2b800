"""The classifier report's object erasure against a plain re-implementation."""

import torch
import torch.nn.functional as F

from explainer.core.constants import VOID
from explainer.pipelines.classifier_eval import erase_objects


def plain_erase(x, mask, dilate=3, iters=60):
    """Diffusion inpainting written out: dilate the objects, start from the mean background colour, then
    repeatedly replace every object pixel by the mean of its 5 x 5 window inside the image."""
    obj = ((mask > 0) | (mask == VOID)).float()[:, None]
    obj = F.max_pool2d(obj, 2 * dilate + 1, stride=1, padding=dilate)
    keep = 1 - obj
    mean_bg = (x * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp(min=1)
    y = x * keep + mean_bg * obj
    h, w = x.shape[-2:]
    for _ in range(iters):
        new = y.clone()
        for i in range(h):
            for j in range(w):
                win = y[:, :, max(0, i - 2):i + 3, max(0, j - 2):j + 3]
                new[:, :, i, j] = win.mean((2, 3))
        y = x * keep + new * obj
    return y.clamp(0, 1)


def test_erase_objects_matches_plain_diffusion():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 14, 11, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 14, 11, dtype=torch.long)
    mask[0, 3:7, 2:5] = 1
    mask[0, 0, :] = VOID  # void band along the top border: erased too
    mask[1, 9:14, 6:11] = 3  # an object in the corner: windows clipped by the border
    torch.testing.assert_close(erase_objects(x, mask, iters=5), plain_erase(x, mask, iters=5), atol=1e-10, rtol=0)
    # kept pixels are the image's own
    out = erase_objects(x, mask, iters=5)
    assert torch.equal(out[1, :, :3, :3], x[1, :, :3, :3])
