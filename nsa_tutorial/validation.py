"""Argument checks shared by the modules: each error names the argument, its value and the rule."""

from __future__ import annotations


def require_positive_int(name: str, value: object) -> None:
    """Raise TypeError unless `value` is an int, ValueError unless it is > 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {name}={value}")


def require_bool(name: str, value: object) -> None:
    """Raise TypeError unless `value` is a bool (1 or None are not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")


def require_number(name: str, value: object, allow_none: bool = False) -> None:
    """Raise TypeError unless `value` is an int or float (not a bool), or None if allowed."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        rule = "a number or None" if allow_none else "a number"
        raise TypeError(f"{name} must be {rule}, got {name}={value!r}")
