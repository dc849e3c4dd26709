"""Checks that `*Config` dataclasses run in `__post_init__`, so a bad value fails where it is
made, with a `ConfigError` naming the field, instead of deep inside a running peer."""

from __future__ import annotations

import math

from sdcn_p2p.errors import ConfigError

__all__ = ["require", "require_at_least", "require_positive"]


def require(config: object, name: str, ok: bool, must: str) -> None:
    """Raise ConfigError("<Config>.<name> <must>, got <value>") unless `ok`."""
    if not ok:
        value = getattr(config, name)
        raise ConfigError(f"{type(config).__name__}.{name} {must}, got {value!r}")


def require_at_least(config: object, low: int, *names: str) -> None:
    """Each named field is an integer ≥ `low`."""
    for name in names:
        value = getattr(config, name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        require(config, name, ok, f"must be an integer ≥ {low}")


def require_positive(config: object, *names: str) -> None:
    """Each named field is a finite number > 0 (a duration, a rate)."""
    for name in names:
        value = getattr(config, name)
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        )
        require(config, name, ok, "must be a finite number > 0")
