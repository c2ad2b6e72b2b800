"""Issue 22, item 7 (first part): ``evaluate --num-images 0`` names the flag and what it expects, not an internal
name ("limit")."""

from __future__ import annotations

import pytest
import yaml
from helpers import tiny_classifier

from explainer import cli
from explainer.pipelines.evaluate import validate_config


@pytest.fixture(scope="module")
def config(tiny_voc, tmp_path_factory):
    d = tmp_path_factory.mktemp("numimg")
    cfg = {"explanandum": str(tiny_classifier(d / "clf.safetensors")),
           "data": {"class_path": "explainer.data.VOCDataModule",
                    "init_args": {"root": str(tiny_voc), "image_size": 64, "num_workers": 0}},
           "split": "val", "methods": {"saliency": None}, "metrics": ["deletion_auc"]}
    path = d / "evaluate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


@pytest.mark.parametrize("n", ["0", "-3"])
def test_num_images_below_one_names_the_flag(config, tmp_path, capsys, n):
    path, _ = config
    out = tmp_path / "results.json"
    assert cli.main(["evaluate", "--config", str(path), "--num-images", n, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "num_images (--num-images): expected a positive number of images" in err and f"got {n}" in err
    assert "limit" not in err
    assert not out.exists()


def test_num_images_in_a_config_and_valid_values(config):
    _, cfg = config
    with pytest.raises(ValueError, match=r"config\.num_images \(--num-images\): expected a positive.*got 0"):
        validate_config({**cfg, "num_images": 0})
    assert validate_config({**cfg, "num_images": 1})["num_images"] == 1
    assert validate_config({**cfg, "num_images": None})["num_images"] is None
