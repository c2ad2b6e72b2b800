"""``python -m explainer explain`` over a folder (issue 22, items 2 and 3), each failing on 4c22510:

* bad files (a text file named .png, a truncated JPEG, a zero-byte .jpg) do not stop the run: every good
  image is explained, every bad file is listed with its reason in explanations.json and on stderr, the exit
  code is 1 (0 with --skip-bad), and every written mask has its entry in explanations.json;
* ``--out`` inside ``--images`` never reads its own outputs, however many runs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explainer import cli

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "checkpoints" / "synthetic_explainer.safetensors"
GOOD = ["a_good.jpg", "z_good.jpg"]
BAD = {"b_text.png": "not a readable image", "c_truncated.jpg": "truncated JPEG", "d_empty.jpg": "not a readable"}


def jpeg(seed: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for i, name in enumerate(GOOD):
        (root / name).write_bytes(jpeg(i))
    (root / "b_text.png").write_text("this is not an image\n")
    (root / "c_truncated.jpg").write_bytes(jpeg(5, (64, 64))[:300])
    (root / "d_empty.jpg").write_bytes(b"")
    return root


def run(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("batch_size", [1, 16])
def test_bad_files_are_listed_and_the_good_ones_explained(folder, tmp_path, capsys, batch_size):
    out = tmp_path / f"out{batch_size}"
    code, err = run(["explain", "--checkpoint", CKPT, "--images", folder, "--out", out, "--top-k", 2,
                     "--batch-size", batch_size], capsys)
    assert code == 1
    report = json.loads((out / "explanations.json").read_text())
    assert sorted(report) == sorted(GOOD + list(BAD))
    for name in GOOD:
        assert len(report[name]["top_classes"]) == 2
    for name, words in BAD.items():
        assert words in report[name]["error"], (name, report[name])
        assert name in err
    assert "3 of 5 file(s) could not be read" in err
    # nothing half-written: every mask on disk belongs to an entry of explanations.json, and every entry's
    # masks are on disk
    masks = sorted(p.name for p in out.rglob("*_mask.png"))
    expected = sorted(f"{n.replace('.', '_')}_{e['class']}_mask.png" for n in GOOD for e in report[n]["top_classes"])
    assert masks == expected
    assert not [p for p in out.rglob(".*")]  # no temporary files left


def test_skip_bad_exits_0_and_still_lists_them(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(["explain", "--checkpoint", CKPT, "--images", folder, "--out", out, "--skip-bad", "true"], capsys)
    assert code == 0
    report = json.loads((out / "explanations.json").read_text())
    assert sorted(k for k, v in report.items() if "error" in v) == sorted(BAD)
    assert "warning: 3 of 5 file(s)" in err


def test_out_inside_images_is_never_read(folder, capsys):
    for name in BAD:
        (folder / name).unlink()
    out = folder / "out"
    for _ in range(3):
        code, err = run(["explain", "--checkpoint", CKPT, "--images", folder, "--out", out, "--top-k", 1], capsys)
        assert code == 0, err
        report = json.loads((out / "explanations.json").read_text())
        assert sorted(report) == GOOD
    assert not (out / "out").exists()
    assert len(list(out.rglob("*_mask.png"))) == len(GOOD)
    # an output folder that holds the images is refused before anything is written
    code, err = run(["explain", "--checkpoint", CKPT, "--images", folder, "--out", folder.parent], capsys)
    assert code == 1 and "holds the images folder" in err
