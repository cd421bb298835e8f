"""What the run configs (TrainConfig and its subclasses, EvalConfig) share: building one from a dict."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """``cls(**d)`` for a config dataclass, refusing unknown keys by name (e.g. from a JSON config file)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown} (known: {sorted(names)})")
    return cls(**d)
