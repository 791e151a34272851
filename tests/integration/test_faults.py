"""Faults on a stack of its own (the session's stack is never broken): Redis killed
and restarted, Triton killed and restarted, a model unloaded, a caller cancelling
or running out of time. Each test prints what it measured (`pytest -s`);
docs/operations.md quotes a run."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc
from propscope_dev import stack
from propscope_dev.triton_launcher import TritonPorts, start_triton, wait_until_ready
from tests.integration.conftest import inference_count
from tests.integration.test_operations import (
    cache_hits,
    explain_request,
    heavy_request,
    long_request,
    metric,
    wait_until,
)

MODELS = ("procedural", "synth_hue", "synth_unbiased")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class FaultStack:
    run_dir: Path
    triton_ports: TritonPorts
    redis_port: int
    gateway_port: int
    metrics_port: int
    triton: subprocess.Popen | None = None
    redis: subprocess.Popen | None = None
    gateway: subprocess.Popen | None = None

    @property
    def triton_url(self) -> str:
        return f"127.0.0.1:{self.triton_ports.grpc}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start_triton(self) -> None:
        """Only the models these tests use (explicit model control: a test can unload one)."""
        self.triton = start_triton(
            stack.DEFAULT_MODEL_REPOSITORY,
            self.triton_ports,
            self.run_dir / "triton-cache",
            self.run_dir / "triton.log",
            new_session=True,
            models=MODELS,
        )
        wait_until_ready(self.triton_url, self.triton)

    def start_redis(self) -> None:
        self.redis = stack.start_redis(self.redis_port, self.run_dir / "redis.log")
        assert self.redis is not None, "these tests need redis-server (make setup installs it)"

    def start_gateway(self) -> None:
        env = {
            "PROPSCOPE_LISTEN_ADDRESS": self.target,
            "PROPSCOPE_TRITON_URL": self.triton_url,
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "PROPSCOPE_METRICS_PORT": str(self.metrics_port),
            "PROPSCOPE_PREPROCESSING_FILE": str(stack.DEFAULT_PREPROCESSING),
            "PROPSCOPE_HEALTH_POLL_S": "0.5",
        }
        self.gateway = stack.start_gateway(env, self.run_dir / "gateway.log")
        stack.wait_for_gateway(self.target, self.gateway)

    @staticmethod
    def kill(process: subprocess.Popen | None) -> None:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Iterator[FaultStack]:
    free = stack.free_port
    faulty = FaultStack(
        tmp_path_factory.mktemp("faults"),
        TritonPorts(http=free(), grpc=free(), metrics=free()),
        free(),
        free(),
        free(),
    )
    try:
        faulty.start_redis()
        faulty.start_triton()
        faulty.start_gateway()
        yield faulty
    finally:
        for process in (faulty.gateway, faulty.triton, faulty.redis):
            FaultStack.kill(process)


@pytest.fixture
def channel(faults: FaultStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(faults.target) as grpc_channel:
        yield grpc_channel


def explain(channel: grpc.Channel, request: pb.ExplainRequest, timeout: float = 120) -> list:
    return list(explain_pb2_grpc.ExplainServiceStub(channel).Explain(request, timeout=timeout))


def health(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def test_killing_redis_mid_run_degrades_to_uncached_and_caching_resumes(faults, channel):
    outcomes: list[str] = []
    stop = threading.Event()

    def load() -> None:
        seed = 0
        while not stop.is_set():
            seed += 1
            events = explain(channel, explain_request(seed=seed % 3))
            outcomes.append("ok" if events[-1].HasField("done") else "incomplete")

    worker = threading.Thread(target=load)
    worker.start()
    wait_until(lambda: len(outcomes) >= 3)
    faults.kill(faults.redis)
    killed = time.monotonic()
    wait_until(lambda: health(channel, "propscope.cache") == NOT_SERVING, timeout_s=10)
    noticed_s = time.monotonic() - killed
    during = len(outcomes)
    wait_until(lambda: len(outcomes) >= during + 5)
    stop.set()
    worker.join(120)
    print(
        f"\nredis killed: health noticed in {noticed_s:.2f} s; {len(outcomes)} calls, {outcomes.count('ok')} ok"
    )
    assert outcomes and set(outcomes) == {"ok"}
    assert health(channel) == SERVING  # degraded, still serving
    assert metric(faults.metrics_url, 'propscope_dependency_up{dependency="cache"}') == 0
    assert metric(faults.metrics_url, "propscope_cache_errors_total") > 0

    faults.start_redis()
    restarted = time.monotonic()
    wait_until(lambda: health(channel, "propscope.cache") == SERVING, timeout_s=10)
    print(f"redis restarted: cache health SERVING after {time.monotonic() - restarted:.2f} s")
    request = explain_request(seed=77)
    assert cache_hits(explain(channel, request)) == 0
    assert cache_hits(explain(channel, request)) == 1  # caching resumed, no gateway restart


def test_killing_triton_is_unavailable_fast_and_recovers(faults, channel):
    explain(channel, explain_request(seed=5))  # models described and cached by the gateway
    faults.kill(faults.triton)
    stub = explain_pb2_grpc.ExplainServiceStub(channel)
    for call in (
        lambda: explain(channel, explain_request(seed=6), timeout=30),
        lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30),
    ):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            call()
        elapsed = time.monotonic() - started
        print(f"\ntriton down: {caught.value.code().name} after {elapsed:.3f} s")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert elapsed < 2.0
        assert "Triton is unreachable" in caught.value.details()
    wait_until(lambda: health(channel) == NOT_SERVING, timeout_s=5)
    assert metric(faults.metrics_url, "propscope_triton_retries_total") > 0

    faults.start_triton()
    ready = time.monotonic()
    wait_until(lambda: answers(lambda: explain(channel, explain_request(seed=7))), timeout_s=30)
    print(f"triton back: explanations served {time.monotonic() - ready:.2f} s after it was ready")
    wait_until(lambda: health(channel) == SERVING, timeout_s=5)


def answers(call: Callable[[], list]) -> bool:
    try:
        return call()[-1].HasField("done")
    except grpc.RpcError:
        return False


def test_an_unloaded_model_is_failed_precondition_naming_it(faults, channel):
    explain(channel, explain_request(seed=8, model=pb.ModelRef(name="synth_unbiased")))
    triton = triton_grpc.InferenceServerClient(faults.triton_url)
    try:
        triton.unload_model("synth_unbiased")
        wait_until(lambda: not triton.is_model_ready("synth_unbiased"))
        with pytest.raises(grpc.RpcError) as caught:
            explain(channel, explain_request(seed=9, model=pb.ModelRef(name="synth_unbiased")))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'synth_unbiased'" in caught.value.details()
        triton.load_model("synth_unbiased")
        events = explain(channel, explain_request(seed=9, model=pb.ModelRef(name="synth_unbiased")))
        assert events[-1].HasField("done")
    finally:
        triton.close()


def work_done(triton: triton_grpc.InferenceServerClient) -> tuple[int, ...]:
    return tuple(inference_count(triton, model) for model in ("procedural", "synth_hue"))


def seconds_until_work_stops(triton: triton_grpc.InferenceServerClient, since: float) -> float:
    """Polls Triton's counters for 3 s; the last change, in seconds after `since`."""
    last, last_change = work_done(triton), since
    while time.monotonic() < since + 3.0:
        time.sleep(0.05)
        now = work_done(triton)
        if now != last:
            last, last_change = now, time.monotonic()
    return last_change - since


