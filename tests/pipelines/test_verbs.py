"""The explain, export and evaluate verbs on bad or awkward input.

1. ``explain`` gives every input its own masks (outputs mirror the input tree, JSON keyed by relative path);
2. ``explain`` refuses bad --batch-size / --top-k / --size, naming the option, writing nothing;
4. ``explain --out FILE``, ``export --out DIR`` and an unwritable target: an error naming the path, no
   traceback, nothing left behind;
5. a misspelt method option in ``evaluate`` names the method.

Split from tests/test_issue14.py (issue 14, "nothing lost, nothing silently wrong"): each test failed on the
code before the refactor 3569dd4.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from explainer import cli

ROOT = Path(__file__).resolve().parents[2]
EXPLAINER_CK = ROOT / "checkpoints" / "synthetic_explainer.safetensors"
CLASSIFIER_CK = ROOT / "checkpoints" / "synthetic_classifier.safetensors"
SIZES = {"s1/img.jpg": (20, 24), "s2/img.jpg": (28, 16), "img.png": (18, 18)}  # (H, W) per input


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``python -m explainer ARGV`` in process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's way out
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """Three images that share a stem: s1/img.jpg, s2/img.jpg and img.png, each its own size and content."""
    root = tmp_path_factory.mktemp("issue14_images")
    rng = np.random.default_rng(0)
    for rel, (h, w) in SIZES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / rel)
    return root


# ---------------------------------------------------------------------------------- 1. names of outputs --
def test_explain_gives_every_input_its_own_masks(image_tree, tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, _, err = run_cli(["explain", "--checkpoint", EXPLAINER_CK, "--images", image_tree, "--out", out,
                                "--top-k", 2], capsys)
        assert code == 0, err
        runs.append(out)
    report = json.loads((runs[0] / "explanations.json").read_text())
    assert sorted(report) == sorted(SIZES)  # keyed by the path relative to the folder given
    masks = sorted(p for p in runs[0].rglob("*_mask.png"))
    assert len(masks) == len(SIZES) * 2  # nothing overwritten: one mask per (input, class)
    # each input's masks lie in its mirrored folder and have its size
    for rel, (h, w) in SIZES.items():
        folder = runs[0] / Path(rel).parent
        own = [p for p in folder.glob("*_mask.png") if p.name.startswith(Path(rel).name.replace(".", "_"))]
        assert len(own) == 2, (rel, listing(runs[0]))
        for entry in report[rel]["top_classes"]:
            assert any(entry["class"] in p.name for p in own)
        assert all(Image.open(p).size == (w, h) for p in own)
    # stable: a second run writes the same files with the same contents
    assert listing(runs[0]) == listing(runs[1])
    for p in masks:
        assert p.read_bytes() == (runs[1] / p.relative_to(runs[0])).read_bytes()


# ----------------------------------------------------------------------------- 2. bad numeric options --
@pytest.mark.parametrize("option, value, named", [
    ("--batch-size", -1, r"batch[_-]size"), ("--batch-size", 0, r"batch[_-]size"), ("--top-k", 0, r"top[_-]k"),
    ("--top-k", -2, r"top[_-]k"), ("--size", 0, r"\bsize\b")])
def test_explain_refuses_bad_numbers(image_tree, tmp_path, capsys, option, value, named):
    out = tmp_path / "out"
    code, _, err = run_cli(["explain", "--checkpoint", EXPLAINER_CK, "--images", image_tree, "--out", out,
                            option, value], capsys)
    assert code != 0
    assert re.search(named, err), err
    assert not out.exists()


# ------------------------------------------------------------------------------------ 4. output paths --
def test_explain_out_is_an_existing_file(image_tree, tmp_path, capsys):
    target = tmp_path / "masks"
    target.write_text("mine")
    before = listing(tmp_path)
    code, _, err = run_cli(["explain", "--checkpoint", EXPLAINER_CK, "--images", image_tree, "--out", target],
                           capsys)
    assert code != 0
    assert str(target) in err and "Traceback" not in err
    assert target.read_text() == "mine" and listing(tmp_path) == before


def test_export_out_is_an_existing_directory(tmp_path, capsys):
    target = tmp_path / "export"
    target.mkdir()
    before = listing(tmp_path)
    code, _, err = run_cli(["export", "--checkpoint", EXPLAINER_CK, "--format", "safetensors", "--out", target],
                           capsys)
    assert code != 0
    assert str(target) in err and "Traceback" not in err
    assert listing(tmp_path) == before


def test_export_to_an_unwritable_place_names_the_target(capsys):
    target = Path("/proc/issue14_export.safetensors")
    code, _, err = run_cli(["export", "--checkpoint", EXPLAINER_CK, "--format", "safetensors", "--out", target],
                           capsys)
    assert code != 0
    assert str(target) in err and "Traceback" not in err
    assert ".tmp" not in err  # the target, not the temporary file beside it
    assert not target.exists()


# --------------------------------------------------------------------------- 5. misspelt method option --
def test_misspelt_option_in_evaluate_names_the_method(tiny_voc, tmp_path, capsys):
    cfg = {"explanandum": str(CLASSIFIER_CK),
           "data": {"class_path": "explainer.data.VOCDataModule",
                    "init_args": {"root": str(tiny_voc), "image_size": 32, "num_workers": 0}},
           "split": "test", "num_images": 2, "device": "cpu", "metrics": ["deletion_auc"],
           "methods": {"gradcam": {"layre": "x"}}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "results.json"
    code, _, err = run_cli(["evaluate", "--config", path, "--out", out], capsys)
    assert code != 0
    assert "gradcam" in err and "layre" in err, err
    assert not out.exists()
