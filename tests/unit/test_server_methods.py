"""The seam every explanation method uses: the core imports no transport, one table
maps domain errors to status codes, the registry says what a model supports and
refuses what it cannot, and the runner cancels and counts every method alike."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
from contextlib import aclosing
from pathlib import Path

import grpc
import numpy as np
import pytest

from propscope_server import errors, methods
from propscope_server.api.status import STATUS_CODES, status_code
from propscope_server.backends.preprocessing import InputLayout
from propscope_server.config import PreprocessingConfig, Settings
from propscope_server.domain import PerturbationSpec, RiseSpec
from propscope_server.inference import ModelDescription, Tensor
from propscope_server.methods.attribution import TargetPlan, view_attribution
from propscope_server.methods.base import Capability, MethodInfo, model_capabilities
from propscope_server.orchestration.classifier import PlannedClassifier, Target
from propscope_server.orchestration.runner import Finished, run_method, with_progress

PACKAGE = Path(__file__).resolve().parents[2] / "server" / "propscope_server"
# The core: what methods are written against. Adapters (api/, backends/triton.py,
# cache/redis_cache.py) are the only places transports may appear.
CORE = [
    "domain.py",
    "graph_domain.py",
    "errors.py",
    "inference.py",
    "regions.py",
    "methods",
    "orchestration",
    "scoring",
    "cache/__init__.py",
    "cache/artefacts.py",
    "backends/preprocessing.py",
]
TRANSPORTS = {"grpc", "grpc_status", "tritonclient", "redis", "google.rpc"}

CLASSIFIER = ModelDescription(
    name="clf",
    version="1",
    versions=("1",),
    role="classifier",
    inputs=(Tensor("IMAGE", "UINT8", [8, 8, 3]),),
    outputs=(Tensor("LOGITS", "FP32", [2]),),
    max_batch_size=8,
)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def module_file(module: str) -> Path | None:
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def test_the_core_reaches_no_transport_even_through_its_own_imports():
    pending = [
        path
        for entry in CORE
        for path in (
            (PACKAGE / entry).rglob("*.py") if (PACKAGE / entry).is_dir() else [PACKAGE / entry]
        )
    ]
    seen: set[Path] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(path):
            top = {name.split(".")[0], ".".join(name.split(".")[:2])}
            assert not top & TRANSPORTS, f"{path.relative_to(PACKAGE)} imports {name}"
            if name.startswith("propscope_server."):
                reached = module_file(name)
                assert reached is not None, name
                pending.append(reached)
    assert len(seen) > len(CORE)


def test_every_domain_error_has_one_status_code():
    subclasses = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.PropscopeError)
    } - {errors.PropscopeError}
    assert subclasses == set(STATUS_CODES)
    assert status_code(errors.ResourceExhausted("x")) is grpc.StatusCode.RESOURCE_EXHAUSTED

    class Narrower(errors.FailedPrecondition):
        pass

    assert status_code(Narrower("x")) is grpc.StatusCode.FAILED_PRECONDITION
    assert status_code(errors.PropscopeError("x")) is grpc.StatusCode.INTERNAL


def test_a_black_box_classifier_supports_every_forward_pass_method_and_an_editor_none():
    black_box = Capability.FORWARD | Capability.EDITORS
    assert set(methods.supported(CLASSIFIER)) == {
        m.name for m in methods.METHODS if m.needs & ~black_box == Capability(0)
    }
    assert "causal_graph" not in methods.supported(CLASSIFIER)
    open_model = dataclasses.replace(
        CLASSIFIER, parameters={"propscope.capabilities": "activations,interventions"}
    )
    assert "causal_graph" in methods.supported(open_model)
    editor = dataclasses.replace(CLASSIFIER, role="editor")
    assert methods.supported(editor) == ()


def test_declared_capabilities_are_read_from_the_config():
    declared = dataclasses.replace(
        CLASSIFIER, parameters={"propscope.capabilities": "activations, gradients, bogus"}
    )
    assert model_capabilities(declared) == (
        Capability.FORWARD | Capability.ACTIVATIONS | Capability.GRADIENTS
    )
    assert model_capabilities(CLASSIFIER) == Capability.FORWARD


def test_a_method_the_model_cannot_support_is_refused_naming_what_is_missing(monkeypatch):
    needs = Capability.FORWARD | Capability.GRADIENTS
    monkeypatch.setitem(methods.BY_NAME, "saliency", MethodInfo("saliency", "X", needs, ""))
    with pytest.raises(errors.FailedPrecondition, match="needs gradients") as caught:
        methods.require("saliency", CLASSIFIER)
    assert caught.value.field == "method"
    capable = dataclasses.replace(CLASSIFIER, parameters={"propscope.capabilities": "gradients"})
    methods.require("saliency", capable)


class SlowMethod:
    """Plans, says it accepted, then works (in a task, as methods do with
    with_progress) until cancelled."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.cancelled = asyncio.Event()

    async def plan(self, spec, deadline):
        if self.refuse:
            raise errors.InvalidArgument("no", field="spec")
        return spec

    async def run(self, plan):
        async def work(emit):
            emit("accepted")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

        async with aclosing(with_progress(work)) as events:
            async for event in events:
                yield event


