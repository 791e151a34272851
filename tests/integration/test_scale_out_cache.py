"""The artefact cache on a three-node Redis Cluster (real redis-server processes in
cluster mode, `scaled_stack`): shared by every gateway, a stopped node costs only the
misses of its slots, and a URL of the wrong kind turns the cache off naming REDIS_URL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2
from typer.testing import CliRunner

import propscope
from propscope import PropertyResult
from propscope_dev import main as dev_main
from propscope_dev import scale_out, stack
from propscope_server.cache.artefacts import KEY_PREFIX
from propscope_server.cache.redis_cache import RedisArtefactCache
from propscope_server.health import health_status
from tests.integration.conftest import inference_count, scene_png
from tests.integration.test_operations import metric, wait_until

HUE = "object_hue=procedural:operation=hue,region=object"
# One cached path per sample: enough keys that they fall on more than one node.
SAMPLES = 6
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PATH = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)


def explain_hue(client: propscope.Client, image: bytes) -> PropertyResult:
    events = list(
        client.explain(
            image, "synth_hue", [HUE], steps=6, samples=SAMPLES, path_mode="fixed", seed=3
        )
    )
    (result,) = [e for e in events if isinstance(e, PropertyResult)]
    assert result.error is None
    return result


def path_keys(nodes: list[str]) -> list[set[bytes]]:
    """The path keys each cluster node holds (each answers for its own slots only)."""
    held = []
    for node in nodes:
        host, port = node.rsplit(":", 1)
        with redis.Redis(host=host, port=int(port), socket_timeout=5) as client:
            held.append(set(client.keys(f"{KEY_PREFIX}*")))
    return held


def editor_calls(tritons: list[str]) -> int:
    total = 0
    for address in tritons:
        client = triton_grpc.InferenceServerClient(address)
        try:
            total += inference_count(client, "procedural")
        finally:
            client.close()
    return total


def same_numbers(result: PropertyResult, baseline: PropertyResult) -> None:
    assert result.score == baseline.score
    assert result.p_value == baseline.p_value
    for sample, expected in zip(result.samples, baseline.samples, strict=True):
        np.testing.assert_array_equal(sample.prediction_curve, expected.prediction_curve)


@pytest.fixture
def clients(scaled_stack) -> Iterator[tuple[propscope.Client, propscope.Client]]:
    """One SDK client per gateway, so each call goes where the test says."""
    with (
        propscope.Client(scaled_stack.gateways[0], timeout=300) as a,
        propscope.Client(scaled_stack.gateways[1], timeout=300) as b,
    ):
        yield a, b


def test_a_path_edited_through_one_gateway_is_a_hit_through_the_other(scaled_stack, clients):
    a, b = clients
    image = scene_png(hue_deg=133.0, radius_px=11.0)
    before = path_keys(scaled_stack.redis_nodes)
    first = explain_hue(a, image)
    assert (first.cache_hits, first.cache_misses) == (0, SAMPLES)
    written = [
        now - then for now, then in zip(path_keys(scaled_stack.redis_nodes), before, strict=True)
    ]
    assert sum(map(len, written)) == SAMPLES
    assert sum(1 for keys in written if keys) >= 2  # the request's paths span nodes

    edits = editor_calls(scaled_stack.tritons)
    second = explain_hue(b, image)
    assert (second.cache_hits, second.cache_misses) == (SAMPLES, 0)
    assert all(sample.cache_hit for sample in second.samples)
    assert editor_calls(scaled_stack.tritons) == edits  # gateway B edited nothing
    same_numbers(second, first)


def test_a_stopped_node_costs_the_misses_of_its_slots_not_errors(scaled_stack, clients):
    """The other nodes keep serving their keys; the node's keys are lost (no
    persistence), so after its restart they are misses once, then cached again."""
    a, b = clients
    image = scene_png(hue_deg=211.0, radius_px=12.0)
    before = path_keys(scaled_stack.redis_nodes)
    baseline = explain_hue(a, image)
    assert baseline.cache_misses == SAMPLES
    written = [
        now - then for now, then in zip(path_keys(scaled_stack.redis_nodes), before, strict=True)
    ]
    victim = next(i for i, keys in enumerate(written) if 0 < len(keys) < SAMPLES)
    lost = len(written[victim])
    scaled_stack.stop_redis(victim)
    try:
        for client in (a, b):
            result = explain_hue(client, image)
            assert (result.cache_hits, result.cache_misses) == (SAMPLES - lost, lost)
            same_numbers(result, baseline)
        for target, metrics_url in zip(
            scaled_stack.gateways, scaled_stack.gateway_metrics, strict=True
        ):
            wait_until(lambda t=target: health_status(t, "propscope.cache") == NOT_SERVING)
            assert health_status(target) == SERVING  # degraded, still serving
            assert metric(metrics_url, "propscope_cache_errors_total") > 0
    finally:
        scaled_stack.start_redis(victim)
    for target in scaled_stack.gateways:
        wait_until(lambda t=target: health_status(t, "propscope.cache") == SERVING)
    refilled = explain_hue(b, image)
    assert (refilled.cache_hits, refilled.cache_misses) == (SAMPLES - lost, lost)
    cached = explain_hue(a, image)
    assert (cached.cache_hits, cached.cache_misses) == (SAMPLES, 0)
    same_numbers(cached, baseline)


@pytest.fixture
def single_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server not in cluster mode: host:port."""
    port = stack.free_port()
    process = stack.start_redis(port, tmp_path / "redis.log")
    assert process is not None, "needs redis-server (make setup installs it)"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


