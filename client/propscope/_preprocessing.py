"""Per-request preprocessing: how path images become the model's input, and what its output
holds. Unset fields take the model's own declaration (its config.pbtxt), then the gateway's."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from propscope._json import dataclass_dict
from propscope.v1 import explain_pb2

__all__ = [
    "OUTPUT_KINDS",
    "PATH_MODES",
    "RESIZE_MODES",
    "OutputKind",
    "PathMode",
    "Preprocessing",
    "ResizeMode",
    "parse_triple",
    "path_mode_from_proto",
    "path_mode_to_proto",
]

OutputKind = Literal["logits", "probabilities"]
ResizeMode = Literal["squash", "center_crop", "letterbox"]
PathMode = Literal["adaptive", "fixed"]
OUTPUT_KINDS: tuple[str, ...] = ("logits", "probabilities")
RESIZE_MODES: tuple[str, ...] = ("squash", "center_crop", "letterbox")
PATH_MODES: tuple[str, ...] = ("adaptive", "fixed")

_OUTPUT_KIND_PROTO = {
    "logits": explain_pb2.Preprocessing.OUTPUT_KIND_LOGITS,
    "probabilities": explain_pb2.Preprocessing.OUTPUT_KIND_PROBABILITIES,
}
_RESIZE_PROTO = {
    "squash": explain_pb2.Preprocessing.RESIZE_MODE_SQUASH,
    "center_crop": explain_pb2.Preprocessing.RESIZE_MODE_CENTER_CROP,
    "letterbox": explain_pb2.Preprocessing.RESIZE_MODE_LETTERBOX,
}
_PATH_MODE_PROTO = {
    "adaptive": explain_pb2.PATH_MODE_ADAPTIVE,
    "fixed": explain_pb2.PATH_MODE_FIXED,
}


@dataclass(frozen=True)
class Preprocessing:
    """What the model's owners did to pixel values; ``None`` leaves a field to the model's
    config.pbtxt (then the gateway's file; an undeclared output kind is detected).

    ``mean`` and ``std``: three per-channel values applied after scaling to [0, 1], std > 0.
    ``output_kind``: "logits" (softmax is applied) or "probabilities" (used as they are).
    ``resize``: "squash", "center_crop" (shorter side, then the centre) or "letterbox".
    """

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output_kind: OutputKind | None = None
    resize: ResizeMode | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is None:
                continue
            if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != 3:
                raise ValueError(
                    f"preprocessing {name} must be 3 numbers (one per RGB channel), got {values!r}"
                )
            try:
                numbers = tuple(float(value) for value in values)
            except (TypeError, ValueError):
                raise ValueError(
                    f"preprocessing {name} must be 3 numbers, got {values!r}"
                ) from None
            if not all(math.isfinite(value) for value in numbers):
                raise ValueError(f"preprocessing {name} must be finite, got {values!r}")
            if name == "std" and min(numbers) <= 0:
                raise ValueError(f"preprocessing std must be positive, got {values!r}")
            object.__setattr__(self, name, numbers)
        if self.output_kind is not None and self.output_kind not in OUTPUT_KINDS:
            raise ValueError(
                f"preprocessing output_kind must be one of {', '.join(OUTPUT_KINDS)}, "
                f"got {self.output_kind!r}"
            )
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise ValueError(
                f"preprocessing resize must be one of {', '.join(RESIZE_MODES)}, "
                f"got {self.resize!r}"
            )

    @property
    def empty(self) -> bool:
        return self == Preprocessing()

    def to_proto(self) -> explain_pb2.Preprocessing:
        return explain_pb2.Preprocessing(
            mean=list(self.mean or ()),
            std=list(self.std or ()),
            output_kind=_OUTPUT_KIND_PROTO.get(self.output_kind or "", 0),
            resize=_RESIZE_PROTO.get(self.resize or "", 0),
        )

    @classmethod
    def from_proto(cls, msg: explain_pb2.Preprocessing) -> Preprocessing:
        """Unset fields (unspecified enums, no values) become ``None``; wrong lengths from a
        server are kept out rather than refused."""
        kinds = {number: name for name, number in _OUTPUT_KIND_PROTO.items()}
        resizes = {number: name for name, number in _RESIZE_PROTO.items()}
        mean = _float32s(msg.mean) if len(msg.mean) == 3 else None
        std = _float32s(msg.std) if len(msg.std) == 3 and min(msg.std) > 0 else None
        if mean is not None and not all(map(math.isfinite, mean)):
            mean = None
        return cls(
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            output_kind=kinds.get(msg.output_kind),  # type: ignore[arg-type]
            resize=resizes.get(msg.resize),  # type: ignore[arg-type]
        )

    def describe(self) -> str:
        """One line, e.g. ``mean 0.485,0.456,0.406, std 0.229,0.224,0.225, logits, squash``."""
        parts = []
        if self.mean is not None:
            parts.append("mean " + ",".join(f"{v:g}" for v in self.mean))
        if self.std is not None:
            parts.append("std " + ",".join(f"{v:g}" for v in self.std))
        parts += [value for value in (self.output_kind, self.resize) if value]
        return ", ".join(parts) or "not declared"

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


def _float32s(values: Sequence[float]) -> tuple[float, ...]:
    """float32 on the wire: each value as the float32 it was (0.485, not 0.48500001...)."""
    return tuple(float(str(np.float32(value))) for value in values)


def parse_triple(text: str, what: str) -> tuple[float, float, float]:
    """Three comma-separated numbers, e.g. ``0.485,0.456,0.406``; ``ValueError`` names ``what``."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        raise ValueError(f"{what} must be 3 comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise ValueError(f"{what} must be 3 comma-separated numbers (R,G,B), got {text!r}")
    return values  # type: ignore[return-value]


def path_mode_to_proto(mode: PathMode | None) -> int:
    if mode is None:
        return explain_pb2.PATH_MODE_UNSPECIFIED
    if mode not in _PATH_MODE_PROTO:
        raise ValueError(f"path_mode must be one of {', '.join(PATH_MODES)}, got {mode!r}")
    return _PATH_MODE_PROTO[mode]


def path_mode_from_proto(mode: int) -> PathMode:
    """Unspecified means adaptive, as the contract says."""
    return "fixed" if mode == explain_pb2.PATH_MODE_FIXED else "adaptive"


def read_class_labels(path: Path) -> tuple[str, ...]:
    """Class names from a file: a JSON list of strings, or one name per line. ValueError
    saying what is wrong with the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read class labels from {str(path)!r}: {error}") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"class labels {str(path)!r} are not a JSON list: {error}") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class labels {str(path)!r} must be a non-empty list of non-empty names")
    return tuple(names)
