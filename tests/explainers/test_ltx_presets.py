"""LTX finetuning defaults to the checkpoint's recorded settings (the "validated" preset), ``preset="paper"``
keeps the official ones, and a pLTX records custom settings through export and load.

Split from tests/test_issue14.py (issue 14, "nothing lost, nothing silently wrong"): each test failed on the
code before the refactor 3569dd4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_classifier

import explainer
import explainer.methods as M
from explainer.explainers.export import export_safetensors
from explainer.explainers.loading import read_meta
from explainer.explainers.ltx import FINETUNE_PRESETS, LTXModule, check_finetuning, finetune

ROOT = Path(__file__).resolve().parents[2]
LTX_CK = ROOT / "checkpoints" / "synthetic_ltx.safetensors"
CLASSIFIER_CK = ROOT / "checkpoints" / "synthetic_classifier.safetensors"


# ---------------------------------------------------------------------------------- 6. LTX finetuning --
@pytest.fixture(scope="module")
def ltx_images():
    f = explainer.load_explanandum(str(CLASSIFIER_CK))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return x, f(x).argmax(1)


def test_ltx_defaults_are_the_recorded_validated_settings(ltx_images):
    x, t = ltx_images
    method = M.get("ltx", None, checkpoint=str(LTX_CK), steps=2)
    module = explainer.load(LTX_CK)
    v = FINETUNE_PRESETS["validated"]
    spelt = finetune(module, x, t, steps=2, lr=v["lr"], mode=v["mode"], objective=v["objective"])
    got = method.attribute(x, t)
    assert torch.allclose(got, spelt, atol=1e-5)
    assert torch.allclose(got, finetune(module, x, t, steps=2, preset="validated"), atol=1e-5)
    # the official settings, spelt out, are something else
    paper = finetune(module, x, t, steps=2, lr=2e-3, mode=module.hparams.target, objective={})
    assert (paper - spelt).abs().max() > 1e-3
    assert method.settings == {**v, "steps": 2}
    assert M.get("ltx", None, checkpoint=str(LTX_CK)).settings == v


def test_ltx_paper_preset(ltx_images):
    x, t = ltx_images
    module = explainer.load(LTX_CK)
    method = M.get("ltx", None, checkpoint=str(LTX_CK), preset="paper", steps=2)
    spelt = finetune(module, x, t, steps=2, lr=2e-3, mode=module.hparams.target, objective={})
    assert torch.allclose(method.attribute(x, t), spelt, atol=1e-5)
    assert M.get("ltx", None, checkpoint=str(LTX_CK), preset="paper").settings == FINETUNE_PRESETS["paper"]


def test_pltx_records_its_finetuning_settings(tmp_path):
    clf = tiny_classifier(tmp_path / "clf.safetensors")
    custom = {"steps": 2, "lr": 5e-4, "mode": "kl", "objective": {"lambda_mask": 5.0, "baseline": "mean"}}
    torch.manual_seed(0)
    module = LTXModule(explanandum=str(clf), network="backbone", lambda_mask=20.0)
    module_custom = LTXModule(explanandum=str(clf), network="backbone", lambda_mask=20.0, finetuning=custom)
    module_custom.load_state_dict(module.state_dict())
    path = export_safetensors(module_custom, tmp_path / "pltx.safetensors")
    want = check_finetuning(custom)
    assert read_meta(path)[0]["hparams"]["finetuning"] == want
    loaded = explainer.load(path)
    assert loaded.hparams["finetuning"] == want
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 3])
    method = M.get("ltx", None, checkpoint=str(path))
    assert method.settings == want
    got = method.attribute(x, t)
    assert torch.allclose(got, finetune(loaded, x, t, **custom), atol=1e-5)
    assert (got - finetune(loaded, x, t, preset="validated", steps=2)).abs().max() > 1e-4
