"""The contract every explanation method implements, and what a method may need of a
model (capabilities). Methods differ in what they compute; the runner
(orchestration/runner.py) gives them all the same deadlines, cancellation, progress,
metrics and logs, and the API layer the same admission and error mapping."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from propscope_server.errors import FailedPrecondition
from propscope_server.inference import ModelDescription
from propscope_server.open_contract import CAPABILITIES_PARAMETER, declared_capabilities


class Capability(enum.Flag):
    """What a method needs of a model; a black-box classifier offers FORWARD only."""

    FORWARD = enum.auto()  # batched forward passes
    EDITORS = enum.auto()  # editor models on the same server (or caller-provided paths)
    ACTIVATIONS = enum.auto()  # hidden-layer activations as outputs
    INTERVENTIONS = enum.auto()  # activations set from outside
    GRADIENTS = enum.auto()  # gradients of outputs with respect to the input
    BOUNDS = enum.auto()  # verified bounds of logit margins over an input box (EVA)


@dataclass(frozen=True)
class MethodInfo:
    name: str  # as in ModelInfo.methods, metrics labels and logs
    rpc: str  # the RPC that serves it
    needs: Capability
    summary: str


class ExplanationMethod(Protocol):
    """plan() refuses everything that can be refused before any work and returns the
    method's plan; run(plan) yields the method's events (its first is what was
    accepted, its last the result). Closing run()'s iterator cancels its work. The
    registry (methods/__init__.py) holds each method's MethodInfo."""

    async def plan(self, spec: Any, deadline: float | None) -> Any: ...

    def run(self, plan: Any) -> AsyncIterator[Any]: ...


def model_capabilities(model: ModelDescription) -> Capability:
    """FORWARD for every classifier, plus what its config declares."""
    if model.role == "editor":
        return Capability(0)
    capabilities = Capability.FORWARD
    for name in declared_capabilities(model.parameters.get(CAPABILITIES_PARAMETER)):
        if name.upper() in Capability.__members__:
            capabilities |= Capability[name.upper()]
    return capabilities


def require_inputs(model: ModelDescription, names: Sequence[str], purpose: str) -> None:
    """FailedPrecondition unless `model`'s config declares every open-model tensor in
    `names` (optional inputs such as REPLACE_LAYER, or outputs such as INPUT_GRADIENT).
    `purpose` says what needs them, e.g. "CRAFT importance (replacing layer activations)".
    Declaring a capability is not enough: a config may declare a subset of the tensors."""
    declared = {t.name for t in (*model.inputs, *model.outputs)}
    missing = [name for name in names if name not in declared]
    if missing:
        raise FailedPrecondition(
            f"model {model.name!r} does not declare {', '.join(missing)}, which {purpose} "
            "needs; declare them in its config.pbtxt after the image input and the scores "
            'output (docs/own-models.md, "Open models")',
            field="model",
        )