def test_a_cancelled_call_stops_triton_work_within_a_second(faults, channel):
    triton = triton_grpc.InferenceServerClient(faults.triton_url)
    try:
        stream = explain_pb2_grpc.ExplainServiceStub(channel).Explain(
            heavy_request(seed=10), timeout=300
        )
        for event in stream:
            if event.HasField("property_result"):
                break
        before = work_done(triton)
        stream.cancel()
        stopped_s = seconds_until_work_stops(triton, time.monotonic())
        after = work_done(triton)
    finally:
        triton.close()
    print(
        f"\ncancelled: Triton work stopped {stopped_s:.3f} s after the cancel; {before} -> {after}"
    )
    assert stopped_s < 1.0
    assert after[1] < before[1] + 7 * 4 * 65  # most properties never classified
    wait_until(lambda: metric(faults.metrics_url, "propscope_inflight_streams") == 0)
    assert explain(channel, explain_request(seed=11))[-1].HasField("done")


def test_a_passed_deadline_stops_triton_work_within_a_second(faults, channel):
    triton = triton_grpc.InferenceServerClient(faults.triton_url)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            explain(channel, long_request(seed=12), timeout=1.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stopped_s = seconds_until_work_stops(triton, started + 1.5)
    finally:
        triton.close()
    print(f"\ndeadline: Triton work stopped {stopped_s:.3f} s after the deadline")
    assert stopped_s < 1.0
    wait_until(
        lambda: (
            metric(
                faults.metrics_url, 'propscope_rpc_total{code="DEADLINE_EXCEEDED",method="Explain"}'
            )
            == 1
        ),
        timeout_s=120,  # a hang guard: the call is counted once its thread work has ended
    )


def processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every live process whose command line contains `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and text in command:
            found[int(entry.name)] = command
    return found


def kill_workers(faults: FaultStack, model: str) -> list[int]:
    """SIGKILL to the Python-backend stub processes of `model` on this stack's Triton
    (their command line names the stub in the run folder and the model's file)."""
    stubs = processes_mentioning(str(faults.run_dir / "triton-cache"))
    pids = [pid for pid, command in stubs.items() if f"/models/{model}/" in command]
    assert pids, f"no stub process of {model} found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


class Watcher:
    """Polls a model's health service and healthy gauge in the background."""

    def __init__(self, faults: FaultStack, channel: grpc.Channel, model: str) -> None:
        self.seen: set[tuple[str, int | float]] = set()
        self._stop = threading.Event()

        def watch() -> None:
            gauge = f'propscope_model_healthy{{model="{model}"}}'
            while not self._stop.is_set():
                self.seen.add(("health", health(channel, f"propscope.model.{model}")))
                self.seen.add(("gauge", metric(faults.metrics_url, gauge)))
                time.sleep(0.05)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def complete(events: list) -> bool:
    return events[-1].HasField("done") and events[-1].done.properties_failed == 0


def kill_mid_request_and_time_recovery(
    faults: FaultStack, channel: grpc.Channel, model: str, first_seed: int
) -> float:
    """Kills `model`'s workers while a heavy Explain runs, then sends an Explain (a new
    image each time: never served from the cache) every 0.2 s until one completes.
    Checks what callers, the health service, the metric and the log saw; returns the
    seconds from the kill to the first complete answer."""
    explain(channel, explain_request(seed=first_seed))  # described: health SERVING
    assert health(channel, f"propscope.model.{model}") == SERVING
    stream = explain_pb2_grpc.ExplainServiceStub(channel).Explain(
        heavy_request(seed=first_seed + 1), timeout=120
    )
    assert next(stream).HasField("accepted")
    watcher = Watcher(faults, channel, model)
    time.sleep(0.5)  # editing and classifying under way
    kill_workers(faults, model)
    killed = time.monotonic()
    with pytest.raises(grpc.RpcError) as in_flight:
        list(stream)
    failures, seed = [], first_seed + 2
    while True:
        try:
            if complete(explain(channel, explain_request(seed=seed), timeout=60)):
                break
        except grpc.RpcError as error:
            failures.append((error.code(), error.details()))
        assert time.monotonic() - killed < 120, f"{model} never recovered: {failures[-3:]}"
        seed += 1
        time.sleep(0.2)
    recovered_s = time.monotonic() - killed
    wait_until(lambda: health(channel, f"propscope.model.{model}") == SERVING, timeout_s=5)
    watcher.stop()
    print(
        f"\n{model} workers killed mid-request: in-flight call {in_flight.value.code().name} "
        f"({in_flight.value.details()}); {len(failures)} calls refused; first complete answer "
        f"{recovered_s:.2f} s after the kill; health and gauge seen: {sorted(watcher.seen)}"
    )
    assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"model '{model}' is being restored" in in_flight.value.details()
    for code, details in failures:
        assert code == grpc.StatusCode.UNAVAILABLE and f"model '{model}'" in details, details
    assert {("health", NOT_SERVING), ("health", SERVING), ("gauge", 0), ("gauge", 1)} <= (
        watcher.seen
    )
    assert metric(faults.metrics_url, f'propscope_model_healthy{{model="{model}"}}') == 1
    errors = [
        line
        for line in (faults.run_dir / "gateway.log").read_text().splitlines()
        if '"level": "ERROR"' in line and f"model {model} is sick" in line
    ]
    assert len(errors) == 1, errors  # once per sickness
    return recovered_s


def test_a_killed_editor_worker_is_restored_without_help(faults, channel):
    assert kill_mid_request_and_time_recovery(faults, channel, "procedural", 1000) <= 30


def test_a_killed_classifier_worker_is_restored_without_help(faults, channel):
    assert kill_mid_request_and_time_recovery(faults, channel, "synth_hue", 2000) <= 30


def test_a_hung_triton_is_unavailable_after_the_metadata_timeout_then_recovers(faults, channel):
    """SIGSTOP freezes Triton with its port open: calls wait for the gateway's bound
    (PROPSCOPE_TRITON_METADATA_TIMEOUT_S, default 5 s), never for the 300 s inference one."""
    explain(channel, explain_request(seed=3000))
    stub = explain_pb2_grpc.ExplainServiceStub(channel)
    os.kill(faults.triton.pid, signal.SIGSTOP)
    try:
        for name, call in (
            ("Explain", lambda: explain(channel, explain_request(seed=3001), timeout=120)),
            ("ListModels", lambda: stub.ListModels(pb.ListModelsRequest(), timeout=120)),
        ):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                call()
            elapsed = time.monotonic() - started
            print(f"\ntriton hung: {name} {caught.value.code().name} after {elapsed:.2f} s")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            assert "PROPSCOPE_TRITON_METADATA_TIMEOUT_S" in caught.value.details()
            assert elapsed < 60
        wait_until(lambda: health(channel) == NOT_SERVING, timeout_s=15)
    finally:
        os.kill(faults.triton.pid, signal.SIGCONT)
    resumed = time.monotonic()
    wait_until(lambda: answers(lambda: explain(channel, explain_request(seed=3002))), 30)
    print(f"triton resumed: explanations served {time.monotonic() - resumed:.2f} s later")
    wait_until(lambda: health(channel) == SERVING, timeout_s=15)


def test_a_missing_model_version_is_not_found_naming_the_served_ones(faults, channel):
    request = explain_request(seed=4000, model=pb.ModelRef(name="synth_hue", version="7"))
    with pytest.raises(grpc.RpcError) as caught:
        explain(channel, request)
    print(f"\nmissing version: {caught.value.code().name}: {caught.value.details()}")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model 'synth_hue' has no version 7" in caught.value.details()
    assert "version(s) 1" in caught.value.details()


def test_a_failed_up_leaves_no_process_behind(tmp_path, monkeypatch):
    """The gateway refuses a bad setting after Triton (and its Python stubs) and Redis
    started: `up` fails and every process it started is gone."""
    started: list[subprocess.Popen] = []
    for name in ("start_redis", "start_gateway"):

        def spy(*args, _start=getattr(stack, name), **kwargs):
            process = _start(*args, **kwargs)
            started.append(process)
            return process

        monkeypatch.setattr(stack, name, spy)
    run_dir = tmp_path / "run"
    with pytest.raises(stack.StackStartError) as caught:
        stack.up(run_dir, stack.free_port(), gateway_env={"PROPSCOPE_LOG_FORMAT": "yaml"})
    print(f"\nfailed up: {caught.value}")
    assert "the gateway" in str(caught.value) and "exited" in str(caught.value)
    assert len(started) == 2  # redis and the gateway; Triton's processes name the run folder
    left = processes_mentioning(str(run_dir))
    left.update({p.pid: str(p.args) for p in started if p.poll() is None})
    assert not left, f"processes left by a failed up: {left}"
