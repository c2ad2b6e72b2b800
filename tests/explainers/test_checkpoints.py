"""The committed checkpoints load with the public API, with exactly the weights their files hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import explainer

ROOT = Path(__file__).resolve().parents[2] / "checkpoints"
EXPLAINERS = {"synthetic_explainer.safetensors": "explainer", "synthetic_ltx.safetensors": "ltx",
              "synthetic_faithful.safetensors": "distill", "synthetic_faithful_stage1.safetensors": "distill"}


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_committed_explainers_load_with_their_weights(name):
    path = ROOT / name
    if name.startswith("synthetic_faithful") and not path.is_file():
        pytest.fail(f"checkpoints/{name} is missing (configs/synthetic/distill_ensemble.yaml, then "
                    "distill_faithful_sharp.yaml)")
    e = explainer.load(path)
    assert e.kind == EXPLAINERS[name]
    stored = load_file(str(path))
    own = {k: v for k, v in e.state_dict().items() if not k.startswith("explanandum.")}
    assert set(own) == set(stored)
    assert all(torch.equal(own[k], stored[k]) for k in own)
    masks = e.explain(torch.rand(2, 3, 128, 128))
    assert masks.shape == (2, e.num_classes, 128, 128) and 0 <= float(masks.min()) and float(masks.max()) <= 1


def test_committed_classifier_loads_with_its_weights():
    path = ROOT / "synthetic_classifier.safetensors"
    f = explainer.load_explanandum(path)
    stored = load_file(str(path))
    own = f.model.state_dict()
    assert set(own) == {k.removeprefix("model.") for k in stored} or set(own) == set(stored)
    key = (lambda k: k) if set(own) == set(stored) else (lambda k: f"model.{k}")
    assert all(torch.equal(v, stored[key(k)]) for k, v in own.items())