def runs(method: str, outcome: str) -> float:
    from propscope_server import metrics

    return metrics.METHOD_RUNS.labels(method=method, outcome=outcome)._value.get()


async def test_closing_the_runner_cancels_the_methods_work_and_counts_it():
    method = SlowMethod()
    before = runs("slow", "cancelled")
    async with aclosing(run_method(method, "slow", "spec", None)) as events:
        assert await anext(events) == "accepted"
    await asyncio.wait_for(method.cancelled.wait(), 1.0)
    assert runs("slow", "cancelled") == before + 1


async def test_a_refusal_in_plan_is_raised_before_any_event_and_counted():
    before = runs("slow", "refused")
    with pytest.raises(errors.InvalidArgument):
        async with aclosing(run_method(SlowMethod(refuse=True), "slow", "spec", None)) as events:
            await anext(events)
    assert runs("slow", "refused") == before + 1


async def test_with_progress_streams_what_the_work_emits_then_its_result():
    async def work(emit):
        for done in range(3):
            emit(done)
            await asyncio.sleep(0)
        return "map"

    events = [event async for event in with_progress(work)]
    assert events == [0, 1, 2, Finished("map")]


async def test_with_progress_raises_the_works_error():
    async def work(emit):
        emit("started")
        raise errors.BackendError("model broke")

    with pytest.raises(errors.BackendError, match="model broke"):
        [event async for event in with_progress(work)]


async def test_a_failing_batch_reaches_the_caller_as_its_own_domain_error():
    """view_attribution runs batches in a TaskGroup: the API must see the batch's
    Unavailable (a retryable status), not an ExceptionGroup that reads as INTERNAL."""

    class Failing:
        calls = 0

        async def infer(self, model, inputs, outputs, deadline):
            Failing.calls += 1
            await asyncio.sleep(0.01 * Failing.calls)
            raise errors.Unavailable("Triton is unreachable")

    planned = PlannedClassifier(
        model=CLASSIFIER,
        layout=InputLayout("IMAGE", "UINT8", False, 8, 8),
        output="LOGITS",
        classes=2,
        preprocessing=PreprocessingConfig(output_kind="logits"),
        preprocessing_sources=(),
        warnings=(),
        class_labels=(),
    )
    target = TargetPlan(planned, np.zeros((8, 8, 3), np.float32), Target(1, "logit"), 0.0, 1, None)
    with pytest.raises(errors.Unavailable):
        await view_attribution(
            Failing(),
            target,
            target.view,
            RiseSpec(grid=2, nb_samples=40),
            PerturbationSpec(),
            0,
            Settings(),
            lambda done: None,
        )
