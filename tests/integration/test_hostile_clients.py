"""Hostile and careless clients on the real stack (issue 15), in bounded form: streams
that never read, a client deadline longer than the gateway's cap, unauthenticated
large messages, a client that hangs up mid-stream. `make soak` runs the full-size
versions (tools/propscope_dev/soak.py). Each test prints what it measured (`pytest -s`)."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc
from tests.integration.conftest import extra_gateway, png
from tests.integration.test_operations import (
    TOKENS,
    explain,
    explain_request,
    heavy_request,
    metric,
    wait_until,
)

# A client that never reads: no BDP probing, so its receive window stays at 64 KiB and
# a stream with path images fills it at once.
NEVER_READING_OPTIONS = [("grpc.http2.bdp_probe", 0)]


def never_reading_request(seed: int) -> pb.ExplainRequest:
    """A cheap request whose answer (noisy path images) is far larger than 64 KiB."""
    noise = np.random.default_rng(seed).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    return explain_request(seed, image=png(noise), steps=8, return_path_images=True)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class PeakRss:
    """Samples a process's resident memory every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def added_mib(self) -> float:
        return (self.peak - self.before) / 2**20


def timed_explains(channel: grpc.Channel, count: int, seed: int) -> list[float]:
    seconds = []
    for i in range(count):
        started = time.perf_counter()
        events = explain(channel, explain_request(seed + i))
        seconds.append(time.perf_counter() - started)
        failures = [
            e.property_result.status.message
            for e in events
            if e.HasField("property_result") and e.property_result.status.code
        ]
        assert events[-1].HasField("done") and not failures, failures
    return seconds


def test_never_reading_streams_are_ended_and_other_callers_are_served(live_stack, tmp_path):
    """One connection opens 12 streams and reads none: 4 are admitted (its share), 8
    refused at once; a well-behaved client on another connection is served throughout;
    the admitted streams are ended after send_timeout_s, freeing their slots."""
    settings = dict(
        PROPSCOPE_LIMITS__SEND_TIMEOUT_S="3",
        PROPSCOPE_LIMITS__MAX_STREAMS_PER_CONNECTION="4",
    )
    with extra_gateway(live_stack, tmp_path, **settings) as gateway:
        url = gateway.metrics_url
        with (
            grpc.insecure_channel(gateway.target) as good,
            grpc.insecure_channel(gateway.target, options=NEVER_READING_OPTIONS) as greedy,
        ):
            idle = timed_explains(good, 5, seed=100)
            stub = explain_pb2_grpc.ExplainServiceStub(greedy)
            held = [stub.Explain(never_reading_request(i), timeout=120) for i in range(12)]
            started = time.monotonic()
            wait_until(
                lambda: (
                    metric(
                        url,
                        'propscope_admission_rejections_total{limit="max_streams_per_connection"}',
                    )
                    == 8
                )
            )
            loaded = timed_explains(good, 5, seed=200)
            wait_until(lambda: metric(url, "propscope_stalled_streams_total") == 4, 60)
            ended_after = time.monotonic() - started
            wait_until(lambda: metric(url, "propscope_inflight_streams") == 0)
            # The greedy connection's slots are free again: a stream it reads is served.
            assert explain(greedy, explain_request(7))[-1].HasField("done")
            for call in held:
                call.cancel()
            assert "send_timeout_s" in gateway.log_file.read_text()
    print(
        f"\nnever-reading streams: 4 admitted, 8 refused, the 4 ended {ended_after:.1f} s "
        f"after they were opened (send_timeout_s 3); well-behaved explain p50 idle "
        f"{statistics.median(idle):.2f} s, with the greedy streams open "
        f"{statistics.median(loaded):.2f} s (max {max(loaded):.2f} s)"
    )


def test_a_client_deadline_cannot_raise_the_gateways_cap(live_stack, tmp_path):
    with extra_gateway(live_stack, tmp_path, PROPSCOPE_LIMITS__MAX_CALL_S="2") as gateway:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = explain_pb2_grpc.ExplainServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Explain(heavy_request(seed=505), timeout=3600))
            elapsed = time.monotonic() - started
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "max_call_s" in caught.value.details()
            wait_until(lambda: metric(gateway.metrics_url, "propscope_inflight_streams") == 0)
    print(f"\na 3600 s client deadline under max_call_s 2: ended after {elapsed:.1f} s")


def test_unauthenticated_large_messages_are_refused_before_they_are_held(live_stack, tmp_path):
    """16 callers without a token send 63 MiB each at once: each is refused before its
    message is received, so the gateway's memory hardly moves."""
    payload = explain_request(image=b"\0" * (63 * 2**20)).SerializeToString()
    with extra_gateway(live_stack, tmp_path, PROPSCOPE_AUTH__TOKENS=TOKENS) as gateway:
        codes: list[grpc.StatusCode] = []

        def attack() -> None:
            with grpc.insecure_channel(gateway.target) as channel:
                call = channel.unary_stream("/propscope.v1.ExplainService/Explain")
                try:
                    list(call(payload, timeout=60))
                except grpc.RpcError as error:
                    codes.append(error.code())

        with PeakRss(gateway.process.pid) as rss:
            attackers = [threading.Thread(target=attack) for _ in range(16)]
            for thread in attackers:
                thread.start()
            for thread in attackers:
                thread.join()
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 16
        with grpc.insecure_channel(gateway.target) as channel:
            assert explain(channel, explain_request(), "token-a")[-1].HasField("done")
    print(f"\n16 concurrent unauthenticated 63 MiB calls added {rss.added_mib:.0f} MiB at peak")
    assert rss.added_mib < 128, "the refused messages were held in memory"


def test_a_client_hanging_up_mid_stream_is_logged_without_a_traceback(live_stack, tmp_path):
    """Hang-ups at three points: right after the plan, while properties stream their
    results (with path images), and by dropping the whole connection."""
    with extra_gateway(live_stack, tmp_path) as gateway:
        for events_read, drop_connection in ((1, False), (3, False), (2, True)):
            channel = grpc.insecure_channel(gateway.target)
            stub = explain_pb2_grpc.ExplainServiceStub(channel)
            request = heavy_request(seed=606 + events_read)
            request.return_path_images = True
            call = stub.Explain(request, timeout=120)
            for _ in range(events_read):
                next(call)
            if drop_connection:
                channel.close()
            else:
                call.cancel()
                channel.close()
            wait_until(lambda: metric(gateway.metrics_url, "propscope_inflight_streams") == 0)
        with grpc.insecure_channel(gateway.target) as channel:
            assert explain(channel, explain_request())[-1].HasField("done")
        log = gateway.log_file.read_text()
    assert log.count("Explain finished: CANCELLED") == 3, log[-3000:]
    assert "Traceback" not in log and '"level": "ERROR"' not in log, log[-3000:]
