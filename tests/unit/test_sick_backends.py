"""Sick and hung backends without a Triton: the sick-model state machine with fake
reload and probe, the Triton adapter's error mapping with a fake client, and `up`'s
clean-up of a process group. The real stack's versions are in
tests/integration/test_faults.py."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from propscope_dev import stack
from propscope_server import metrics
from propscope_server.backends.model_health import ModelHealth, is_worker_failure
from propscope_server.backends.triton import RESTORED_PARAMETER, TritonBackend
from propscope_server.backends.triton_endpoints import TritonEndpoints
from propscope_server.errors import DeadlineExceeded, NotFound, Unavailable

# The fake Triton's one endpoint.
ADDRESS = "127.0.0.1:1"
# What Triton 2.51 answered once the stubs of `procedural` were killed.
DEAD_WORKER = "Stub process 'procedural_0_1' is not healthy."


def gauge(model: str) -> float:
    return metrics.MODEL_HEALTHY.labels(model=model)._value.get()


@pytest.mark.parametrize(
    ("message", "dead"),
    [
        (DEAD_WORKER, True),
        ("Stub process is not healthy.", True),
        (
            f"Failed to process the request(s) for model instance 'x_0', message: {DEAD_WORKER}",
            True,
        ),
        # The model's own exceptions, with and without the older backends' prefix.
        ("Expecting value: line 1 column 1 (char 0)", False),
        ("Failed to process the request(s) for model instance 'x_0', message: ValueError", False),
        ("Request for unknown model: 'x' is not found", False),
    ],
)
def test_only_a_dead_stub_is_a_worker_failure(message, dead):
    assert is_worker_failure(message) is dead


class FakeTriton:
    """A model's reload and probe: the probe fails until `heals_after` reloads."""

    def __init__(self, heals_after: int = 1) -> None:
        self.heals_after = heals_after
        self.reloads = 0
        self.reload_times: list[float] = []
        self.probes = 0

    async def reload(self, model: str) -> None:
        self.reloads += 1
        self.reload_times.append(time.monotonic())

    async def probe(self, model: str) -> None:
        self.probes += 1
        if self.reloads < self.heals_after:
            raise RuntimeError(DEAD_WORKER)

    def kill(self) -> None:
        """The model's worker dies again: the probe fails until the next reload."""
        self.heals_after = self.reloads + 1


class TritonWithoutModelControl(FakeTriton):
    """Every reload is refused; the model answers again once an operator restarts Triton."""

    def __init__(self) -> None:
        super().__init__(heals_after=10**6)
        self.restarted = False

    async def reload(self, model: str) -> None:
        await super().reload(model)
        raise RuntimeError("explicit model load / unload is not allowed")

    async def probe(self, model: str) -> None:
        if not self.restarted:
            await super().probe(model)


def sick_model_health(fake: FakeTriton, backoff_s: float = 0.01, backoff_max_s: float = 0.04):
    health = ModelHealth(fake.reload, fake.probe, backoff_s, backoff_max_s)
    changes: list[tuple[str, bool]] = []

    async def listener(model: str, healthy: bool) -> None:
        changes.append((model, healthy))

    health.listen(listener)
    return health, changes


