"""The method registry: name -> Distiller class (whose ``Config`` holds the method's settings)."""
from __future__ import annotations

from typing import Callable

__all__ = ["register_method", "get_method", "list_methods", "METHODS"]

METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a Distiller available as ``--method name``."""

    def add(cls: type) -> type:
        METHODS[name.lower()] = cls
        return cls

    return add


def get_method(name: str) -> type:
    import ddlib.methods  # noqa: F401  (importing the package registers every method)

    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(list_methods())}")
    return METHODS[key]


def list_methods() -> list[str]:
    import ddlib.methods  # noqa: F401

    return sorted(METHODS)
