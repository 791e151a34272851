"""JSON-ready copies of the SDK's dataclasses: what every ``to_dict()`` returns.

Non-finite floats become ``None`` (strict JSON has no NaN), enums their values, tuples and
lists lists, mappings dicts, and nested objects their own ``to_dict()``.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

__all__ = ["JsonRecord", "dataclass_dict", "finite_or_none", "plain"]


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def plain(value: Any) -> Any:
    """A JSON-ready copy of one value."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def dataclass_dict(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A dataclass's fields, each ``plain``, but for those named in ``skip``."""
    return {f.name: plain(getattr(obj, f.name)) for f in fields(obj) if f.name not in skip}


class JsonRecord:
    """A result dataclass's ``to_dict()`` (its JSON-ready copy) and ``to_json()``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)

    def to_json(self, indent: int | None = None) -> str:
        """Strict JSON (non-finite numbers as null)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)
