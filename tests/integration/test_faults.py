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
        """Explicit model control, so a test can unload a model."""
        self.triton = start_triton(
            stack.DEFAULT_MODEL_REPOSITORY,
            self.triton_ports,
            self.run_dir / "triton-cache",
            self.run_dir / "triton.log",
            extra_args=("--model-control-mode=explicit", *(f"--load-model={m}" for m in MODELS)),
            new_session=True,
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
            explain(channel, heavy_request(seed=12), timeout=1.5)
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
