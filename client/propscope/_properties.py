"""The properties to intervene on, their regions, and the text syntax the CLI, the review spec
and the Node client share.

The syntax (``propscope explain --help`` shows it with examples)::

    NAME=EDITOR[@VERSION][:key=value,key=value...][;REGION]
    NAME=@FOLDER            a provided path: FOLDER's images in natural order are x_1..x_N
    REGION: mask=FILE | box=LEFT,TOP,RIGHT,BOTTOM | box_px=LEFT,TOP,RIGHT,BOTTOM

``split_property`` reads the text without touching any file (what the parity test with the
Node client compares); ``parse_property`` also reads the mask and folder files it names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from propscope._images import encode_image, encode_mask, folder_images
from propscope.v1 import explain_pb2

__all__ = [
    "PROPERTY_SYNTAX",
    "Box",
    "Mask",
    "Property",
    "PropertyText",
    "Region",
    "parse_property",
    "region_from",
    "split_property",
]

PROPERTY_SYNTAX = "NAME=EDITOR[@VERSION][:key=value,...][;REGION] or NAME=@FOLDER"
REGION_SYNTAX = (
    "mask=FILE (or mask=@FILE), box=LEFT,TOP,RIGHT,BOTTOM (fractions 0-1) or box_px=... (pixels)"
)

# A comma only separates parameters when the next item looks like ``key=``, so values such as
# prompts may contain commas ("prompt=a red car, at night,steps=4" has two parameters).
_PARAMETER_SEPARATOR = re.compile(r",(?=\s*[A-Za-z_][\w.\-]*\s*=)")
# A semicolon starts the region only when a region key follows, so values may hold ';' too.
_REGION_SEPARATOR = re.compile(r";(?=\s*(?:mask|box|box_px)\s*=)")
_REGION_KEYS = ("mask", "box", "box_px")
# Plain decimal numbers only (no "nan", "inf", "0x10", "1_000"), as the Node client reads them.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass(frozen=True)
class Box:
    """A rectangle [left, right) x [top, bottom): fractions of the image's width and height in
    [0, 1], or pixels when ``pixels`` is set."""

    left: float
    top: float
    right: float
    bottom: float
    pixels: bool = False

    def __post_init__(self) -> None:
        values = (self.left, self.top, self.right, self.bottom)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise ValueError(f"box {values}: LEFT,TOP,RIGHT,BOTTOM must be finite numbers")
        if min(values) < 0 or (not self.pixels and max(values) > 1):
            unit = "pixels >= 0" if self.pixels else "fractions in [0, 1] (box_px for pixels)"
            raise ValueError(f"box {values}: the values must be {unit}")
        if self.left >= self.right or self.top >= self.bottom:
            raise ValueError(f"box {values}: needs LEFT < RIGHT and TOP < BOTTOM")

    def to_proto(self) -> explain_pb2.Region:
        return explain_pb2.Region(
            box=explain_pb2.Box(
                left=self.left,
                top=self.top,
                right=self.right,
                bottom=self.bottom,
                pixels=self.pixels,
            )
        )


@dataclass(frozen=True)
class Mask:
    """A mask image: any size (scaled to the request's image), its alpha channel when it has
    one, else its grey level; 0 keeps the original, 255 takes the edit. ``image`` is anything
    ``encode_mask`` takes (bytes, a path, a uint8/bool HxW array, a PIL image) and is kept as
    the PNG/JPEG bytes sent."""

    image: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", encode_mask(self.image))

    def to_proto(self) -> explain_pb2.Region:
        return explain_pb2.Region(mask=self.image)


Region = Mask | Box
"""Where an editor's edit may change pixels."""


def region_from(value: Region | Mapping[str, Any] | None) -> Region | None:
    """A ``Region`` from a ``Mask``, a ``Box`` or one of the mappings ``{"mask": IMAGE}``,
    ``{"box": [l, t, r, b]}`` (fractions), ``{"box_px": [l, t, r, b]}`` (pixels)."""
    if value is None or isinstance(value, Mask | Box):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"region must be a Mask, a Box or a mapping, not {type(value).__name__}")
    if len(value) != 1 or next(iter(value)) not in _REGION_KEYS:
        raise ValueError(f"region must have exactly one of the keys {_REGION_KEYS}, got {value!r}")
    ((key, shape),) = value.items()
    if key == "mask":
        return Mask(shape)
    if isinstance(shape, str) or not isinstance(shape, Sequence) or len(shape) != 4:
        raise ValueError(f"region {key} must be 4 numbers LEFT,TOP,RIGHT,BOTTOM, got {shape!r}")
    return Box(*shape, pixels=key == "box_px")


