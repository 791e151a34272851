"""One gateway over two real Tritons (`scaled_stack`: PROPSCOPE_TRITON_URL="a,b"): its calls
spread over both, counted by the gateway per endpoint and by each Triton itself; with one
Triton stopped calls keep succeeding through the other, and the stopped one takes calls
again once it is back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2

import propscope
from propscope import PropertyResult
from propscope_dev import stack
from propscope_server.health import health_status
from tests.integration.conftest import scene_png
from tests.integration.test_operations import sample_sum, samples, wait_until

HUE = "object_hue=procedural:operation=hue,region=object"
SERVING = health_pb2.HealthCheckResponse.SERVING
ENDPOINT_CALLS = "propscope_triton_endpoint_calls_total"
ENDPOINT_UP = "propscope_triton_endpoint_up"
# Each Triton's own count of the requests it served (all models).
TRITON_SERVED = "nv_inference_request_success_total"  # as the parser names its samples


def explain_hue(client: propscope.Client, hue_deg: float) -> None:
    """One Explain of a fresh image (no cache hits: the editor runs too); it must succeed."""
    image = scene_png(hue_deg=hue_deg, radius_px=10.0)
    events = list(client.explain(image, "synth_hue", [HUE], steps=6, samples=2, seed=7))
    (result,) = [e for e in events if isinstance(e, PropertyResult)]
    assert result.error is None


def gateway_calls(metrics_url: str, tritons: list[str], **outcome: str) -> list[float]:
    """The gateway's calls to each Triton (of one outcome, else all)."""
    return [sample_sum(metrics_url, ENDPOINT_CALLS, endpoint=t, **outcome) for t in tritons]


def served(triton_metrics: list[str]) -> list[float]:
    return [sample_sum(url, TRITON_SERVED) for url in triton_metrics]


def grown(before: list[float], after: list[float]) -> list[float]:
    return [now - then for now, then in zip(after, before, strict=True)]


def in_rotation(metrics_url: str, triton: str) -> float:
    return sample_sum(metrics_url, ENDPOINT_UP, endpoint=triton)


@pytest.fixture
def client(scaled_stack) -> Iterator[propscope.Client]:
    """One SDK client on the first gateway: every call below goes through it."""
    with propscope.Client(scaled_stack.gateways[0], timeout=300) as sdk:
        yield sdk


def test_one_gateways_calls_spread_over_both_tritons(scaled_stack, client):
    metrics_url, tritons = scaled_stack.gateway_metrics[0], scaled_stack.tritons
    assert sample_sum(metrics_url, "propscope_triton_endpoints") == 2
    calls_before = gateway_calls(metrics_url, tritons, outcome="ok")
    served_before = served(scaled_stack.triton_metrics)
    for hue in (31.0, 67.0, 103.0):
        explain_hue(client, hue)
    calls = grown(calls_before, gateway_calls(metrics_url, tritons, outcome="ok"))
    inferences = grown(served_before, served(scaled_stack.triton_metrics))
    # Round robin per call: the gateway's calls (inferences and metadata) alternate.
    assert min(calls) > 0 and abs(calls[0] - calls[1]) <= 1, calls
    # Each Triton served inferences of it (the other gateway sent none).
    assert min(inferences) > 0, inferences
    assert sum(inferences) <= sum(calls)


def test_a_stopped_triton_is_left_out_and_used_again_once_back(scaled_stack, client):
    metrics_url, tritons = scaled_stack.gateway_metrics[0], scaled_stack.tritons
    gateway = scaled_stack.gateways[0]
    explain_hue(client, 139.0)
    scaled_stack.stop_triton(1)
    try:
        served_by_first = served(scaled_stack.triton_metrics[:1])[0]
        for hue in (151.0, 163.0, 175.0):
            explain_hue(client, hue)  # succeeds: retried on, then sent only to, Triton 0
        assert served(scaled_stack.triton_metrics[:1])[0] > served_by_first
        assert in_rotation(metrics_url, tritons[1]) == 0
        assert in_rotation(metrics_url, tritons[0]) == 1
        assert health_status(gateway) == SERVING  # one Triton is enough
        calls_while_out = gateway_calls(metrics_url, tritons)[1]
        explain_hue(client, 187.0)
        assert gateway_calls(metrics_url, tritons)[1] == calls_while_out  # none sent to it
    finally:
        scaled_stack.start_triton(1)
    # Back after its rest (it doubled while it was down, up to 30 s) and a probe.
    wait_until(lambda: in_rotation(metrics_url, tritons[1]) == 1, timeout_s=60)
    calls_before = gateway_calls(metrics_url, tritons, outcome="ok")
    for hue in (199.0, 211.0):
        explain_hue(client, hue)
    calls = grown(calls_before, gateway_calls(metrics_url, tritons, outcome="ok"))
    assert min(calls) > 0 and abs(calls[0] - calls[1]) <= 1, calls
    # The restarted Triton counts from zero: all it served came through the gateway since.
    assert served(scaled_stack.triton_metrics[1:])[0] > 0


def test_an_unreachable_endpoint_in_the_list_is_left_out_and_named(live_stack, tmp_path):
    """A gateway given the session's Triton and an address where nothing listens: it serves,
    its calls succeed on the live one, the dead one leaves the rotation (never counted ok,
    sent nothing once out) and its log names it."""
    live, dead = live_stack.triton_grpc, f"127.0.0.1:{stack.free_port()}"
    with stack.extra_gateway(live_stack, tmp_path, PROPSCOPE_TRITON_URL=f"{live},{dead}") as gw:
        wait_until(lambda: health_status(gw.target) == SERVING)
        with propscope.Client(gw.target, timeout=300) as sdk:
            for hue in (223.0, 235.0):
                explain_hue(sdk, hue)
            wait_until(lambda: in_rotation(gw.metrics_url, dead) == 0)
            gauges = {
                s.labels["endpoint"]: s.value
                for s in samples(gw.metrics_url)
                if s.name == ENDPOINT_UP
            }
            assert gauges == {live: 1, dead: 0}  # the dead one is listed, out of rotation
            assert sample_sum(gw.metrics_url, "propscope_triton_endpoints") == 2
            calls_to_dead = gateway_calls(gw.metrics_url, [dead])[0]
            explain_hue(sdk, 247.0)
            assert gateway_calls(gw.metrics_url, [dead])[0] == calls_to_dead  # none sent to it
        assert gateway_calls(gw.metrics_url, [dead], outcome="ok") == [0]
        assert gateway_calls(gw.metrics_url, [live], outcome="ok")[0] > 0
        assert health_status(gw.target) == SERVING
    warnings = [line for line in gw.log_file.read_text().splitlines() if "WARNING" in line]
    assert any(f"Triton endpoint {dead} is out of rotation" in line for line in warnings)
