"""The contract every editor model honours, shared by the gateway and the editors.

An editor is a Triton model that takes one image and returns the whole path of
edited images in one call:

    IMAGE       UINT8 [H, W, 3]
    STRENGTHS   FP32  [N]      edit strength of each image of the path, in [0, 1]
    PARAMETERS  BYTES [1]      JSON object of string parameters
    SEED        INT64 [S]      one seed per sample: S paths in one call
    ->  PATH    UINT8 [S, N, H, W, 3]

An editor with dynamic batching (max_batch_size > 0) takes each of these with a
leading batch dimension of 1: one path request per Triton request.

A decoupled editor (`model_transaction_policy { decoupled: true }`) reports its
progress while it works: before the final response, which carries PATH, it may
send responses that carry only

    PROGRESS    INT64 [2]      (units of its work done, units in all)

where a unit is the editor's own (a denoising step, a seed). The last unit is
sending PATH, so a progress response never says all is done. The gateway turns
these into Progress events. PROGRESS is optional: the gateway asks for it only when
the model declares it among its outputs (Triton refuses an undeclared one); an editor
that does not, or is not decoupled, answers once (its property's bar goes from the
cached share to done).

The model's config.pbtxt declares its parameters (parameter "propscope.parameters",
a JSON list of {name, description, type, default, choices}); the gateway checks a
request against it before any work, and the editor applies the same check.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

ROLE_PARAMETER = "propscope.role"
SCHEMA_PARAMETER = "propscope.parameters"
IMAGE_INPUT = "IMAGE"
STRENGTHS_INPUT = "STRENGTHS"
PARAMETERS_INPUT = "PARAMETERS"
SEED_INPUT = "SEED"
PATH_OUTPUT = "PATH"
PROGRESS_OUTPUT = "PROGRESS"


class InvalidParameters(ValueError):
    """A request's editor parameters do not match the editor's declaration. `parameter`
    names the one to change, so that the gateway can name its field."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class EditCancelled(Exception):
    """The caller gave up; raised by a checkpoint so that an editor stops working."""


# Called by an editor between units of work (denoising steps): raises
# EditCancelled once the request is cancelled.
Checkpoint = Callable[[], None]
# Called by an editor as its work advances: (units done, units in all), done < all.
ReportProgress = Callable[[int, int], None]
# An editor that makes one path for one seed: (image, strengths, parameters, seed) -> [N, H, W, 3]
SinglePathEditor = Callable[[np.ndarray, np.ndarray, Mapping[str, str], int], np.ndarray]


def never_cancelled() -> None:
    """The checkpoint of an edit nobody can cancel."""


def unreported(done: int, total: int) -> None:
    """The progress report of an edit nobody follows."""


@dataclass(frozen=True)
class EditRequest:
    """One request of the editor contract, decoded."""

    image: np.ndarray  # uint8 [H, W, 3]
    strengths: np.ndarray  # float32 [N]
    parameters: Mapping[str, str]  # resolved against the editor's schema
    seeds: list[int]  # [S]
    checkpoint: Checkpoint = never_cancelled
    progress: ReportProgress = unreported


class PathEditor(Protocol):
    def edit_many(self, requests: list[EditRequest]) -> list[np.ndarray | Exception]:
        """Each request's paths [S, N, H, W, 3] uint8, or the exception that failed it;
        requests handed over together may be computed together."""


@dataclass(frozen=True)
class ModelContext:
    """What an editor is built from inside Triton: its config.pbtxt parameters,
    its folder in the model repository and the device of its instance."""

    parameters: Mapping[str, str]
    model_dir: Path
    device: str  # "cpu" or "cuda:N"


