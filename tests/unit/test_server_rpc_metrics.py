"""The grpc_server_* metrics (api/rpc_metrics.py) on a real grpc.aio server in this
process: names, labels and values as go-grpc-prometheus writes them."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY

from propscope_server.api.rpc_metrics import GO_CODE_NAMES, RpcMetricsInterceptor, grpc_type
from propscope_server.api.servicer import _count_property_result
from propscope_server.domain import PropertyOutcome
from propscope_server.errors import FailedPrecondition

SERVICE = "test.v1.Probe"
# google.golang.org/grpc/codes, code_string.go: what go-grpc-prometheus writes in grpc_code.
GO_NAMES = (
    "OK Canceled Unknown InvalidArgument DeadlineExceeded NotFound AlreadyExists "
    "PermissionDenied ResourceExhausted FailedPrecondition Aborted OutOfRange Unimplemented "
    "Internal Unavailable DataLoss Unauthenticated"
).split()


def value(name: str, method: str, **labels: str) -> float:
    """The sum of the samples of `name` for this method that carry these labels."""
    wanted = {"grpc_service": SERVICE, "grpc_method": method, **labels}
    return sum(
        sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    )


async def ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field x: fix it")


async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("a bug")


async def write_three(request: bytes, context: grpc.aio.ServicerContext) -> None:
    for _ in range(3):
        await context.write(request)


async def yield_two(request: bytes, context: grpc.aio.ServicerContext):
    for _ in range(2):
        yield request


async def stall(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(request)
    context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
    context.set_details("the client took no message for send_timeout_s")


async def hang(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(request)
    await asyncio.Event().wait()


async def yield_forever(request: bytes, context: grpc.aio.ServicerContext):
    while True:
        yield request


async def echo_all(requests, context: grpc.aio.ServicerContext):
    async for request in requests:
        yield request


HANDLERS = {
    "Ok": grpc.unary_unary_rpc_method_handler(ok),
    "Refuse": grpc.unary_unary_rpc_method_handler(refuse),
    "Crash": grpc.unary_unary_rpc_method_handler(crash),
    "WriteThree": grpc.unary_stream_rpc_method_handler(write_three),
    "YieldTwo": grpc.unary_stream_rpc_method_handler(yield_two),
    "Stall": grpc.unary_stream_rpc_method_handler(stall),
    "Hang": grpc.unary_stream_rpc_method_handler(hang),
    "YieldForever": grpc.unary_stream_rpc_method_handler(yield_forever),
    "EchoAll": grpc.stream_stream_rpc_method_handler(echo_all),
}


@pytest.fixture
async def channel():
    server = grpc.aio.server(interceptors=[RpcMetricsInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as grpc_channel:
        yield grpc_channel
    await server.stop(0)


async def handled_soon(method: str, code: str, before: float) -> None:
    """The server records a cancelled call once its handler has unwound."""
    for _ in range(500):
        if value("grpc_server_handled_total", method, grpc_code=code) > before:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{method} was not counted {code}")


def test_grpc_code_values_are_gos_names():
    assert [GO_CODE_NAMES[code] for code in grpc.StatusCode] == GO_NAMES


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (FailedPrecondition("no effect on this image"), "FailedPrecondition"),
        (KeyError(), "Internal"),
    ],
)
def test_property_results_spell_failure_codes_as_grpc_code_does(error, status):
    def count() -> float:
        return (
            REGISTRY.get_sample_value(
                "propscope_property_results_total",
                {"model": "m", "status": status, "significant": "", "relevant": "", "flipped": ""},
            )
            or 0.0
        )

    before = count()
    _count_property_result("m", PropertyOutcome("hue", error=error))
    assert count() == before + 1


def test_grpc_type_is_the_contracts_not_the_handlers():
    # ParseRequestsInterceptor serves Explain as a bidirectional handler.
    assert grpc_type("/propscope.v1.ExplainService/Explain", True, True) == "server_stream"
    assert grpc_type("/propscope.v1.ExplainService/ListModels", False, False) == "unary"
    assert grpc_type("/grpc.health.v1.Health/Watch", False, True) == "server_stream"
    assert grpc_type(f"/{SERVICE}/Unknown", True, False) == "client_stream"


async def test_a_unary_call_is_started_handled_timed_and_its_messages_counted(channel):
    labels = {"grpc_type": "unary"}
    before = {
        name: value(name, "Ok", **labels)
        for name in (
            "grpc_server_started_total",
            "grpc_server_msg_received_total",
            "grpc_server_msg_sent_total",
            "grpc_server_handling_seconds_count",
        )
    }
    handled = value("grpc_server_handled_total", "Ok", grpc_code="OK", **labels)
    assert await channel.unary_unary(f"/{SERVICE}/Ok")(b"hi") == b"hi"
    for name, count in before.items():
        assert value(name, "Ok", **labels) == count + 1, name
    assert value("grpc_server_handled_total", "Ok", grpc_code="OK", **labels) == handled + 1


@pytest.mark.parametrize(
    ("method", "code", "status"),
    [
        ("Refuse", "InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT),
        ("Crash", "Unknown", grpc.StatusCode.UNKNOWN),
    ],
)
async def test_failed_calls_carry_their_status_in_gos_spelling(channel, method, code, status):
    before = value("grpc_server_handled_total", method, grpc_code=code, grpc_type="unary")
    with pytest.raises(grpc.RpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/{method}")(b"")
    assert caught.value.code() == status
    assert value("grpc_server_handled_total", method, grpc_code=code) == before + 1
    assert value("grpc_server_msg_sent_total", method) == 0


@pytest.mark.parametrize(("method", "messages"), [("WriteThree", 3), ("YieldTwo", 2)])
async def test_streamed_messages_are_counted_whether_written_or_yielded(channel, method, messages):
    before = value("grpc_server_msg_sent_total", method, grpc_type="server_stream")
    replies = [reply async for reply in channel.unary_stream(f"/{SERVICE}/{method}")(b"x")]
    assert len(replies) == messages
    assert value("grpc_server_msg_sent_total", method) == before + messages
    assert value("grpc_server_handled_total", method, grpc_code="OK") >= 1


async def test_a_code_set_without_abort_is_the_calls_status(channel):
    before = value("grpc_server_handled_total", "Stall", grpc_code="ResourceExhausted")
    call = channel.unary_stream(f"/{SERVICE}/Stall")(b"x")
    with pytest.raises(grpc.RpcError):
        [reply async for reply in call]
    assert value("grpc_server_handled_total", "Stall", grpc_code="ResourceExhausted") == before + 1


async def test_received_stream_messages_are_counted(channel):
    before = value("grpc_server_msg_received_total", "EchoAll", grpc_type="bidi_stream")
    replies = [r async for r in channel.stream_stream(f"/{SERVICE}/EchoAll")(iter([b"a", b"b"]))]
    assert replies == [b"a", b"b"]
    assert value("grpc_server_msg_received_total", "EchoAll", grpc_type="bidi_stream") == before + 2


async def test_cancelled_and_late_calls_are_canceled_and_deadline_exceeded(channel):
    hang_call = channel.unary_stream(f"/{SERVICE}/Hang")
    before = value("grpc_server_handled_total", "Hang", grpc_code="Canceled")
    call = hang_call(b"x")
    await call.read()
    call.cancel()
    await handled_soon("Hang", "Canceled", before)
    before = value("grpc_server_handled_total", "Hang", grpc_code="DeadlineExceeded")
    with pytest.raises(grpc.RpcError) as caught:
        [reply async for reply in hang_call(b"x", timeout=0.3)]
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await handled_soon("Hang", "DeadlineExceeded", before)


async def test_a_call_cancelled_while_its_generator_is_paused_at_yield_is_canceled(channel):
    before = value("grpc_server_handled_total", "YieldForever", grpc_code="Canceled")
    call = channel.unary_stream(f"/{SERVICE}/YieldForever")(b"x")
    await call.read()
    call.cancel()
    await handled_soon("YieldForever", "Canceled", before)


async def test_an_unregistered_method_makes_no_series(channel):
    with pytest.raises(grpc.RpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/NoSuchMethod")(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    names = {
        sample.labels.get("grpc_method")
        for family in REGISTRY.collect()
        if family.name.startswith("grpc_server")
        for sample in family.samples
    }
    assert "NoSuchMethod" not in names
