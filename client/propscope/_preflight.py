"""The checks a request can pass before any work starts: every classifier, editor, editor
parameter and setting resolved against what ``ListModels`` says the service serves.

A typo in the second ``--model`` or in an editor parameter would otherwise be found only when
that call reaches the server, after the first model's whole run. ``preflight`` collects every
problem and raises one ``PreflightError`` listing them all, each with its closest served
spelling. The limits a server may configure (the upper bounds of steps, samples and
permutations) are left to the server: only what the API itself fixes is checked here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from propscope._client import Client, _models
from propscope._events import ModelInfo
from propscope._properties import Property
from propscope.v1 import explain_pb2

__all__ = ["Classifier", "PreflightError", "did_you_mean", "preflight", "problems_message"]

# The API's defaults (explain.proto), used when a setting is 0 ("the server's default"): a
# copy of the server's (api/convert.py, which the client cannot import);
# tests/unit/test_client_preflight.py keeps the two the same.
DEFAULT_STEPS = 10
DEFAULT_PERMUTATIONS = 10_000
DEFAULT_ALPHA = 0.01
EXPLAIN_METHOD = "propgrad"
INTERACTIONS_METHOD = "interactions"
# What a model needs to offer a method that not every classifier can run.
_METHOD_NEEDS = {
    "eva": "eva needs an open model that declares the bounds capability (docs/eva.md)",
}


class PreflightError(ValueError):
    """The request cannot run; ``problems`` holds one sentence per problem found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__(problems_message(self.problems))


def problems_message(problems: Sequence[str], place: str = "") -> str:
    """``[PLACE: ]N problems found before any work started:`` and then each problem on a line
    of its own (its blanks and line breaks made single spaces)."""
    heading = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    prefix = f"{place}: " if place else ""
    lines = "\n".join(f"  - {' '.join(problem.split())}" for problem in problems)
    return f"{prefix}{heading} found before any work started:\n{lines}"


@dataclass(frozen=True)
class Classifier:
    """A classifier a request names, with the explanation methods it will be asked for and
    its role in the messages (e.g. "candidate")."""

    name: str
    version: str = ""
    methods: tuple[str, ...] = (EXPLAIN_METHOD,)
    role: str = ""

    @classmethod
    def parse(cls, text: str) -> Classifier:
        """``NAME`` or ``NAME:VERSION``."""
        name, _, version = text.partition(":")
        return cls(name.strip(), version.strip())

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name


