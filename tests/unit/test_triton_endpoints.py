"""The Triton endpoint pool without a Triton: PROPSCOPE_TRITON_URL parsing, DNS answers,
round robin, ejection and readmission on a fake clock, and TritonBackend spreading its
calls, retries, on-demand loads and sick-model reloads over fake clients. Two real
Tritons: tests/integration/test_scale_out_triton.py."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from propscope_server import metrics
from propscope_server.backends.triton import TritonBackend
from propscope_server.backends.triton_endpoints import (
    ERROR,
    MAX_REST_S,
    OK,
    UNAVAILABLE,
    TritonEndpoints,
    resolve,
)
from propscope_server.backends.triton_url import (
    TritonTarget,
    endpoint_addresses,
    parse_triton_url,
)
from propscope_server.config import Settings
from propscope_server.errors import Unavailable
from tests.unit.test_sick_backends import (
    DEAD_WORKER,
    FakeClient,
    Result,
    triton_error,
    until_healthy,
)

A, B, C = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"


@pytest.mark.parametrize(
    ("value", "target"),
    [
        ("127.0.0.1:8001", TritonTarget(addresses=("127.0.0.1:8001",))),
        (" a:1, b:2 ,c:3", TritonTarget(addresses=("a:1", "b:2", "c:3"))),
        ("[::1]:8001,triton:8001", TritonTarget(addresses=("[::1]:8001", "triton:8001"))),
        (
            "dns:///triton-headless.ns.svc:8001",
            TritonTarget(dns_host="triton-headless.ns.svc", dns_port=8001),
        ),
    ],
)
def test_the_url_names_one_triton_a_list_or_a_dns_name(value, target):
    assert parse_triton_url(value) == target


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("http://triton:8001", "'http://triton:8001'"),
        ("dns://resolver/triton:8001", "'dns://resolver/triton:8001'"),
        ("triton", "'triton' is not host:port"),
        ("a:1,", "'' is not host:port"),
        ("a:0", "'a:0' is not host:port"),
        ("a:65536", "'a:65536' is not host:port"),
        ("::1:8001", "'::1:8001' is not host:port"),
        ("dns:///triton", "'triton' is not host:port"),
        ("a:1,b:2,a:1", "names a:1 more than once"),
    ],
)
def test_a_bad_url_names_the_setting_the_wrong_part_and_the_forms(value, named):
    with pytest.raises(ValueError, match="PROPSCOPE_TRITON_URL") as caught:
        parse_triton_url(value)
    assert named in str(caught.value)
    with pytest.raises(ValueError, match="PROPSCOPE_TRITON_URL"):
        Settings(triton_url=value)


def test_dns_answers_become_endpoints_once_each_in_a_stable_order():
    tcp = (socket.SOCK_STREAM, 6, "")
    infos = [
        (socket.AF_INET, *tcp, ("10.0.0.2", 8001)),
        (socket.AF_INET6, *tcp, ("fd00::1", 8001, 0, 0)),
        (socket.AF_INET, *tcp, ("10.0.0.1", 8001)),
        (socket.AF_INET, *tcp, ("10.0.0.2", 8001)),
    ]
    assert endpoint_addresses(infos, 8001) == ["10.0.0.1:8001", "10.0.0.2:8001", "[fd00::1]:8001"]


async def test_a_real_name_resolves_to_its_addresses():
    assert "127.0.0.1:8001" in await resolve("localhost", 8001)


class Triton(FakeClient):
    """A fake Triton that can be stopped: every call then fails with UNAVAILABLE (a
    refused connection); models it has loaded, for load_on_demand."""

    def __init__(self, loaded: bool = True) -> None:
        super().__init__()
        self.up = True
        self.loaded = loaded
        self.closed = False

    def _answer(self, name: str, healthy: object, **kwargs) -> object:
        if not self.up:
            self.calls.append((name, kwargs))
            raise triton_error("UNAVAILABLE", "failed to connect to all addresses")
        return super()._answer(name, healthy, **kwargs)

    async def is_server_live(self, **kwargs):
        return self._answer("is_server_live", True, **kwargs)

    async def is_model_ready(self, name, version="", **kwargs):
        return self._answer("is_model_ready", self.loaded, **kwargs)

    async def infer(self, name, inputs, **kwargs):
        if not self.loaded:
            self._answer("infer", None, **kwargs)
            raise triton_error("UNAVAILABLE", f"Request for unknown model: '{name}' is not found")
        return await super().infer(name, inputs, **kwargs)

    async def load_model(self, name, **kwargs):
        answer = await super().load_model(name, **kwargs)
        self.loaded = True
        return answer

    async def close(self):
        self.closed = True

    def count(self, call: str) -> int:
        return sum(1 for name, _ in self.calls if name == call)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(tritons: dict[str, Triton], clock: Clock | None = None, **kwargs) -> TritonEndpoints:
    return TritonEndpoints(
        ",".join(tritons), connect=tritons.__getitem__, clock=clock or Clock(), **kwargs
    )


def up_gauge(address: str) -> float:
    return metrics.TRITON_ENDPOINT_UP.labels(endpoint=address)._value.get()


def calls(address: str, outcome: str) -> float:
    return metrics.TRITON_ENDPOINT_CALLS.labels(endpoint=address, outcome=outcome)._value.get()


async def picks(endpoints: TritonEndpoints, n: int) -> list[str]:
    return [(await endpoints.pick()).address for _ in range(n)]


async def test_calls_take_the_endpoints_in_turn():
    endpoints = pool({A: Triton(), B: Triton(), C: Triton()})
    chosen = await picks(endpoints, 6)
    assert sorted(chosen) == sorted([A, B, C] * 2)
    assert chosen[:3] == chosen[3:]  # a fixed turn, not chance
    assert metrics.TRITON_ENDPOINTS._value.get() == 3 and up_gauge(A) == 1


async def test_a_retry_goes_to_an_endpoint_the_call_has_not_tried():
    endpoints = pool({A: Triton(), B: Triton(), C: Triton()})
    for _ in range(3):
        first = await endpoints.pick()
        second = await endpoints.pick({first.address})
        third = await endpoints.pick({first.address, second.address})
        assert len({first.address, second.address, third.address}) == 3
        assert not endpoints.has_untried({first.address, second.address, third.address})


async def test_an_unavailable_endpoint_rests_then_a_probe_puts_it_back():
    clock, tritons = Clock(), {A: Triton(), B: Triton()}
    endpoints = pool(tritons, clock, retry_s=1.0)
    before = calls(A, UNAVAILABLE)
    tritons[A].up = False
    endpoints.finished(endpoints._endpoints[A], UNAVAILABLE)
    assert calls(A, UNAVAILABLE) == before + 1
    assert not endpoints.is_up(A) and up_gauge(A) == 0
    assert set(await picks(endpoints, 4)) == {B}

    # Resting: the health poll probes B only; then A, whose rest doubles while it fails.
    assert await endpoints.check()
    assert tritons[A].count("is_server_live") == 0 and tritons[B].count("is_server_live") == 1
    rests = []
    for _ in range(8):
        clock.now = endpoints._endpoints[A].probe_at
        await endpoints.check()
        rests.append(endpoints._endpoints[A].rest_s)
    assert rests == [2, 4, 8, 16, MAX_REST_S, MAX_REST_S, MAX_REST_S, MAX_REST_S]
    assert tritons[A].count("is_server_live") == 8

    tritons[A].up = True
    clock.now += MAX_REST_S
    assert await endpoints.check()
    assert endpoints.is_up(A) and up_gauge(A) == 1
    assert set(await picks(endpoints, 4)) == {A, B}


async def test_an_endpoint_failing_its_probe_leaves_the_rotation(caplog):
    tritons = {A: Triton(), B: Triton()}
    endpoints = pool(tritons)
    tritons[B].up = False
    assert await endpoints.check()  # live while one endpoint is
    # The log says why (a refused connection reads as a typo in PROPSCOPE_TRITON_URL or a
    # Triton down), not only that the probe failed.
    assert (
        f"Triton endpoint {B} is out of rotation: its liveness probe failed: failed to "
        "connect to all addresses (1 of 2 left in rotation)"
    ) in caplog.text
    assert not endpoints.is_up(B) and set(await picks(endpoints, 3)) == {A}
    tritons[A].up = False
    await endpoints.check()
    assert not await endpoints.check()


async def test_with_every_endpoint_out_calls_and_probes_still_reach_each():
    """One Triton behaves as without a pool: its calls are still sent while it is out,
    each health poll probes it, and a call that succeeds puts it back."""
    clock, tritons = Clock(), {A: Triton(), B: Triton()}
    endpoints = pool(tritons, clock)
    for address in (A, B):
        endpoints.finished(endpoints._endpoints[address], UNAVAILABLE)
    assert set(await picks(endpoints, 4)) == {A, B}
    for triton in tritons.values():
        triton.up = False
    assert not await endpoints.check()
    assert not await endpoints.check()  # no rest while none is in rotation
    assert [t.count("is_server_live") for t in tritons.values()] == [2, 2]
    endpoints.finished(endpoints._endpoints[B], OK)
    assert endpoints.is_up(B) and not endpoints.is_up(A)
    endpoints.finished(endpoints._endpoints[B], ERROR)  # a model's error: still in
    assert endpoints.is_up(B)


class Resolver:
    def __init__(self, *answers: list[str] | OSError) -> None:
        self.answers = list(answers)
        self.asked = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        assert (host, port) == ("triton-headless", 8001)
        self.asked += 1
        answer = self.answers[min(self.asked, len(self.answers)) - 1]
        if isinstance(answer, OSError):
            raise answer
        return answer


async def test_a_dns_name_is_resolved_again_each_interval_and_keeps_its_endpoints_on_failure():
    clock = Clock()
    tritons = {A: Triton(), B: Triton(), C: Triton()}
    resolver = Resolver([A, B], [B, C], socket.gaierror("Temporary failure"), [])
    endpoints = TritonEndpoints(
        "dns:///triton-headless:8001",
        resolve_interval_s=30.0,
        connect=tritons.__getitem__,
        resolver=resolver,
        clock=clock,
    )
    assert endpoints.addresses == []
    assert set(await picks(endpoints, 4)) == {A, B} and resolver.asked == 1
    retired = endpoints._endpoints[A]
    clock.now += 29
    await endpoints.pick()
    assert resolver.asked == 1
    clock.now += 1
    assert set(await picks(endpoints, 4)) == {B, C} and resolver.asked == 2
    assert not tritons[A].closed  # a call in flight on it may still end
    for _ in range(2):  # a failed resolution, then an empty one: the known ones stay
        clock.now += 30
        assert set(await picks(endpoints, 4)) == {B, C}
    assert resolver.asked == 4 and tritons[A].closed
    assert metrics.TRITON_ENDPOINTS._value.get() == 2
    endpoints.finished(retired, UNAVAILABLE)  # a call on it that ended late
    assert endpoints.addresses == [B, C] and not any(
        s.labels == {"endpoint": A} for s in metrics.TRITON_ENDPOINT_UP.collect()[0].samples
    )


async def test_a_dns_name_that_never_resolves_is_unavailable_naming_the_setting():
    endpoints = TritonEndpoints(
        "dns:///triton-headless:8001", resolver=Resolver(socket.gaierror("Name unknown"))
    )
    with pytest.raises(Unavailable, match="PROPSCOPE_TRITON_URL .*triton-headless"):
        await endpoints.pick()
    assert not await endpoints.check()
    empty = TritonEndpoints("dns:///triton-headless:8001", resolver=Resolver([]))
    with pytest.raises(Unavailable, match="resolves to no address"):
        await empty.pick()


async def test_a_dns_name_is_resolved_again_when_every_endpoint_is_out():
    clock, tritons = Clock(), {A: Triton(), B: Triton()}
    resolver = Resolver([A], [B])
    endpoints = TritonEndpoints(
        "dns:///triton-headless:8001",
        retry_s=1.0,
        connect=tritons.__getitem__,
        resolver=resolver,
        clock=clock,
    )
    assert await picks(endpoints, 2) == [A, A]
    endpoints.finished(endpoints._endpoints[A], UNAVAILABLE)
    clock.now += 1  # the rest, not the 30 s interval
    assert await picks(endpoints, 2) == [B, B] and resolver.asked == 2


IMAGE = {"IMAGE": np.zeros((1, 4, 4, 3), np.uint8)}


def backend_over(tritons: dict[str, Triton], **kwargs) -> TritonBackend:
    kwargs = {"retries": 2, "retry_backoff_s": 30.0, **kwargs}
    return TritonBackend(
        TritonEndpoints(",".join(tritons), connect=tritons.__getitem__), 300.0, **kwargs
    )


async def test_the_backend_spreads_inferences_over_every_endpoint():
    tritons = {A: Triton(), B: Triton()}
    backend = backend_over(tritons)
    before = {address: calls(address, OK) for address in tritons}
    model = await backend.describe("m")
    for _ in range(6):
        await backend.infer(model, IMAGE, ["LOGITS"], None)
    assert [t.count("infer") for t in tritons.values()] == [3, 3]
    assert sum(calls(address, OK) - before[address] for address in tritons) == 7  # + describe
    assert await backend.is_live()
    await backend.close()
    assert all(t.closed for t in tritons.values())


async def test_a_retry_after_unavailable_goes_at_once_to_the_other_endpoint():
    """The backoff (30 s here) is for a Triton retried alone; another endpoint is asked
    without it, and the one that failed gets no more calls while it rests."""
    tritons = {A: Triton(), B: Triton()}
    backend = backend_over(tritons)
    model = await backend.describe("m")
    tritons[A].up = False
    async with asyncio.timeout(5):
        for _ in range(4):
            await backend.infer(model, IMAGE, ["LOGITS"], None)
    assert tritons[A].count("infer") == 1 and tritons[B].count("infer") == 4
    assert not backend.endpoints.is_up(A)


async def test_one_triton_unavailable_is_still_retried_with_backoff_and_named(caplog):
    triton = Triton()
    backend = backend_over({A: triton}, retry_backoff_s=0.001)
    model = await backend.describe("m")
    triton.up = False
    named = f"(tried PROPSCOPE_TRITON_URL={A})"
    with pytest.raises(Unavailable) as caught:
        await backend.infer(model, IMAGE, ["LOGITS"], None)
    assert str(caught.value) == (
        "Triton is unreachable or overloaded (1 endpoint of the gateway's "
        "PROPSCOPE_TRITON_URL tried; its log names them); retry with backoff"
    )
    # One WARNING for the call (its retries are INFO), beside the endpoint's own.
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "propscope_server.backends.triton" and r.levelname == "WARNING"
    ]
    assert warnings == [
        f"Triton unreachable for model m {named}: failed to connect to all addresses"
    ]
    assert triton.count("infer") == 3  # retries=2: the only endpoint, tried again
    triton.up = True
    await backend.infer(model, IMAGE, ["LOGITS"], None)
    assert backend.endpoints.is_up(A)


async def test_every_endpoint_unreachable_names_the_setting_and_the_endpoints_tried(caplog):
    """A typo in PROPSCOPE_TRITON_URL reads as Tritons down: the caller's message names the
    setting and how many endpoints were tried (not their internal addresses); the gateway's
    one WARNING says which addresses."""
    tritons = {A: Triton(), B: Triton()}
    backend = backend_over(tritons, retries=1)
    model = await backend.describe("m")
    for triton in tritons.values():
        triton.up = False
    with pytest.raises(Unavailable) as caught:
        await backend.infer(model, IMAGE, ["LOGITS"], None)
    named = f"(tried {A}, {B} of PROPSCOPE_TRITON_URL={A},{B})"
    assert str(caught.value) == (
        "Triton is unreachable or overloaded (2 endpoints of the gateway's "
        "PROPSCOPE_TRITON_URL tried; its log names them); retry with backoff"
    )
    assert A not in str(caught.value)
    assert f"Triton unreachable for model m {named}: failed to connect" in caplog.text


async def test_a_load_on_demand_model_is_loaded_on_every_endpoint_and_on_one_restarted():
    tritons = {A: Triton(loaded=False), B: Triton(loaded=False)}
    backend = backend_over(tritons, load_on_demand=("m",))
    tritons[A].answers["get_model_metadata"] = triton_error(
        "UNAVAILABLE", "Request for unknown model: 'm' is not found"
    )
    tritons[B].answers = dict(tritons[A].answers)
    original_load = Triton.load_model

    async def load_model(triton: Triton, name, **kwargs):
        triton.answers.pop("get_model_metadata", None)
        return await original_load(triton, name, **kwargs)

    for triton in tritons.values():
        triton.load_model = load_model.__get__(triton)
    model = await backend.describe("m")
    assert [t.count("load_model") for t in tritons.values()] == [1, 1]

    tritons[B].loaded = False  # B restarted: its repository's on-demand models unloaded
    for _ in range(4):
        await backend.require_ready(model, None)
        await backend.infer(model, IMAGE, ["LOGITS"], None)
    assert [t.count("load_model") for t in tritons.values()] == [1, 2]
    await backend.close()


async def test_a_sick_model_is_reloaded_only_where_its_worker_died():
    tritons = {A: Triton(), B: Triton()}
    backend = backend_over(tritons, retries=0, heal_backoff_s=0.01)
    model = await backend.describe("m")
    tritons[B].answers["infer"] = triton_error("INTERNAL", DEAD_WORKER)

    async def reload_b(name, **kwargs):
        tritons[B].calls.append(("load_model", kwargs))
        tritons[B].answers.pop("infer")

    tritons[B].load_model = reload_b
    with pytest.raises(Unavailable, match="being restored"):
        for _ in range(2):
            await backend.infer(model, IMAGE, ["LOGITS"], None)
    await until_healthy(backend.model_health, "m")
    assert [t.count("load_model") for t in tritons.values()] == [0, 1]
    assert tritons[A].count("infer") >= 2 and tritons[B].count("infer") >= 3  # probes
    await backend.close()


class GatedTriton(Triton):
    """A Triton whose inferences (while it is up) wait for `gate`: a call in flight. Its
    closed channel cancels a call waiting on it, as grpc.aio's does."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0

    async def infer(self, name, inputs, **kwargs):
        if not self.up:
            return await super().infer(name, inputs, **kwargs)
        self.waiting += 1
        await self.gate.wait()
        if self.closed:
            raise asyncio.CancelledError
        self.calls.append(("infer", kwargs))
        return Result()


