"""A datamodule from a config section: the one builder ``evaluate`` and ``attribute`` share."""

from __future__ import annotations

from typing import Any

from explainer.core.imports import import_object


def build_datamodule(section: dict[str, Any], where: str = "data") -> Any:
    """The datamodule ``{class_path: ..., init_args: {...}}`` names, built and prepared (its data present).

    Raises:
        ValueError: the section has no ``class_path``, or the class has no ``dataset(split)`` method (it is not
            an :class:`explainer.data.ImageDataModule`); messages start with ``where``.
    """
    if not isinstance(section, dict) or "class_path" not in section:
        raise ValueError(f"{where}: expected a datamodule section {{class_path: ..., init_args: {{...}}}}, "
                         f"got {section!r}")
    cls = import_object(section["class_path"], what=f"{where}.class_path")
    dm = cls(**dict(section.get("init_args") or {}))
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    if not hasattr(dm, "dataset"):
        raise ValueError(f"{where}: {section['class_path']} has no dataset(split) method "
                         "(expected an explainer.data.ImageDataModule)")
    return dm