async def test_a_cluster_url_at_a_single_redis_turns_the_cache_off_naming_the_fix(single_redis):
    cache = RedisArtefactCache(f"redis+cluster://{single_redis}", 60, 1.0, 2.0)
    try:
        assert await cache.ping() is False
        assert cache.misconfigured is not None
        assert "REDIS_URL" in cache.misconfigured and "redis://host:port/0" in cache.misconfigured
        await cache.put("k", PATH)
        assert await cache.get("k") is None
        assert await cache.ping() is False  # stays off: the URL is what is wrong
    finally:
        await cache.close()
    host, port = single_redis.rsplit(":", 1)
    with redis.Redis(host=host, port=int(port)) as client:
        assert client.dbsize() == 0


async def test_a_plain_url_at_a_cluster_node_turns_the_cache_off_naming_the_fix(scaled_stack):
    """Found at the start (INFO cluster) or, where INFO is forbidden, at the first key
    the node redirects."""
    url = f"redis://{scaled_stack.redis_nodes[0]}/0"
    checked = RedisArtefactCache(url, 60, 1.0, 2.0)
    redirected = RedisArtefactCache(url, 60, 1.0, 2.0)
    try:
        await checked.check_kind()
        assert checked.misconfigured is not None
        assert "REDIS_URL" in checked.misconfigured
        assert "redis+cluster://host:port" in checked.misconfigured
        assert await checked.ping() is False

        keys = [f"{KEY_PREFIX}wrong-kind:{i}" for i in range(12)]  # some on other nodes
        for key in keys:
            await redirected.put(key, PATH)
        assert redirected.misconfigured is not None
        assert "redirected a key" in redirected.misconfigured
        assert [await redirected.get(key) for key in keys] == [None] * len(keys)
    finally:
        await checked.close()
        await redirected.close()


def test_a_gateway_given_a_cluster_url_for_a_single_redis_serves_uncached_saying_why(
    live_stack, tmp_path
):
    """The session stack's Redis is a single one: the gateway starts and serves, its
    cache health says NOT_SERVING, and its log names REDIS_URL and the fix."""
    url = live_stack.redis_url.replace("redis://", "redis+cluster://", 1)
    with stack.extra_gateway(live_stack, tmp_path, REDIS_URL=url) as gateway:
        assert health_status(gateway.target) == SERVING
        assert health_status(gateway.target, "propscope.cache") == NOT_SERVING
        image = scene_png(hue_deg=97.0, radius_px=12.0)
        with propscope.Client(gateway.target, timeout=300) as client:
            twice = [explain_hue(client, image) for _ in range(2)]
        assert [(r.cache_hits, r.cache_misses) for r in twice] == [(0, SAMPLES)] * 2
    errors = [line for line in gateway.log_file.read_text().splitlines() if "ERROR" in line]
    assert any("REDIS_URL" in line and "redis://host:port/0" in line for line in errors)


async def test_an_unreachable_cluster_only_costs_misses():
    """Not a wrong URL: Redis may come later, and the cache with it."""
    cache = RedisArtefactCache(f"redis+cluster://127.0.0.1:{stack.free_port()}", 60, 0.5, 3600)
    try:
        assert await cache.get("k") is None
        await cache.put("k", PATH)
        assert await cache.ping() is False
        assert cache.misconfigured is None
        assert not cache.available  # skipped until a ping answers
    finally:
        await cache.close()


def test_propscope_dev_scaled_stops_and_starts_one_node_and_keeps_scaled_json_true(
    scaled_stack,
):
    """The fault drill from a shell: `scaled stop redis 2` / `scaled start redis 2` on the
    stack's run dir; scaled.json follows, so `down` would stop the restarted node."""
    node, state = scaled_stack.redis_nodes[2], scaled_stack.run_dir / "scaled.json"

    def scaled(command: str) -> str:
        args = ["scaled", command, "redis", "2", "--run-dir", str(scaled_stack.run_dir)]
        result = CliRunner().invoke(dev_main.app, args)
        assert result.exit_code == 0, result.output
        return result.output

    try:
        assert scaled("stop") == f"redis 2 ({node}) stopped\n"
        assert scale_out.cluster_view(node) is None
        assert json.loads(state.read_text())["processes"]["redis"][2] is None
        assert scaled("start") == f"redis 2 ({node}) serving\n"
        assert scale_out.cluster_whole(scaled_stack.redis_nodes)
        recorded = json.loads(state.read_text())
        pid = recorded["processes"]["redis"][2]
        assert pid in recorded["pids"] and scale_out._ours(pid)
    finally:
        scaled("stop")  # the fixture's own process again: it stops what it started
        scaled_stack.start_redis(2)
    for target in scaled_stack.gateways:
        wait_until(lambda t=target: health_status(t, "propscope.cache") == SERVING)