async def until_waiting(backend: TritonBackend, model, triton: GatedTriton) -> list[asyncio.Task]:
    """Inferences started until one waits on `triton` (round robin: at most one per endpoint)."""
    tasks = []
    async with asyncio.timeout(5):
        while not triton.waiting:
            tasks.append(asyncio.create_task(backend.infer(model, IMAGE, ["LOGITS"], None)))
            while not triton.waiting and not tasks[-1].done():
                await asyncio.sleep(0)
    return tasks


async def test_a_call_sent_before_its_endpoint_left_or_rejoined_does_not_move_it_again():
    """A draining Triton refuses new calls while one already on it ends well: that older
    success does not put it back. A call sent before a probe put an endpoint back that
    fails after it does not take it out again."""
    tritons = {A: GatedTriton(), B: Triton()}
    backend = backend_over(tritons)
    model = await backend.describe("m")
    in_flight = await until_waiting(backend, model, tritons[A])
    tritons[A].up = False
    for _ in range(2):
        await backend.infer(model, IMAGE, ["LOGITS"], None)
    assert not backend.endpoints.is_up(A)
    tritons[A].gate.set()
    await asyncio.gather(*in_flight)
    assert not backend.endpoints.is_up(A)

    clock, tritons = Clock(), {A: Triton(), B: Triton()}
    endpoints = pool(tritons, clock)
    a = endpoints._endpoints[A]
    endpoints.finished(a, UNAVAILABLE)
    with endpoints.calling(a) as sent:
        clock.now = a.probe_at
        assert await endpoints.check() and endpoints.is_up(A)
        endpoints.finished(a, UNAVAILABLE, sent)
    assert endpoints.is_up(A)


