"""The properties to intervene on, and the CLI's text syntax for them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from propscope.v1 import explain_pb2

__all__ = ["Property", "parse_property"]

PROPERTY_SYNTAX = "NAME=EDITOR[@VERSION][:key=value,key=value...]"

# A comma only separates parameters when the next item looks like ``key=``, so values such as
# prompts may contain commas ("prompt=a red car, at night,steps=4" has two parameters).
_PARAMETER_SEPARATOR = re.compile(r",(?=\s*[A-Za-z_][\w.\-]*\s*=)")


@dataclass(frozen=True)
class Property:
    """One semantic property to intervene on.

    Exactly one of ``editor`` (the Triton model name of an editor, which builds the path from the
    request's image) or ``provided_path`` (the caller's own path x_1..x_N as encoded PNG/JPEG
    images, weakest to strongest) must be given. ``parameters`` and ``editor_version`` only apply
    to editors.
    """

    name: str
    editor: str | None = None
    parameters: Mapping[str, str] = field(default_factory=dict, hash=False)
    editor_version: str = ""
    provided_path: Sequence[bytes] | None = None

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
        else:
            if self.parameters or self.editor_version:
                raise ValueError(
                    f"property {self.name!r}: parameters and editor_version only apply to editors"
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
        )


def parse_property(text: str) -> Property:
    """Parses ``NAME=EDITOR[@VERSION][:key=value,key=value...]`` into an editor ``Property``.

    Example: ``object_hue=procedural:operation=hue,region=object,degrees=180``. Names, editors and
    keys are stripped of surrounding blanks; values are kept as written and may contain ``=``,
    ``:`` and commas that are not followed by ``key=``. Raises ``ValueError`` with a message that
    names the problem when the text is malformed.
    """
    if not isinstance(text, str):
        raise TypeError(f"property spec must be a str, got {type(text).__name__}")
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep:
        raise ValueError(f"invalid property {text!r}: missing '=' (expected {PROPERTY_SYNTAX})")
    if not name:
        raise ValueError(f"invalid property {text!r}: empty name (expected {PROPERTY_SYNTAX})")
    editor_part, colon, parameters_part = rest.partition(":")
    editor, at, version = editor_part.strip().partition("@")
    editor, version = editor.strip(), version.strip()
    if not editor:
        raise ValueError(f"invalid property {text!r}: empty editor (expected {PROPERTY_SYNTAX})")
    if at and not version:
        raise ValueError(f"invalid property {text!r}: empty editor version after '@'")
    parameters = _parse_parameters(text, parameters_part) if colon else {}
    return Property(name=name, editor=editor, parameters=parameters, editor_version=version)


def _parse_parameters(text: str, parameters_part: str) -> dict[str, str]:
    if not parameters_part.strip():
        raise ValueError(f"invalid property {text!r}: no parameters after ':'")
    if parameters_part.rstrip().endswith(",") or re.search(r",\s*,", parameters_part):
        raise ValueError(f"invalid property {text!r}: empty parameter between commas")
    parameters: dict[str, str] = {}
    for item in _PARAMETER_SEPARATOR.split(parameters_part):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"invalid property {text!r}: parameter {item.strip()!r} is not key=value"
            )
        if key in parameters:
            raise ValueError(f"invalid property {text!r}: parameter {key!r} given twice")
        parameters[key] = value
    return parameters