async def until_healthy(health: ModelHealth, model: str, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while health.is_sick(model):
            await asyncio.sleep(0.005)


async def test_a_dead_worker_makes_the_model_sick_until_a_reload_answers(caplog):
    fake = FakeTriton(heals_after=1)
    health, changes = sick_model_health(fake)
    await health.track("editor_a")
    assert changes == [("editor_a", True)] and gauge("editor_a") == 1

    with caplog.at_level(logging.INFO, "propscope_server.backends.model_health"):
        error = await health.worker_failed("editor_a", DEAD_WORKER, time.monotonic())
        again = await health.worker_failed("editor_a", DEAD_WORKER, time.monotonic())
        assert isinstance(error, Unavailable) and isinstance(again, Unavailable)
        assert "'editor_a' is being restored" in str(error) and DEAD_WORKER in str(error)
        assert health.is_sick("editor_a") and gauge("editor_a") == 0
        with pytest.raises(Unavailable, match="'editor_a' is being restored"):
            health.refuse_if_sick("editor_a")
        await until_healthy(health, "editor_a")

    health.refuse_if_sick("editor_a")  # serves again
    assert gauge("editor_a") == 1
    assert changes == [("editor_a", True), ("editor_a", False), ("editor_a", True)]
    assert fake.reloads == 1 and fake.probes == 2  # probed before and after the reload
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "editor_a" in errors[0].getMessage()  # once per sickness
    assert any("restored" in r.getMessage() for r in caplog.records)


async def test_failed_reloads_back_off_doubling_up_to_the_maximum(caplog):
    fake = FakeTriton(heals_after=5)
    health, _ = sick_model_health(fake, backoff_s=0.01, backoff_max_s=0.04)
    await health.track("classifier_b")
    with caplog.at_level(logging.WARNING, "propscope_server.backends.model_health"):
        await health.worker_failed("classifier_b", DEAD_WORKER, time.monotonic())
        await until_healthy(health, "classifier_b")
    waits = [r.args[1] for r in caplog.records if "next reload in" in r.msg]
    assert waits == [0.01, 0.02, 0.04, 0.04]
    assert fake.reloads == 5


async def test_a_model_another_gateway_restored_is_not_reloaded_again():
    fake = FakeTriton(heals_after=0)
    health, changes = sick_model_health(fake)
    await health.track("shared")
    await health.worker_failed("shared", DEAD_WORKER, time.monotonic())
    await until_healthy(health, "shared")
    assert fake.reloads == 0 and changes[-1] == ("shared", True)


async def test_a_failure_of_a_call_sent_before_the_restore_is_old_news():
    fake = FakeTriton(heals_after=1)
    health, changes = sick_model_health(fake)
    await health.track("editor_c")
    sent = time.monotonic()
    await health.worker_failed("editor_c", DEAD_WORKER, sent)
    await until_healthy(health, "editor_c")
    error = await health.worker_failed("editor_c", DEAD_WORKER, sent)
    assert "has been restored since" in str(error)
    assert not health.is_sick("editor_c") and fake.reloads == 1


async def test_a_model_triton_cannot_reload_heals_once_triton_answers_again():
    """Without explicit model control every reload fails: each round probes first, so a
    Triton an operator restarted is noticed."""
    fake = TritonWithoutModelControl()
    health, changes = sick_model_health(fake, backoff_s=0.01, backoff_max_s=0.02)
    await health.track("editor_d")
    await health.worker_failed("editor_d", DEAD_WORKER, time.monotonic())
    async with asyncio.timeout(10):
        while fake.reloads < 3:
            await asyncio.sleep(0.005)
    assert health.is_sick("editor_d")
    fake.restarted = True
    await until_healthy(health, "editor_d", timeout_s=2)
    assert changes[-1] == ("editor_d", True)
    await health.close()


async def test_a_listener_that_fails_neither_stops_the_healing_nor_reaches_the_caller(caplog):
    fake = FakeTriton(heals_after=1)
    health, changes = sick_model_health(fake)

    async def broken(model: str, healthy: bool) -> None:
        raise RuntimeError("listener broke")

    health.listen(broken)
    with caplog.at_level(logging.ERROR, "propscope_server.backends.model_health"):
        await health.track("editor_e")
        error = await health.worker_failed("editor_e", DEAD_WORKER, time.monotonic())
        assert isinstance(error, Unavailable)
        await until_healthy(health, "editor_e", timeout_s=2)
    assert changes == [("editor_e", True), ("editor_e", False), ("editor_e", True)]
    assert fake.reloads == 1
    broke = [r for r in caplog.records if r.exc_info and "listener broke" in str(r.exc_info[1])]
    assert len(broke) == 3  # healthy, sick, healthy: each logged


async def test_a_caller_cancelled_while_listeners_are_told_leaves_the_model_healing():
    fake = FakeTriton(heals_after=1)
    health, _ = sick_model_health(fake)
    told, release = asyncio.Event(), asyncio.Event()

    async def slow(model: str, healthy: bool) -> None:
        if not healthy:
            told.set()
            await release.wait()

    health.listen(slow)
    await health.track("editor_f")
    call = asyncio.create_task(health.worker_failed("editor_f", DEAD_WORKER, time.monotonic()))
    await asyncio.wait_for(told.wait(), 2)
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    release.set()
    await until_healthy(health, "editor_f", timeout_s=2)
    assert fake.reloads == 1


async def test_a_model_that_keeps_dying_is_reloaded_ever_more_slowly(caplog):
    """Sick again soon after its restore (say its worker is killed by every real request):
    each episode waits twice as long before its first reload; the first reloads at once."""
    fake = FakeTriton(heals_after=1)
    health, _ = sick_model_health(fake, backoff_s=0.2, backoff_max_s=5)
    await health.track("editor_g")
    sick_at = []
    with caplog.at_level(logging.ERROR, "propscope_server.backends.model_health"):
        for _ in range(3):
            fake.kill()
            sick_at.append(time.monotonic())
            await health.worker_failed("editor_g", DEAD_WORKER, time.monotonic())
            await until_healthy(health, "editor_g")
    waits = [reload - sick for reload, sick in zip(fake.reload_times, sick_at, strict=True)]
    print(f"\nwaits before each episode's first reload: {[round(w, 3) for w in waits]}")
    assert waits[1] >= 0.2 and waits[2] >= 0.4
    sick_lines = [r for r in caplog.records if "is sick" in r.getMessage()]
    assert [(r.args[2], r.args[3]) for r in sick_lines] == [(1, 0), (2, 0.2), (3, 0.4)]


async def test_a_model_sick_again_long_after_its_restore_is_reloaded_at_once(caplog):
    fake = FakeTriton(heals_after=1)
    health, _ = sick_model_health(fake, backoff_s=0.2, backoff_max_s=0.3)
    await health.track("editor_h")
    with caplog.at_level(logging.ERROR, "propscope_server.backends.model_health"):
        for _ in range(2):
            fake.kill()
            await health.worker_failed("editor_h", DEAD_WORKER, time.monotonic())
            await until_healthy(health, "editor_h")
            await asyncio.sleep(0.4)  # healthy for longer than backoff_max_s
    sick_lines = [r for r in caplog.records if "is sick" in r.getMessage()]
    assert [(r.args[2], r.args[3]) for r in sick_lines] == [(1, 0), (1, 0)]
    assert fake.reloads == 2


async def test_closing_stops_the_healing():
    fake = FakeTriton(heals_after=10**6)
    health, _ = sick_model_health(fake, backoff_s=10, backoff_max_s=10)
    await health.track("stuck")
    await health.worker_failed("stuck", DEAD_WORKER, time.monotonic())
    await asyncio.sleep(0.05)
    await health.close()
    assert fake.reloads == 1 and health.is_sick("stuck")


def triton_error(status: str, message: str) -> InferenceServerException:
    return InferenceServerException(message, status=f"StatusCode.{status}")


class FakeClient:
    """tritonclient's aio client for one model `m` with versions 1 and 2: each call
    answers what `answers` holds for it (an exception is raised), else a healthy answer."""

    def __init__(self) -> None:
        self.answers: dict[str, object] = {}
        self.calls: list[tuple[str, dict]] = []

    def _answer(self, name: str, healthy: object, **kwargs) -> object:
        self.calls.append((name, kwargs))
        answer = self.answers.get(name, healthy)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def get_model_metadata(self, name, version="", **kwargs):
        metadata = {
            "name": name,
            "versions": ["1", "2"],
            "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": ["-1", "4", "4", "3"]}],
            "outputs": [{"name": "LOGITS", "datatype": "FP32", "shape": ["-1", "2"]}],
        }
        return self._answer("get_model_metadata", metadata, version=version, **kwargs)

    async def get_model_config(self, name, version="", **kwargs):
        config = {"config": {"name": name, "max_batch_size": 8, "backend": "python"}}
        return self._answer("get_model_config", config, **kwargs)

    async def is_model_ready(self, name, version="", **kwargs):
        return self._answer("is_model_ready", True, **kwargs)

    async def get_model_repository_index(self, **kwargs):
        index = {"models": [{"name": "m", "version": v, "state": "READY"} for v in ("1", "2")]}
        return self._answer("get_model_repository_index", index, **kwargs)

    async def infer(self, name, inputs, **kwargs):
        return self._answer("infer", Result(), inputs=inputs, **kwargs)

    async def load_model(self, name, **kwargs):
        return self._answer("load_model", None, **kwargs)

    async def close(self):
        pass


