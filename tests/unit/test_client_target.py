"""Gateway targets of the SDK and the CLI: the forms a target takes (the same cases as the Node
client, client/node/test/target-cases.json), and calls spreading over two in-process
ExplainServices on loopback while a single address keeps today's channel."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import pydantic
import pytest
from typer.testing import CliRunner

from propscope import AsyncClient, Client
from propscope._requests import DEFAULT_CHANNEL_OPTIONS
from propscope._target import (
    ROUND_ROBIN_SERVICE_CONFIG,
    Target,
    balancing_options,
    loopback_only,
    parse_target,
)
from propscope.cli import app
from propscope.review.spec import ServiceSpec
from propscope.v1 import explain_pb2, explain_pb2_grpc

CASES = json.loads(
    (Path(__file__).resolve().parents[2] / "client/node/test/target-cases.json").read_text()
)
runner = CliRunner()


@pytest.mark.parametrize(("text", "expected"), CASES["valid"], ids=[c[0] for c in CASES["valid"]])
def test_valid_targets(text: str, expected: dict) -> None:
    assert parse_target(text) == Target(
        expected["address"], tuple(expected["hosts"]), expected["balanced"]
    )


@pytest.mark.parametrize(("text", "words"), CASES["invalid"], ids=[c[0] for c in CASES["invalid"]])
def test_invalid_targets_say_what_to_write(text: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_target(text)
    assert words in str(info.value)


def test_only_several_gateways_get_round_robin() -> None:
    assert balancing_options(parse_target("localhost:50051")) == []
    assert balancing_options(parse_target("10.0.0.1:1,10.0.0.2:1")) == [
        ("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG)
    ]
    assert json.loads(ROUND_ROBIN_SERVICE_CONFIG) == {"loadBalancingConfig": [{"round_robin": {}}]}


def test_loopback_only() -> None:
    assert loopback_only(parse_target("127.0.0.1:1,127.0.0.1:2"))
    assert loopback_only(parse_target("[::1]:50051"))
    assert not loopback_only(parse_target("127.0.0.1:1,10.0.0.2:1"))
    assert not loopback_only(parse_target("dns:///gateway:50051"))


class Counting(explain_pb2_grpc.ExplainServiceServicer):
    """Answers ListModels with one model named after the server, counting the calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def ListModels(self, request, context):
        self.calls += 1
        return explain_pb2.ListModelsResponse(models=[explain_pb2.ModelInfo(name=self.name)])


@pytest.fixture
def two_gateways():
    """Two ExplainServices on loopback ports: (servicers, servers, their addresses)."""
    servicers, servers, addresses = [], [], []
    for name in ("a", "b"):
        servicer = Counting(name)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        explain_pb2_grpc.add_ExplainServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servicers.append(servicer)
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    yield servicers, servers, addresses
    for server in servers:
        server.stop(grace=None)


@pytest.mark.parametrize("form", ["list", "ipv4"])
def test_calls_of_one_client_spread_over_the_gateways(two_gateways, form: str) -> None:
    servicers, _, addresses = two_gateways
    target = ",".join(addresses) if form == "list" else "ipv4:" + ",".join(addresses)
    with Client(target, timeout=30) as client:
        # Until both connections are up (round_robin picks among the ready ones), then in turn.
        first = [client.list_models()[0].name]
        while set(first) != {"a", "b"} and len(first) < 1000:
            first.append(client.list_models()[0].name)
        answered = Counter(client.list_models()[0].name for _ in range(10))
    assert answered == Counter({"a": 5, "b": 5}), (first, answered)
    assert sum(s.calls for s in servicers) == len(first) + 10


def test_async_calls_spread_over_the_gateways(two_gateways) -> None:
    _, _, addresses = two_gateways

    async def names() -> Counter:
        async with AsyncClient(",".join(addresses), timeout=30) as client:
            first = [(await client.list_models())[0].name]
            while set(first) != {"a", "b"} and len(first) < 1000:
                first.append((await client.list_models())[0].name)
            return Counter([(await client.list_models())[0].name for _ in range(10)])

    assert asyncio.run(names()) == Counter({"a": 5, "b": 5})


