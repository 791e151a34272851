"""A review spec's problems in the spec's own words: pydantic's errors as lines that name
their place as the spec writes it (``rules[1].max``), without pydantic's wording."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any

from propscope._preflight import did_you_mean

__all__ = ["describe", "loc_of", "position", "place_of", "spec_loc"]


def describe(
    item: Mapping[str, Any],
    raw: Any,
    allowed_keys: Mapping[int, list[str]],
    rule_names: Sequence[str],
) -> str:
    """One of pydantic's errors as a line that names its place in the spec, in the spec's words."""
    loc = spec_loc(item["loc"])
    where = place_of(loc)
    kind, context, given = item["type"], item.get("ctx") or {}, item.get("input")
    if item["loc"][-1] == "[key]":
        # A key YAML read as a number or a boolean (`1: procedural`): pydantic names it as an
        # index (properties[1]).
        mapping = place_of(loc[:-1])
        what = "the property name" if loc[:-1] == ("properties",) else "the key"
        return f"{mapping}: {what} {given!r} must be text (quote it in YAML)"
    if kind == "extra_forbidden":
        allowed = allowed_keys.get(id(_at(raw, loc[:-1])), [])
        return (
            f"{where}: unknown key{did_you_mean(str(loc[-1]), allowed)}; allowed keys: "
            f"{', '.join(allowed)}"
        )
    if kind == "union_tag_invalid":
        tag = str(context["tag"])
        return (
            f"{where}.rule: unknown rule {tag!r}{did_you_mean(tag, rule_names)}; rules: "
            f"{', '.join(rule_names)}"
        )
    if kind == "union_tag_not_found":
        return f"{where}: missing key 'rule' (one of {', '.join(rule_names)})"
    if kind == "missing":
        return f"{where}: missing (required)"
    if kind in ("value_error", "assertion_error"):
        return f"{where}: {context['error']}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(context["expected"]))
        return (
            f"{where}: {given!r} is not one of {', '.join(choices)}"
            f"{did_you_mean(str(given), choices)}"
        )
    if kind == "model_type":
        return f"{where}: should be a mapping of keys, got {given!r}"
    message = str(item["msg"])
    if message.startswith("Input should be "):
        message = "should be " + message.removeprefix("Input should be ")
        if isinstance(given, str | int | float | bool) or given is None:
            message += f", got {given!r}"
    return f"{where}: {message}"


def spec_loc(loc: Sequence[str | int]) -> tuple[str | int, ...]:
    """Pydantic's place of an error as a path of the spec's keys and indexes."""
    if len(loc) > 2 and loc[0] in ("rules", "properties"):
        # Their items are tagged unions: pydantic names the tag (the rule's name, the
        # property's form) after the item's index or key; the spec has no such key.
        return (*loc[:2], *loc[3:])
    return tuple(loc)


def position(raw: Any, loc: Sequence[str | int]) -> tuple[int, ...]:
    """Where ``loc`` is in the file, to list the problems in the file's order (a missing key
    after the keys given)."""
    found = []
    for part in loc:
        keys = (
            list(raw) if isinstance(raw, dict) else range(len(raw)) if isinstance(raw, list) else []
        )
        found.append(keys.index(part) if part in keys else len(keys))
        raw = _at(raw, (part,))
    return tuple(found)


def place_of(loc: Sequence[str | int]) -> str:
    """A place in the spec as it is written: ``rules[1].properties``, ``properties.hue``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text and not part.isidentifier():
            text += f"[{part!r}]"
        else:
            text += f".{part}" if text else part
    return text or "spec"


# A place's parts after its first key, as place_of writes them: .key, [index], ['key'].
_PLACE_PART = re.compile(r"""\.([^\W\d]\w*)|\[(\d+)\]|\[('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\]""")


def loc_of(problem: str) -> tuple[str | int, ...]:
    """The place a problem line starts with, as a path (place_of's inverse): to list the
    problems of the fields, of the files and across sections together in the file's order."""
    first = re.match(r"[^.\[:]+", problem)
    if first is None:
        return ()
    loc: list[str | int] = [first.group()]
    end = first.end()
    while part := _PLACE_PART.match(problem, end):
        key, index, quoted = part.groups()
        loc.append(key if key is not None else int(index) if index else ast.literal_eval(quoted))
        end = part.end()
    return tuple(loc)


def _at(raw: Any, loc: Sequence[str | int]) -> Any:
    """The part of the spec at ``loc``; None when there is none."""
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw
