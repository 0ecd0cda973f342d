"""A notebook's parameters -> a stage's config: each notebook hands its ``globals()`` to one
``from_parameters`` call, which keeps the names that are the config's fields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def named_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` whose names are fields of the dataclass ``cls``; the rest are the
    notebook's own (where the run lives, what it shows) and are ignored.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     alpha: float = 0.3
    >>> named_fields(C, {"alpha": 0.5, "figure_png": True})
    {'alpha': 0.5}
    """
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}