@dataclass(frozen=True)
class SeedBySeed:
    """A PathEditor from an editor cheap enough to run one seed at a time; a seed is
    its unit of progress."""

    edit_path: SinglePathEditor

    def edit_many(self, requests: list[EditRequest]) -> list[np.ndarray | Exception]:
        return [self._edit(request) for request in requests]

    def _edit(self, request: EditRequest) -> np.ndarray | Exception:
        paths = []
        try:
            for done, seed in enumerate(request.seeds):
                if done:
                    request.progress(done, len(request.seeds))
                request.checkpoint()
                paths.append(
                    self.edit_path(request.image, request.strengths, request.parameters, seed)
                )
        except (EditCancelled, InvalidParameters, ValueError) as error:
            return error
        return np.stack(paths)


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    type: str  # "string", "float", "int" or "choice"
    description: str = ""
    default: str | None = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class EditorSchema:
    parameters: tuple[ParameterSpec, ...] = field(default_factory=tuple)

    @classmethod
    def from_json(cls, text: str) -> EditorSchema:
        return cls(
            tuple(
                ParameterSpec(
                    name=item["name"],
                    type=item.get("type", "string"),
                    description=item.get("description", ""),
                    default=item.get("default"),
                    choices=tuple(item.get("choices", ())),
                    minimum=item.get("minimum"),
                    maximum=item.get("maximum"),
                )
                for item in json.loads(text)
            )
        )

    def resolve(self, given: Mapping[str, str]) -> dict[str, str]:
        """Check `given` and fill in defaults; the result is what the editor runs with
        and what the cache key is made of."""
        known = {spec.name: spec for spec in self.parameters}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise InvalidParameters(
                f"unknown parameter(s) {', '.join(_with_guess(n, known) for n in unknown)}; "
                f"this editor accepts: {', '.join(sorted(known)) or 'none'}",
                parameter=unknown[0],
            )
        resolved: dict[str, str] = {}
        for spec in self.parameters:
            value = given.get(spec.name, spec.default)
            if value is None:
                raise InvalidParameters(f"parameter {spec.name!r} is required", spec.name)
            _check_value(spec, value)
            resolved[spec.name] = value
        return resolved


def closest(value: str, candidates: Iterable[str]) -> str | None:
    """The one of `candidates` close enough to `value` to be what a typo meant, if any."""
    close = difflib.get_close_matches(value, list(candidates), n=1)
    return close[0] if close else None


def _with_guess(value: str, candidates: Iterable[str]) -> str:
    """`value` quoted, with the closest of `candidates` when one is close: a typo's fix."""
    close = closest(value, candidates)
    return f"{value!r} (did you mean {close!r}?)" if close else repr(value)


def _check_value(spec: ParameterSpec, value: str) -> None:
    if value == "" and spec.default == "":
        return  # optional, left to the editor's own default
    if spec.type == "choice" and value not in spec.choices:
        raise InvalidParameters(
            f"parameter {spec.name!r} must be one of {', '.join(spec.choices)}; "
            f"got {_with_guess(value, spec.choices)}",
            spec.name,
        )
    if spec.type in ("float", "int"):
        try:
            number = float(value) if spec.type == "float" else int(value)
        except ValueError:
            raise InvalidParameters(
                f"parameter {spec.name!r} must be a{'n integer' if spec.type == 'int' else ' number'}"
                f"; got {value!r}",
                spec.name,
            ) from None
        if not math.isfinite(number):
            raise InvalidParameters(
                f"parameter {spec.name!r} must be finite; got {value!r}", spec.name
            )
        if spec.minimum is not None and number < spec.minimum:
            raise InvalidParameters(
                f"parameter {spec.name!r} must be >= {spec.minimum}; got {value}", spec.name
            )
        if spec.maximum is not None and number > spec.maximum:
            raise InvalidParameters(
                f"parameter {spec.name!r} must be <= {spec.maximum}; got {value}", spec.name
            )


def canonical_parameters(parameters: Mapping[str, str]) -> str:
    """One spelling per parameter set, for PARAMETERS and for cache keys."""
    return json.dumps(dict(sorted(parameters.items())), separators=(",", ":"))