async def test_a_retired_endpoints_channel_closes_only_once_no_call_is_on_it():
    """An address gone from DNS while a long inference is on it: the inference ends as it
    would (closing its channel under it would cancel it), the channel closes at the first
    resolution after, and the endpoint's series leave the metrics then."""
    clock = Clock()
    tritons = {A: GatedTriton(), B: Triton()}
    resolver = Resolver([A, B], [B])
    endpoints = TritonEndpoints(
        "dns:///triton-headless:8001",
        connect=tritons.__getitem__,
        resolver=resolver,
        clock=clock,
    )
    backend = TritonBackend(endpoints, 300.0)
    model = await backend.describe("m")
    in_flight = await until_waiting(backend, model, tritons[A])
    for _ in range(2):  # A leaves the records, then a resolution finds it still busy
        clock.now += 30
        await endpoints.pick()
    assert endpoints.addresses == [B] and not tritons[A].closed
    tritons[A].gate.set()
    await asyncio.gather(*in_flight)
    assert tritons[A].count("infer") == 1
    clock.now += 30
    await endpoints.pick()
    assert tritons[A].closed
    assert not any(
        s.labels["endpoint"] == A for s in metrics.TRITON_ENDPOINT_CALLS.collect()[0].samples
    )
    await backend.close()


