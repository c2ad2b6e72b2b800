"""Parsing a pipeline's settings with jsonargparse, errors reported as ValueError naming the bad key."""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentParser, Namespace


def parse(parser: ArgumentParser, argv: list[str] | None) -> Namespace:
    """``parser.parse_args(argv)``; a bad key, type or value (in a flag or a ``--config`` file) is a ValueError."""
    try:
        return parser.parse_args(argv)
    except Exception as err:  # jsonargparse's ArgumentError
        if type(err).__name__ != "ArgumentError":
            raise
        raise ValueError(f"{parser.prog}: {err}") from None


def parse_object(parser: ArgumentParser, cfg: dict[str, Any], where: str) -> Namespace:
    """``parser.parse_object(cfg)`` with defaults; errors as for :func:`parse`, prefixed by ``where``."""
    try:
        return parser.parse_object(cfg, defaults=True)
    except Exception as err:
        if type(err).__name__ != "ArgumentError":
            raise
        raise ValueError(f"{where}: {err}") from None
