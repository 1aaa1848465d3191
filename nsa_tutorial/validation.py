"""Argument checks shared by the modules: each error names the argument, its value and the rule."""

from __future__ import annotations


def require_positive_int(name: str, value: object) -> None:
    """Raise TypeError unless `value` is an int, ValueError unless it is > 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {name}={value}")
