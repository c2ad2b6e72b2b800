"""Objects named in configs: ``"pkg.module:attr"``, ``"path/to/file.py:attr"`` or ``"pkg.module.Attr"``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


def import_object(spec: str, what: str = "class_path") -> Any:
    """The object ``spec`` names; ValueError (FileNotFoundError for a missing file) naming ``what`` otherwise."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{what}: expected 'pkg.module:name', 'path/to/file.py:name' or 'pkg.module.Name', "
                         f"got {spec!r}")
    if ":" in spec:
        target, _, attr = spec.rpartition(":")
    else:
        target, _, attr = spec.rpartition(".")
    if not target or not attr:
        raise ValueError(f"{what}: expected 'pkg.module:name', 'path/to/file.py:name' or 'pkg.module.Name', "
                         f"got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such file {target!r} (expected 'path/to/file.py:name')")
        modname = f"_explainer_user_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[modname] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"{what}: cannot import module {target!r} for {spec!r} ({err})") from err
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise ValueError(f"{what}: {target!r} has no callable {attr!r}")
    return obj