@dataclass(frozen=True)
class Property:
    """One semantic property to intervene on.

    Exactly one of ``editor`` (the Triton model name of an editor, which builds the path from the
    request's image) or ``provided_path`` (the caller's own path x_1..x_N as encoded PNG/JPEG
    images, weakest to strongest) must be given. ``parameters``, ``editor_version`` and
    ``region`` (a ``Mask``, a ``Box`` or a mapping ``region_from`` takes: where the edit may
    change pixels) only apply to editors.
    """

    name: str
    editor: str | None = None
    parameters: Mapping[str, str] = field(default_factory=dict, hash=False)
    editor_version: str = ""
    provided_path: Sequence[bytes] | None = None
    region: Region | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("property name must be a non-empty string")
        if (self.editor is None) == (self.provided_path is None):
            raise ValueError(f"property {self.name!r}: give exactly one of editor or provided_path")
        if self.editor is not None:
            if not isinstance(self.editor, str) or not self.editor:
                raise ValueError(f"property {self.name!r}: editor must be a non-empty string")
            for key, value in self.parameters.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError(
                        f"property {self.name!r}: editor parameters must map str to str, "
                        f"got {key!r}: {value!r}"
                    )
            try:
                object.__setattr__(self, "region", region_from(self.region))
            except (ValueError, TypeError) as error:
                raise type(error)(f"property {self.name!r}: {error}") from None
        else:
            if self.parameters or self.editor_version or self.region is not None:
                raise ValueError(
                    f"property {self.name!r}: parameters, editor_version and region only apply "
                    "to editors"
                )
            images = tuple(self.provided_path or ())
            if not images:
                raise ValueError(f"property {self.name!r}: provided_path must not be empty")
            if not all(isinstance(image, bytes | bytearray | memoryview) for image in images):
                raise TypeError(
                    f"property {self.name!r}: provided_path must hold encoded images (bytes)"
                )
            object.__setattr__(self, "provided_path", tuple(bytes(image) for image in images))
        # A read-only copy keeps the frozen dataclass honest.
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))

    def to_proto(self) -> explain_pb2.Property:
        """The ``propscope.v1.Property`` message for this property."""
        if self.provided_path is not None:
            return explain_pb2.Property(
                name=self.name,
                provided_path=explain_pb2.ProvidedPath(images=list(self.provided_path)),
            )
        return explain_pb2.Property(
            name=self.name,
            editor=explain_pb2.EditorIntervention(
                model=self.editor or "",
                version=self.editor_version,
                parameters=dict(self.parameters),
            ),
            region=self.region.to_proto() if self.region is not None else None,
        )

    @classmethod
    def from_folder(cls, name: str, folder: str | Path) -> Property:
        """A provided path from a folder's images (``folder_images``: natural order, other
        formats converted to PNG); ``ValueError`` names the folder or file that cannot be used."""
        images = []
        for file in folder_images(folder):
            try:
                images.append(encode_image(file))
            except OSError as error:
                raise ValueError(f"cannot read {str(file)!r}: {error.strerror or error}") from None
            except ValueError as error:
                raise ValueError(f"cannot use {str(file)!r}: {error}") from None
        return cls(name=name, provided_path=images)