class Result:
    def as_numpy(self, name: str) -> np.ndarray:
        return np.zeros((1, 2), np.float32)


def over(client: object) -> TritonEndpoints:
    """One endpoint, whose client is `client`."""
    return TritonEndpoints(ADDRESS, connect=lambda address: client)


def fake(backend: TritonBackend) -> FakeClient:
    return backend.endpoints.client(ADDRESS)


@pytest.fixture
async def backend():
    triton = TritonBackend(
        over(FakeClient()), 300.0, retries=0, metadata_timeout_s=5.0, heal_backoff_s=0.01
    )
    yield triton
    await triton.close()


async def test_a_metadata_call_our_bound_cut_short_is_unavailable_naming_the_setting(backend):
    fake(backend).answers["get_model_metadata"] = triton_error("DEADLINE_EXCEEDED", "Deadline")
    with pytest.raises(Unavailable) as caught:
        await backend.describe("m")
    assert "'m'" in str(caught.value) and "PROPSCOPE_TRITON_METADATA_TIMEOUT_S" in str(caught.value)
    timeouts = [kwargs["client_timeout"] for name, kwargs in fake(backend).calls]
    assert set(timeouts) == {5.0}  # metadata and config
    fake(backend).answers["get_model_repository_index"] = triton_error("DEADLINE_EXCEEDED", "")
    with pytest.raises(Unavailable, match="repository index within 5 s"):
        await backend.repository()


