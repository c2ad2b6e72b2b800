"""The README's promises: its Python block runs as written, every command it shows names a real verb."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from explainer.cli import VERBS, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_block_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "the README has a Python block"
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    script = tmp_path / "readme.py"
    script.write_text(blocks[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "data" / "tiny" / "synthetic.json").is_file()


def test_every_command_names_a_verb_with_help(capsys):
    shown = set(re.findall(r"python -m explainer ([a-z]+)", README))
    assert {"quickstart", "explain", "evaluate", "export", "attribute", "fit", "finetune"} <= shown
    assert shown <= set(VERBS), shown - set(VERBS)
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(v in listed for v in VERBS)
    for verb in sorted(shown - {"fit", "train"}):
        with pytest.raises(SystemExit) as done:
            main([verb, "--help"])
        assert done.value.code == 0
        assert "--" in capsys.readouterr().out  # its options are listed
    for door in ("train.py", "finetune.py"):
        run = subprocess.run([sys.executable, str(ROOT / door), "--help"], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0 and "usage" in run.stdout.lower(), run.stderr[-2000:]