@dataclass(frozen=True)
class PropertyText:
    """What a property's text says, before any file is read: an editor with its parameters and
    region, or a provided path's folder. ``region`` is ``{"mask": FILE}``, ``{"box": [4]}`` or
    ``{"box_px": [4]}``."""

    name: str
    editor: str | None = None
    version: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)
    region: Mapping[str, Any] | None = None
    folder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The form the parity cases (client/node/test/property-syntax-cases.json) spell."""
        return {
            "name": self.name,
            "editor": self.editor,
            "version": self.version,
            "parameters": dict(self.parameters),
            "region": dict(self.region) if self.region is not None else None,
            "folder": self.folder,
        }


def split_property(text: str) -> PropertyText:
    """Reads a property's text (module docstring) without opening any file.

    Names, editors, keys and region values are stripped of surrounding blanks; parameter values
    are kept as written and may contain ``=``, ``:``, ``;`` and commas that are not followed by
    ``key=`` (or, for ``;``, by a region key). Raises ``ValueError`` naming the problem.
    """
    if not isinstance(text, str):
        raise TypeError(f"property spec must be a str, got {type(text).__name__}")
    name, sep, rest = text.partition("=")
    name = name.strip()

    def invalid(why: str) -> ValueError:
        return ValueError(f"invalid property {text!r}: {why}")

    if not sep:
        raise invalid(f"missing '=' (expected {PROPERTY_SYNTAX})")
    if not name:
        raise invalid(f"empty name (expected {PROPERTY_SYNTAX})")
    source, *regions = _REGION_SEPARATOR.split(rest)
    if len(regions) > 1:
        raise invalid("give at most one region (mask, box or box_px)")
    region = _split_region(regions[0], invalid) if regions else None
    if source.strip().startswith("@"):
        folder = source.strip()[1:].strip()
        if not folder:
            raise invalid("empty folder after '@' (expected NAME=@FOLDER)")
        if region is not None:
            raise invalid("a region applies to editors only, not to a provided path")
        return PropertyText(name=name, folder=folder)
    editor_part, colon, parameters_part = source.partition(":")
    editor, at, version = editor_part.strip().partition("@")
    editor, version = editor.strip(), version.strip()
    if not editor:
        raise invalid(f"empty editor (expected {PROPERTY_SYNTAX})")
    if at and not version:
        raise invalid("empty editor version after '@'")
    parameters = _split_parameters(parameters_part, invalid) if colon else {}
    return PropertyText(
        name=name, editor=editor, version=version, parameters=parameters, region=region
    )


def parse_property(text: str, *, base: str | Path | None = None) -> Property:
    """The ``Property`` a text says (``split_property``), with its mask file or provided-path
    folder read; relative file names are relative to ``base`` (default: the working folder).

    Example: ``object_hue=procedural:operation=hue,region=object;box=0.1,0.1,0.9,0.9``. Raises
    ``ValueError`` naming the problem when the text is malformed or a file cannot be used.
    """
    spec = split_property(text)
    root = Path(base) if base is not None else Path()
    if spec.folder is not None:
        try:
            return Property.from_folder(spec.name, root / spec.folder)
        except ValueError as error:
            raise ValueError(f"property {spec.name!r}: {error}") from None
    region: Region | None = None
    if spec.region is not None and "mask" in spec.region:
        mask_file = root / spec.region["mask"]
        try:
            region = Mask(mask_file.read_bytes())
        except OSError as error:
            raise ValueError(
                f"property {spec.name!r}: cannot read mask {str(mask_file)!r}: "
                f"{error.strerror or error}"
            ) from None
        except ValueError as error:
            raise ValueError(f"property {spec.name!r}: mask {str(mask_file)!r}: {error}") from None
    elif spec.region is not None:
        region = region_from(spec.region)
    return Property(
        name=spec.name,
        editor=spec.editor,
        parameters=spec.parameters,
        editor_version=spec.version,
        region=region,
    )


def _split_region(text: str, invalid: Any) -> dict[str, Any]:
    key, _, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not value:
        raise invalid(f"empty {key} (expected {REGION_SYNTAX})")
    if key == "mask":
        # mask=@FILE reads as mask=FILE: '@' marks files elsewhere in the syntax.
        file = value[1:].strip() if value.startswith("@") else value
        if not file:
            raise invalid(f"empty mask (expected {REGION_SYNTAX})")
        return {"mask": file}
    parts = [part.strip() for part in value.split(",")]
    if len(parts) != 4 or not all(_NUMBER.fullmatch(part) for part in parts):
        raise invalid(f"{key}={value} must be 4 numbers LEFT,TOP,RIGHT,BOTTOM")
    numbers = [float(part) for part in parts]
    try:
        Box(*numbers, pixels=key == "box_px")
    except ValueError as error:
        raise invalid(str(error)) from None
    return {key: numbers}


def _split_parameters(parameters_part: str, invalid: Any) -> dict[str, str]:
    if not parameters_part.strip():
        raise invalid("no parameters after ':'")
    if parameters_part.rstrip().endswith(",") or re.search(r",\s*,", parameters_part):
        raise invalid("empty parameter between commas")
    parameters: dict[str, str] = {}
    for item in _PARAMETER_SEPARATOR.split(parameters_part):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise invalid(f"parameter {item.strip()!r} is not key=value")
        if key in parameters:
            raise invalid(f"parameter {key!r} given twice")
        parameters[key] = value
    return parameters
