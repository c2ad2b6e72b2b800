"""Issue 22, item 6: an explainer records the class names it was trained for; loading it with a classifier whose
names differ (edited in either file, swapped, or given as an override) is refused, naming both lists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import tiny_classifier, tiny_explainer_kwargs
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import explainer
from explainer.explainers import ExplainerModule, load
from explainer.explainers.export import export_safetensors

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    clf = tiny_classifier(d / "clf.safetensors")
    torch.manual_seed(0)
    module = ExplainerModule(**tiny_explainer_kwargs(clf))
    return d, clf, export_safetensors(module, d / "explainer.safetensors"), module


def edit_names(src: Path, dst: Path, change) -> list[str]:
    """Copy a project safetensors file with its metadata's class names changed by ``change`` (weights as they
    are); returns the new names."""
    with safe_open(str(src), "pt") as fh:
        meta = json.loads(fh.metadata()["explainer"])
    names = change(list(meta["class_names"]))
    meta["class_names"] = names
    if "meta" in meta.get("explanandum", {}):
        meta["explanandum"]["meta"]["class_names"] = names
    save_file(load_file(str(src)), str(dst), {"explainer": json.dumps(meta)})
    return names


def swap(names: list[str]) -> list[str]:
    return [names[1], names[0], *names[2:]]


def both_lists(a: list[str], b: list[str]) -> str:
    return f"{re.escape(str(a))}.*{re.escape(str(b))}"


def test_the_recorded_names_are_the_classifiers(made):
    d, clf, path, module = made
    e = load(path)
    assert e.class_names == explainer.load_explanandum(clf).class_names
    with safe_open(str(path), "pt") as fh:
        assert json.loads(fh.metadata()["explainer"])["class_names"] == e.class_names


def test_names_edited_in_the_explainer_are_refused(made):
    d, clf, path, module = made
    trained = explainer.load_explanandum(clf).class_names
    edited = edit_names(path, d / "renamed.safetensors", lambda n: ["dog", *n[1:]])
    with pytest.raises(ValueError, match=both_lists(edited, trained)):
        load(d / "renamed.safetensors")
    swapped = edit_names(path, d / "swapped.safetensors", swap)
    with pytest.raises(ValueError, match=both_lists(swapped, trained)):
        load(d / "swapped.safetensors")


def test_names_edited_in_the_classifier_are_refused(made, tmp_path):
    """The weights fingerprint does not cover the names: the same weights with two names swapped load as that
    classifier, but the explainer trained for the original order refuses it."""
    d, clf, path, module = made
    trained = explainer.load_explanandum(clf).class_names
    swapped = edit_names(clf, tmp_path / "clf.safetensors", swap)
    f = explainer.load_explanandum(tmp_path / "clf.safetensors")
    assert f.class_names == swapped and explainer.explainers.fingerprint(f) == module.explanandum_fingerprint
    with pytest.raises(ValueError, match=both_lists(trained, swapped)):
        load(path, explanandum=str(tmp_path / "clf.safetensors"))
    with pytest.raises(ValueError, match=both_lists(trained, swapped)):
        load(path, explanandum=f)
    with pytest.raises(ValueError, match=both_lists(trained, swapped)):
        explainer.methods.get("explainer", f, checkpoint=str(path))


def test_lightning_checkpoints_check_the_names_too(made):
    """Resuming with Lightning (``--ckpt_path``) or ``load_from_checkpoint`` goes through on_load_checkpoint."""
    d, clf, path, module = made
    meta = module.export_metadata()
    module.on_load_checkpoint({"state_dict": {}, "explainer_meta": meta})
    bad = {**meta, "class_names": swap(meta["class_names"])}
    with pytest.raises(ValueError, match=both_lists(bad["class_names"], meta["class_names"])):
        module.on_load_checkpoint({"state_dict": {}, "explainer_meta": bad})


@pytest.mark.parametrize("name", ["synthetic_explainer", "synthetic_ltx", "synthetic_faithful"])
def test_committed_checkpoints_still_load(name):
    e = load(ROOT / "checkpoints" / f"{name}.safetensors")
    with safe_open(str(ROOT / "checkpoints" / f"{name}.safetensors"), "pt") as fh:
        assert e.class_names == json.loads(fh.metadata()["explainer"])["class_names"]
