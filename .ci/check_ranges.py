"""Installing this package beside other in-range torch, Lightning and timm keeps them (issue 20, item 7).

A scratch venv holds this venv's distributions, except torch, torchvision, pytorch-lightning and timm at
versions that pyproject.toml allows but constraints.txt does not pin; ``pip install --dry-run --report`` of
``-e .[dev]`` (without the constraints) must then install none of those four. Lightning and timm are installed
for real (``--no-deps``, small wheels); torch, torchvision and the rest are registered by their metadata only
(the published one, PEP 658, for torch and torchvision, as their CPU builds: without the CUDA packages; this
venv's for the rest): what pip's resolver reads of an installed distribution, without gigabytes of wheels.
Needs only the package registries; about a minute.

Usage: .venv/bin/python .ci/check_ranges.py [--keep DIR]   (Python >= 3.11: tomllib; pip >= 22.3: --python)
"""

from __future__ import annotations

import argparse
import email.parser
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# in the declared ranges, and not the versions constraints.txt pins (torchvision matches its torch)
OTHERS = {"torch": "2.10.0", "torchvision": "0.25.0", "pytorch-lightning": "2.5.6", "timm": "1.0.20"}
REAL = ("pytorch-lightning", "timm")  # installed for real; the others by their metadata


def pip(python: Path, *args: str) -> None:
    print(time.strftime("%T"), *args[:3], flush=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args], check=True)


def published_metadata(names: list[str], python: Path, report: Path) -> list[dict]:
    """The registry's metadata of ``name==version`` for each of ``names`` (a dry run: nothing downloaded but
    metadata where the index serves it)."""
    pip(python, "install", "--quiet", "--dry-run", "--ignore-installed", "--no-deps", "--report", str(report),
        *[f"{n}=={OTHERS[n]}" for n in names])
    return [item["metadata"] for item in json.loads(report.read_text())["install"]]


def cpu_build(meta: dict) -> dict:
    """The metadata of the CPU build of a torch release: version ``+cpu``, no CUDA packages."""
    cuda = ("nvidia-", "cuda-", "triton")
    keep = [r for r in meta.get("requires_dist") or [] if not canonicalize_name(Requirement(r).name).startswith(cuda)]
    return {**meta, "version": f"{meta['version']}+cpu", "requires_dist": keep}


def register(site: Path, meta: dict) -> None:
    """An installed distribution as pip sees one: a ``.dist-info`` folder with its METADATA."""
    d = site / f"{canonicalize_name(meta['name']).replace('-', '_')}-{meta['version']}.dist-info"
    d.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {meta['version']}"]
    if meta.get("requires_python"):
        lines.append(f"Requires-Python: {meta['requires_python']}")
    lines += [f"Provides-Extra: {e}" for e in meta.get("provides_extra") or []]
    lines += [f"Requires-Dist: {r}" for r in meta.get("requires_dist") or []]
    (d / "METADATA").write_text("\n".join(lines) + "\n")
    (d / "INSTALLER").write_text("check_ranges\n")
    (d / "RECORD").write_text("")


def copy_installed(site: Path, skip: set[str]) -> None:
    """Register this venv's distributions (but ``skip`` and the editable package itself) in ``site``."""
    for d in Path(sysconfig.get_paths()["purelib"]).glob("*.dist-info"):
        meta = email.parser.Parser().parsestr((d / "METADATA").read_text(encoding="utf-8"), headersonly=True)
        name = canonicalize_name(meta["Name"])
        if name in skip or (d / "direct_url.json").exists():
            continue
        register(site, {"name": meta["Name"], "version": meta["Version"],
                        "requires_python": meta["Requires-Python"], "requires_dist": meta.get_all("Requires-Dist"),
                        "provides_extra": meta.get_all("Provides-Extra")})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="build the scratch venv here and keep it (default: a temp dir)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, deps)}
    for name, version in OTHERS.items():
        if version not in ranges[canonicalize_name(name)]:
            raise SystemExit(f"check_ranges: {name} {version} is outside the declared range "
                             f"{ranges[canonicalize_name(name)]}; choose another version in OTHERS")
    with tempfile.TemporaryDirectory(prefix="check-ranges-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = venv / "bin" / "python"
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        pip(python, "install", "--quiet", "--no-deps", *[f"{n}=={OTHERS[n]}" for n in REAL])
        copy_installed(site, {canonicalize_name(n) for n in OTHERS})
        for meta in published_metadata([n for n in OTHERS if n not in REAL], python, work / "published.json"):
            register(site, cpu_build(meta))
        report = work / "report.json"
        pip(python, "install", "--quiet", "--dry-run", "--report", str(report), "-e", f"{root}[dev]")
        install = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                   for i in json.loads(report.read_text())["install"]}
    replaced = {n: install[canonicalize_name(n)] for n in OTHERS if canonicalize_name(n) in install}
    if replaced:
        print(f"check_ranges: FAILED: installing the package would replace {OTHERS} with {replaced}")
        return 1
    print(f"check_ranges: installing the package keeps {OTHERS} ({len(install)} other distributions to install)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