async def test_a_resolution_that_does_not_answer_is_bounded():
    """A DNS server that does not answer fails a name never resolved (UNAVAILABLE) and
    keeps the known endpoints, within the probe timeout, instead of holding the call; the
    next resolution waits on the lookup still out instead of starting another thread."""
    lookups = []

    async def silent(host: str, port: int) -> list[str]:
        lookups.append(host)
        await asyncio.Event().wait()
        return []

    clock = Clock()
    endpoints = TritonEndpoints(
        "dns:///triton-headless:8001", resolver=silent, clock=clock, probe_timeout_s=0.01
    )
    async with asyncio.timeout(10):
        for _ in range(2):
            with pytest.raises(Unavailable, match="resolving triton-headless failed"):
                await endpoints.pick()
            clock.now += 1
        assert not await endpoints.check()
    assert len(lookups) == 1
    await endpoints.close()

    clock, tritons = Clock(), {A: Triton()}
    answers = Resolver([A])

    async def first_then_silent(host: str, port: int) -> list[str]:
        if answers.asked:
            return await silent(host, port)
        return await answers(host, port)

    endpoints = TritonEndpoints(
        "dns:///triton-headless:8001",
        connect=tritons.__getitem__,
        resolver=first_then_silent,
        clock=clock,
        probe_timeout_s=0.01,
    )
    async with asyncio.timeout(10):
        assert (await endpoints.pick()).address == A
        clock.now += 30
        assert (await endpoints.pick()).address == A
    await endpoints.close()


class SlowLiveTriton(Triton):
    """A Triton whose liveness probes wait for `gate`; its closed channel cancels a probe
    waiting on it, as grpc.aio's does."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def is_server_live(self, **kwargs):
        await self.gate.wait()
        if self.closed:
            raise asyncio.CancelledError
        return await super().is_server_live(**kwargs)


async def test_a_probe_out_on_an_endpoint_that_leaves_dns_ends_as_a_probe():
    """The health poll's probes may be out (up to the probe timeout) while the address
    leaves the records and the next resolution comes: its channel stays open for the probe,
    so the poll gets an answer instead of a cancellation that would end it."""
    clock = Clock()
    tritons = {A: SlowLiveTriton(), B: Triton()}
    endpoints = TritonEndpoints(
        "dns:///triton-headless:8001",
        connect=tritons.__getitem__,
        resolver=Resolver([A, B], [B]),
        clock=clock,
    )
    await endpoints.pick()
    poll = asyncio.create_task(endpoints.check())
    await asyncio.sleep(0)
    for _ in range(2):
        clock.now += 30
        await endpoints.pick()
    tritons[A].gate.set()
    async with asyncio.timeout(5):
        assert await poll
    clock.now += 30
    await endpoints.pick()
    assert tritons[A].closed