async def test_an_inference_our_bound_cut_short_names_the_inference_setting(backend):
    model = await backend.describe("m")
    fake(backend).answers["infer"] = triton_error("DEADLINE_EXCEEDED", "Deadline Exceeded")
    with pytest.raises(Unavailable, match="within 300 s \\(PROPSCOPE_TRITON_TIMEOUT_S\\)"):
        await backend.infer(model, {"IMAGE": np.zeros((1, 4, 4, 3), np.uint8)}, ["LOGITS"], None)


async def test_a_call_the_callers_deadline_cut_short_is_deadline_exceeded(backend):
    fake(backend).answers["get_model_metadata"] = triton_error("DEADLINE_EXCEEDED", "Deadline")
    with pytest.raises(DeadlineExceeded):
        await backend.describe("m", deadline=time.monotonic() + 1.0)
    assert fake(backend).calls[0][1]["client_timeout"] < 5.0


async def test_a_missing_version_names_the_model_the_version_and_the_served_ones(backend):
    unknown = "Request for unknown model: 'm' version 7 is not found"
    fake(backend).answers["get_model_metadata"] = triton_error("NOT_FOUND", unknown)
    with pytest.raises(NotFound) as caught:
        await backend.describe("m", "7")
    assert str(caught.value).startswith("model 'm' has no version 7 served")
    assert "version(s) 1, 2" in str(caught.value)


