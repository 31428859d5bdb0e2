"""Merge methods, one file each; importing this package registers them all."""

from __future__ import annotations

from merging.methods import dare_linear, dare_ties, neuromerging, task_arithmetic, ties
from merging.methods.base import REGISTRY, MergeMethod

__all__ = ["REGISTRY", "MergeMethod", "get_method"]
_ = (dare_linear, dare_ties, neuromerging, task_arithmetic, ties)


def get_method(name: str) -> MergeMethod:
    """Returns the registered method `name`, or raises KeyError listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
