"""``explain(x)`` takes float64/float16 images, empty batches and single images of 32 px or less.

Split from tests/test_issue14.py (issue 14, "nothing lost, nothing silently wrong"): each test failed on the
code before the refactor 3569dd4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import explainer

ROOT = Path(__file__).resolve().parents[2]
EXPLAINER_CK = ROOT / "checkpoints" / "synthetic_explainer.safetensors"


@pytest.fixture(scope="module")
def trained():
    return explainer.load(EXPLAINER_CK)


# ---------------------------------------------------------------------- 3. dtypes, empty, small images --
def test_explain_takes_float64_and_float16(trained):
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    ref = trained.explain(x)
    out64 = trained.explain(x.double())
    assert out64.dtype == torch.float32 and torch.allclose(out64, ref, atol=1e-6)
    xh = x.half()
    out16 = trained.explain(xh)
    assert out16.dtype == torch.float32 and torch.allclose(out16, trained.explain(xh.float()), atol=1e-6)
    assert (out16 - ref).abs().max() < 0.05  # and close to the float32 masks (the input was rounded)


def test_explain_empty_batch(trained):
    x = torch.rand(0, 3, 24, 20)
    assert trained.explain(x).shape == (0, trained.num_classes, 24, 20)
    assert trained.explain(x, targets=torch.zeros(0, dtype=torch.long)).shape == (0, 1, 24, 20)


@pytest.mark.parametrize("h, w", [(1, 1), (7, 13), (32, 32)])
def test_explain_single_small_image_equals_it_in_a_batch(trained, h, w):
    g = torch.Generator().manual_seed(h * 100 + w)
    pair = torch.rand(2, 3, h, w, generator=g)
    one = trained.explain(pair[:1])
    both = trained.explain(pair)
    assert one.shape == (1, trained.num_classes, h, w)
    assert torch.allclose(one, both[:1], atol=1e-5)
    assert torch.allclose(trained.explain(pair[1:]), both[1:], atol=1e-5)
