"""The scaled-out stack the scale-out tests share answers as a whole: every gateway,
Triton and Redis node, and a cluster of three masters covering every slot; a node
restarted by the fixture rejoins on its port."""

from __future__ import annotations

import urllib.request

import redis
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2

import propscope
from propscope_dev.scale_out import CLUSTER_SLOTS, ScaledStack, cluster_view
from propscope_server.health import health_status

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def masters_and_slots(node: str) -> tuple[set[str], int]:
    """The masters `node` knows (address) and how many slots they serve in all."""
    view = cluster_view(node)
    assert view is not None, f"cluster node {node} does not answer"
    _, lines = view
    masters, slots = set(), 0
    for fields in lines:
        if "master" in fields[2].split(","):
            masters.add(fields[1].split("@")[0])
            for part in fields[8:]:
                first, _, last = part.partition("-")
                slots += int(last or first) - int(first) + 1
    return masters, slots


def test_every_process_answers(scaled_stack: ScaledStack) -> None:
    assert len(scaled_stack.gateways) == len(scaled_stack.gateway_metrics) == 2
    for target in scaled_stack.gateways:
        assert health_status(target) == health_pb2.HealthCheckResponse.SERVING
        with propscope.Client(target, timeout=60) as client:
            assert {m.name for m in client.list_models()} >= {"synth_hue", "procedural"}
    for url in (*scaled_stack.gateway_metrics, *scaled_stack.triton_metrics):
        with _LOCAL.open(url, timeout=10) as response:
            assert response.status == 200
    assert len(scaled_stack.tritons) == 2
    for target in scaled_stack.tritons:
        triton = triton_grpc.InferenceServerClient(target)
        try:
            assert triton.is_model_ready("synth_hue") and triton.is_model_ready("procedural")
        finally:
            triton.close()
    for node in scaled_stack.redis_nodes:
        host, port = node.rsplit(":", 1)
        assert redis.Redis(host=host, port=int(port), socket_timeout=5).ping()
    assert scaled_stack.redis_url == f"redis+cluster://{scaled_stack.redis_nodes[0]}"


def test_cluster_has_three_masters_and_every_slot(scaled_stack: ScaledStack) -> None:
    for node in scaled_stack.redis_nodes:
        masters, slots = masters_and_slots(node)
        assert masters == set(scaled_stack.redis_nodes)
        assert slots == CLUSTER_SLOTS


def test_restarted_redis_node_rejoins_on_its_port(scaled_stack: ScaledStack) -> None:
    last = scaled_stack.redis_nodes[-1]
    scaled_stack.stop_redis(len(scaled_stack.redis_nodes) - 1)
    try:
        assert cluster_view(last) is None
        for node in scaled_stack.redis_nodes[:-1]:
            assert cluster_view(node) is not None
    finally:
        scaled_stack.start_redis(len(scaled_stack.redis_nodes) - 1)
    for node in scaled_stack.redis_nodes:
        assert masters_and_slots(node) == (set(scaled_stack.redis_nodes), CLUSTER_SLOTS)