async def test_a_typod_model_gets_a_did_you_mean_and_is_no_triton_error(backend):
    """A caller's typo is answered with the served name closest to it, and does not
    count as a Triton failure (propscope_triton_errors_total would page for typos)."""
    errors = metrics.TRITON_ERRORS.labels(model="*", kind="metadata", code="NOT_FOUND")
    before = errors._value.get()
    unknown = "Request for unknown model: 'n' is not found"
    fake(backend).answers["get_model_metadata"] = triton_error("NOT_FOUND", unknown)
    with pytest.raises(NotFound, match="^model 'n' is not served by Triton \\(ListModels"):
        await backend.describe("n")  # nothing close to "n": no guess
    with pytest.raises(NotFound, match="^model 'mm' is not served by Triton; did you mean 'm'\\?"):
        await backend.describe("mm")
    assert errors._value.get() == before


async def test_a_dead_worker_is_refused_fast_then_reloaded_and_probed(backend):
    model = await backend.describe("m")
    inputs = {"IMAGE": np.zeros((1, 4, 4, 3), np.uint8)}
    fake(backend).answers["infer"] = triton_error("INTERNAL", DEAD_WORKER)
    with pytest.raises(Unavailable, match="'m' is being restored"):
        await backend.infer(model, inputs, ["LOGITS"], None)
    # Healed once a reload's probe gets the model's own answer (here: its error about
    # the zero inputs, which only a live worker gives).
    fake(backend).answers["load_model"] = None
    reloaded = asyncio.Event()

    async def load_model(name, **kwargs):
        fake(backend).calls.append(("load_model", kwargs))
        fake(backend).answers["infer"] = triton_error("INTERNAL", "ValueError: zeros")
        reloaded.set()

    fake(backend).load_model = load_model
    with pytest.raises(Unavailable, match="'m' is being restored"):
        await backend.require_ready(model, None)
    await asyncio.wait_for(reloaded.wait(), 10)
    await until_healthy(backend.model_health, "m")
    config = json.loads(next(k["config"] for n, k in fake(backend).calls if n == "load_model"))
    assert RESTORED_PARAMETER in config["parameters"] and config["max_batch_size"] == 8
    probe = [k["inputs"] for n, k in fake(backend).calls if n == "infer"][-1]
    assert [(t.name(), t.shape(), t.datatype()) for t in probe] == [
        ("IMAGE", [1, 4, 4, 3], "UINT8")
    ]
    fake(backend).answers.pop("infer")
    assert (await backend.infer(model, inputs, ["LOGITS"], None))["LOGITS"].shape == (1, 2)


def live_members(group: int) -> list[int]:
    return stack._group_members(group)


def test_a_leader_killed_at_the_end_is_reaped_not_left_a_zombie():
    """A leader that ignores SIGTERM is only gone after the SIGKILL: waited for, briefly."""
    ignores_term = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(300)"
    )
    leader = subprocess.Popen(
        [sys.executable, "-c", ignores_term], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert leader.stdout is not None and leader.stdout.readline() == b"up\n"
        stack._stop_groups([leader.pid], timeout_s=0.2)
        assert not Path(f"/proc/{leader.pid}").exists()  # reaped, not left a zombie
    finally:
        stack._signal_group(leader.pid, 9)
        leader.wait(10)


def test_a_failed_start_stops_the_whole_group_even_a_child_that_outlives_its_leader():
    """Like Triton and its Python stubs: the leader exits on SIGTERM, its child ignores it."""
    child = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(300)"
    )
    leader_code = (
        "import subprocess, sys, time; "
        f"c = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=sys.stdout); "
        "time.sleep(300)"
    )
    leader = subprocess.Popen(
        [sys.executable, "-c", leader_code], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert leader.stdout is not None and leader.stdout.readline() == b"up\n"
        assert len(live_members(leader.pid)) == 2
        stack._stop_groups([leader.pid], timeout_s=1.0)
        assert live_members(leader.pid) == []
        assert leader.poll() is not None
    finally:
        stack._signal_group(leader.pid, 9)
        leader.wait(10)
