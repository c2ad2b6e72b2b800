"""The one registry mechanism: names -> objects, for methods, metrics and trained-explainer kinds.

A :class:`Registry` refuses to give a taken name to another object, and an unknown name gets an error that
suggests the closest registered names. Read access is that of a mapping (``name in r``, ``r[name]``,
iteration in registration order).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def _qualname(obj: object) -> tuple[str | None, str | None]:
    return getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)


class Registry(Mapping[str, T], Generic[T]):
    """Named objects of one kind (``what``: "method", "metric", "explainer kind", used in messages)."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name``; a taken name is an error unless ``obj`` is the same object or the same
        class re-created by a module reload."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string, got {name!r}")
        old = self._items.get(name)
        if old is not None and old is not obj and _qualname(old) != _qualname(obj):
            where = ".".join(str(p) for p in _qualname(old) if p) or repr(old)
            raise ValueError(f"name: {self.what} {name!r} is already registered to {where}")
        self._items[name] = obj
        return obj

    def register(self, name: str, hook: Callable[[str, T], None] | None = None) -> Callable[[T], T]:
        """Decorator form of :meth:`add`; ``hook(name, obj)`` runs after registration."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string, got {name!r}")

        def deco(obj: T) -> T:
            self.add(name, obj)
            if hook is not None:
                hook(name, obj)
            return obj

        return deco

    def get(self, name: str) -> T:  # type: ignore[override]
        """The object registered as ``name``; ValueError with close matches and the known names otherwise."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            close = difflib.get_close_matches(str(name), list(self._items), n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"name: unknown {self.what} {name!r}{hint}; available: "
                             f"{', '.join(self.available())}") from None

    def available(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register throw-away entries)."""
        self._items.pop(name, None)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:  # unhashable: never a name
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.available()})"