def test_a_gateway_down_leaves_the_calls_to_the_other(two_gateways) -> None:
    servicers, servers, addresses = two_gateways
    servers[1].stop(grace=None)
    with Client(",".join(addresses), timeout=30) as client:
        answered = Counter(client.list_models()[0].name for _ in range(10))
    assert answered == Counter({"a": 10})


def test_a_single_address_keeps_todays_channel(monkeypatch, two_gateways) -> None:
    opened = []
    real = grpc.insecure_channel
    monkeypatch.setattr(
        grpc, "insecure_channel", lambda t, options: opened.append((t, options)) or real(t, options)
    )
    _, _, addresses = two_gateways
    with Client(addresses[0], options=[("grpc.keepalive_time_ms", 10_000)]) as client:
        assert client.list_models()[0].name == "a"
    with Client(",".join(addresses), options=[("grpc.keepalive_time_ms", 10_000)]) as client:
        client.list_models()
    keepalive = ("grpc.keepalive_time_ms", 10_000)
    assert opened[0] == (addresses[0], [*DEFAULT_CHANNEL_OPTIONS, keepalive])
    # A list keeps the defaults and the caller's options, and adds round_robin.
    assert opened[1][0] == "ipv4:" + ",".join(addresses)
    assert sorted(opened[1][1]) == sorted(
        [*DEFAULT_CHANNEL_OPTIONS, keepalive, ("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG)]
    )


def test_a_callers_service_config_wins(two_gateways) -> None:
    _, _, addresses = two_gateways
    mine = ("grpc.service_config", '{"loadBalancingConfig": [{"pick_first": {}}]}')
    with Client(",".join(addresses), options=[mine], timeout=30) as client:
        answered = Counter(client.list_models()[0].name for _ in range(10))
    assert len(answered) == 1, answered


def test_a_token_to_gateways_off_loopback_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="propscope._client"):
        Client("127.0.0.1:1,127.0.0.1:2", token="t").close()
        assert not caplog.records
        Client("127.0.0.1:1,10.0.0.2:2", token="t").close()
    assert "sending a bearer token to 127.0.0.1:1,10.0.0.2:2" in caplog.text


def test_cli_spreads_over_a_list_and_refuses_host_names(two_gateways) -> None:
    servicers, _, addresses = two_gateways
    result = runner.invoke(app, ["models", "--target", ",".join(addresses), "--json"])
    assert result.exit_code == 0, result.output
    assert sum(s.calls for s in servicers) == 1
    result = runner.invoke(app, ["models"], env={"PROPSCOPE_TARGET": "gw-a:1,gw-b:1"})
    assert result.exit_code == 2
    assert result.stderr.startswith("propscope: error: --target (or $PROPSCOPE_TARGET): target ")
    assert "dns:///gw-a:1" in result.stderr and "Traceback" not in result.output


def test_cli_with_every_gateway_down_asks_whether_they_run() -> None:
    result = runner.invoke(app, ["models", "--target", "127.0.0.1:1,127.0.0.1:2", "--timeout", "5"])
    assert result.exit_code == 2
    assert result.stderr.startswith("propscope: error: 127.0.0.1:1,127.0.0.1:2: UNAVAILABLE")
    assert "is the gateway running at 127.0.0.1:1,127.0.0.1:2?" in result.stderr


def test_a_review_specs_target_is_checked_with_the_spec() -> None:
    assert ServiceSpec(target="10.0.0.1:50051,10.0.0.2:50051").target.startswith("10.0.0.1")
    with pytest.raises(pydantic.ValidationError, match="dns:///gw-a:1"):
        ServiceSpec(target="gw-a:1,gw-b:1")