Served = Client | Iterable[ModelInfo] | explain_pb2.ListModelsResponse
ClassifierLike = str | Classifier


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a known word is close to ``word`` (case aside), else
    ``""``."""
    by_lower = {name.lower(): name for name in known}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def preflight(
    served: Served,
    *,
    classifiers: Iterable[ClassifierLike] = (),
    properties: Iterable[Property] = (),
    steps: int = 0,
    samples: int = 0,
    permutations: int = 0,
    alpha: float = 0.0,
    max_steps: int = 0,
    path_mode: Literal["adaptive", "fixed"] = "adaptive",
) -> dict[str, ModelInfo]:
    """Checks every classifier (``NAME[:VERSION]`` or a ``Classifier``), every editor property
    and the settings (0 means the server's default, as in the API) against ``served``: a
    ``Client`` (asked once), the models its ``list_models()`` returned or a
    ``ListModelsResponse``. Returns the served models by name; raises ``PreflightError``
    listing every problem (and ``PropscopeError`` when the service cannot be asked)."""
    models = _served_models(served)
    problems: list[str] = []
    for item in classifiers:
        classifier = Classifier.parse(item) if isinstance(item, str) else item
        problems += _classifier_problems(classifier, models)
    properties = list(properties)
    for prop in properties:
        if prop.editor is not None:
            problems += _editor_problems(prop, models)
    problems += _setting_problems(properties, steps, samples, permutations, alpha)
    problems += _path_problems(properties, steps, samples, max_steps, path_mode)
    if problems:
        raise PreflightError(problems)
    return models


def _served_models(served: Served) -> dict[str, ModelInfo]:
    if isinstance(served, Client):
        served = served.list_models()
    if isinstance(served, explain_pb2.ListModelsResponse):
        served = _models(served)
    return {info.name: info for info in served}


def _model_problems(
    name: str, version: str, what: str, want_classifier: bool, models: Mapping[str, ModelInfo]
) -> list[str]:
    """Whether ``name`` is served, of the right kind, READY and has ``version``."""
    kind = "classifier" if want_classifier else "editor"
    same_kind = sorted(n for n, i in models.items() if i.is_classifier == want_classifier)
    info = models.get(name)
    if info is None:
        return [
            f"{what} {name!r} is not served{did_you_mean(name, same_kind)}; served {kind}s: "
            f"{', '.join(same_kind) or 'none'}"
        ]
    if info.state != "READY" and info.loads_on_demand:
        # Listed unloaded (undescribed, of no known kind) until its first request: the call
        # loads it or says why it cannot.
        return []
    if info.is_classifier != want_classifier:
        actual = "a classifier" if info.is_classifier else "an editor"
        return [
            f"{what} {name!r} is {actual}, not {'a' if want_classifier else 'an'} {kind}; "
            f"served {kind}s: {', '.join(same_kind) or 'none'}"
        ]
    if info.state != "READY":
        reason = f": {info.state_reason}" if info.state_reason else ""
        return [f"{what} {name!r} is {info.state or 'not loaded'}{reason}"]
    if version and version not in info.versions:
        return [
            f"{what} {name!r} has no version {version!r}; versions: "
            f"{', '.join(info.versions) or 'none'}"
        ]
    return []


def _classifier_problems(classifier: Classifier, models: Mapping[str, ModelInfo]) -> list[str]:
    what = f"{classifier.role} model" if classifier.role else "model"
    problems = _model_problems(classifier.name, classifier.version, what, True, models)
    if problems:
        return problems
    offered = models[classifier.name].methods
    # A gateway that lists no methods predates them: the call itself will say.
    missing = [m for m in classifier.methods if offered and m not in offered]
    if missing:
        needs = "".join(f"; {_METHOD_NEEDS[m]}" for m in missing if m in _METHOD_NEEDS)
        return [
            f"{what} {classifier.name!r} cannot run {', '.join(missing)}; its methods: "
            f"{', '.join(offered)}{needs}"
        ]
    return []


def _editor_problems(prop: Property, models: Mapping[str, ModelInfo]) -> list[str]:
    editor = prop.editor or ""
    what = f"property {prop.name!r}: editor"
    problems = _model_problems(editor, prop.editor_version, what, False, models)
    if problems:
        return problems
    if models[editor].state != "READY":  # loaded on demand: its parameters are unknown yet
        return []
    accepted = {p.name: p for p in models[editor].editor_parameters}
    for key, value in prop.parameters.items():
        spec = accepted.get(key)
        if spec is None:
            problems.append(
                f"property {prop.name!r}: editor {editor!r} has no parameter {key!r}"
                f"{did_you_mean(key, accepted)}; it accepts: {', '.join(accepted) or 'none'}"
            )
        elif spec.choices and value not in spec.choices and value != "":
            problems.append(
                f"property {prop.name!r}: parameter {key!r} of {editor!r} is {value!r}"
                f"{did_you_mean(value, spec.choices)}; one of: {', '.join(spec.choices)}"
            )
    return problems


def _setting_problems(
    properties: Sequence[Property], steps: int, samples: int, permutations: int, alpha: float
) -> list[str]:
    """The ranges the API fixes, and whether the permutation test can reach alpha at all."""
    problems = []
    if steps < 0 or steps == 1:
        problems.append(
            f"steps must be 0 (the default, {DEFAULT_STEPS}) or at least 2; got {steps}"
        )
    if samples < 0:
        problems.append(f"samples must be 0 (the default, 1) or more; got {samples}")
    if permutations < 0:
        problems.append(f"permutations must be 0 (the default) or more; got {permutations}")
    if not (alpha == 0 or 0 < alpha <= 0.5):
        problems.append(
            f"alpha must be in (0, 0.5] (0 for the default {DEFAULT_ALPHA}); got {alpha}"
        )
        return problems
    resolved_alpha = alpha or DEFAULT_ALPHA
    resolved_permutations = permutations or DEFAULT_PERMUTATIONS
    if permutations >= 0 and 1 / (resolved_permutations + 1) >= resolved_alpha:
        problems.append(
            f"with {resolved_permutations} permutations the smallest p-value is "
            f"{1 / (resolved_permutations + 1):.3g}, not below alpha {resolved_alpha:g}: no "
            "property could be significant; raise permutations"
        )
    paths = {
        f"property {p.name!r}: the provided path": len(p.provided_path or ())
        for p in properties
        if p.provided_path is not None
    }
    if any(p.editor is not None for p in properties) and (steps == 0 or steps >= 2):
        paths["steps"] = steps or DEFAULT_STEPS
    for what, edited in paths.items():
        problems += _reachable(what, edited + 1, resolved_alpha)
    return problems


def _path_problems(
    properties: Sequence[Property], steps: int, samples: int, max_steps: int, path_mode: str
) -> list[str]:
    problems = []
    if max_steps < 0:
        problems.append(f"max_steps must be 0 (the server's) or more; got {max_steps}")
    elif path_mode == "fixed" and max_steps not in (0, steps or DEFAULT_STEPS):
        problems.append(
            f"max_steps applies to adaptive paths; a fixed path has exactly steps "
            f"({steps or DEFAULT_STEPS}) images: leave max_steps 0 or use path_mode adaptive; "
            f"got {max_steps}"
        )
    elif max_steps and max_steps < (steps or DEFAULT_STEPS):
        problems.append(
            f"max_steps ({max_steps}) must be at least steps ({steps or DEFAULT_STEPS})"
        )
    provided = [p.name for p in properties if p.provided_path is not None]
    if provided and samples > 1:
        problems.append(
            f"samples must be 1 with provided paths (they are one path each: "
            f"{', '.join(map(repr, provided))}); got {samples}"
        )
    return problems


def _reachable(what: str, points: int, alpha: float) -> list[str]:
    """Reversing a path keeps its score, so the smallest p-value of a path of ``points`` images
    is about 2 / points! (a copy of the server's check_reachable, kept the same by
    tests/unit/test_client_preflight.py; beyond 20 points it is always reachable)."""
    if points >= 20 or 2 / math.factorial(points) < alpha:
        return []
    needed = next(n for n in range(points, 64) if 2 / math.factorial(n) < alpha)
    return [
        f"{what}: a path of {points} images can never be significant at alpha {alpha:g} "
        f"(smallest p-value {2 / math.factorial(points):.3g}); use at least {needed} images"
    ]
