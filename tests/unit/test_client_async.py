"""AsyncClient against the in-process fake services: the same calls as Client, with the same
arguments, results and errors (pure client logic; test_sdk.py runs it on the real stack)."""

import asyncio
import inspect

import grpc
import numpy as np
import pytest

from propscope import (
    Accepted,
    AsyncClient,
    Client,
    Done,
    Progress,
    PropertyResult,
    PropscopeError,
)
from tests.unit.test_client_attribution import (
    HEIGHT,
    WIDTH,
    _image_bytes,
    _map_values,
    _recording_calls,
)
from tests.unit.test_client_results import services  # noqa: F401 - the fixture

PUBLIC_CALLS = ("explain", "attribute", "evaluate_attribution", "list_models")


def test_the_async_client_takes_the_same_arguments():
    for name in PUBLIC_CALLS:
        sync, aio = (
            inspect.signature(getattr(Client, name)),
            inspect.signature(getattr(AsyncClient, name)),
        )
        assert list(sync.parameters.values()) == list(aio.parameters.values()), name
    assert inspect.signature(Client.__init__) == inspect.signature(AsyncClient.__init__)


async def test_explain_streams_and_results_as_the_sync_client_does(services):  # noqa: F811
    explain, _, target = services
    properties = {"hue": "procedural:operation=hue", "bad": "nope"}
    async with AsyncClient(target, metadata=[("x-trace", "abc")], timeout=30) as client:
        events = [e async for e in client.explain(_image(), "resnet", properties, seed=5)]
        result = await client.explain(_image(), "resnet", properties, seed=5).result()
    with Client(target) as sync_client:
        expected = sync_client.explain(_image(), "resnet", properties, seed=5).result()
    kinds = [type(e) for e in events]
    assert kinds == [Accepted, Progress, PropertyResult, Progress, PropertyResult, Done]
    assert result == expected
    assert [r.property_name for r in result.failed] == ["bad"]
    assert result["hue"].samples[0].seed == 5
    assert explain.metadata[0]["x-trace"] == "abc"
    assert 25 < explain.deadlines[0] <= 31


async def test_attribute_evaluate_and_list_models(services):  # noqa: F811
    _, _, target = services
    progress = []
    async with AsyncClient(target) as client:
        found = await client.attribute(
            _image_bytes(), "resnet", grid_size=4, on_progress=progress.append
        )
        evaluation = await client.evaluate_attribution(
            _image_bytes(), "resnet", found, metrics=["deletion"]
        )
        models = await client.list_models()
    with Client(target) as sync_client:
        assert found == sync_client.attribute(_image_bytes(), "resnet", grid_size=4)
        assert models == sync_client.list_models()
    assert found.map.shape == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(found.map, _map_values(HEIGHT, WIDTH))
    assert [p.done for p in progress] == [found.forward_passes // 2, found.forward_passes]
    assert evaluation["deletion"].value == pytest.approx(0.000123456789)
    assert models and models[0].name == "resnet"


async def test_an_eva_map_and_its_bounds_as_the_sync_client_reads_them(services):  # noqa: F811
    _, _, target = services
    eva = {"method": "eva", "grid_size": 2, "hybrid_layer": "features.3", "samples": 4}
    async with AsyncClient(target) as client:
        found = await client.attribute(_image_bytes(), "resnet", **eva)
        with pytest.raises(ValueError, match=r"epsilon \(--epsilon\) must be in"):
            client.attribute(_image_bytes(), "resnet", method="eva", epsilon=2.0)
    with Client(target) as sync_client:
        assert found == sync_client.attribute(_image_bytes(), "resnet", **eva)
    assert found.eva.region_bounds.shape == (2, 2) and not found.eva.guaranteed


async def test_errors_are_propscope_errors_with_their_details(services):  # noqa: F811
    _, _, target = services
    async with AsyncClient(target) as client:
        with pytest.raises(PropscopeError) as refused:
            await client.attribute(_image_bytes(), "refused", nb_design=16)
        with pytest.raises(PropscopeError) as midway:
            await client.explain(_image(), "fail-midway", ["a=ed"]).result()
        with pytest.raises(PropscopeError) as incomplete:
            await client.attribute(_image_bytes(), "no-result")
        with pytest.raises(PropscopeError) as denied:
            await client.list_models(metadata=[("x-fail", "1")])
    assert refused.value.field_violations[0].field == "sobol.nb_design"
    assert (midway.value.code, midway.value.message) == (
        grpc.StatusCode.UNAVAILABLE,
        "triton went away",
    )
    assert incomplete.value.code == grpc.StatusCode.INTERNAL
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_bad_arguments_raise_when_called_before_anything_is_sent(services):  # noqa: F811
    explain, attribution, target = services
    client = AsyncClient(target)
    with pytest.raises(ValueError, match="invalid property"):
        client.explain(_image(), "resnet", ["nonsense"])
    with pytest.raises(ValueError, match="power of two"):
        client.attribute(_image_bytes(), "resnet", nb_design=24)
    await client.close()
    await client.close()
    with pytest.raises(ValueError, match="closed"):
        client.list_models()
    assert explain.requests == attribution.requests == []


async def test_leaving_early_cancels_the_call(services):  # noqa: F811
    explain, attribution, target = services
    async with AsyncClient(target) as client:
        stream = client.explain(_image(), "endless", ["a=ed"])
        await anext(stream)
        await stream.aclose()
        with pytest.raises(ValueError, match="closed before its end"):
            await stream.result()
        running = asyncio.Event()
        task = asyncio.create_task(
            client.attribute(_image_bytes(), "endless", on_progress=lambda _: running.set())
        )
        await running.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await asyncio.to_thread(explain.cancelled.wait, 10)
    assert await asyncio.to_thread(attribution.cancelled.wait, 10)


async def test_a_failing_progress_callback_cancels_the_call_before_it_raises(
    services,  # noqa: F811
    monkeypatch,
):
    _, attribution, target = services

    def stop(update):
        raise KeyboardInterrupt

    async with AsyncClient(target) as client:
        started = _recording_calls(client._attribution, "Attribute", monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            await client.attribute(_image_bytes(), "endless", on_progress=stop)
        assert started[0].cancelled()  # now, not once the loop finalises the stream
    assert await asyncio.to_thread(attribution.cancelled.wait, 10)


async def test_closing_a_stream_another_task_reads_cancels_the_call(services):  # noqa: F811
    explain, _, target = services
    async with AsyncClient(target) as client:
        stream = client.explain(_image(), "silent", ["a=ed"])
        await anext(stream)
        reading = asyncio.create_task(stream.result())
        await asyncio.sleep(0)  # the reader runs until it waits inside the stream
        await stream.aclose()
        with pytest.raises(PropscopeError) as info:
            await reading
    assert info.value.code == grpc.StatusCode.CANCELLED
    assert await asyncio.to_thread(explain.cancelled.wait, 10)


async def test_calls_the_client_cancels_raise_propscope_error_cancelled(services):  # noqa: F811
    # grpc.aio raises a bare CancelledError in a call cancelled on the client's side; the sync
    # client raises PropscopeError CANCELLED, and so must this one (its task goes on).
    explain, _, target = services
    client = AsyncClient(target)
    stream = client.explain(_image(), "endless", ["a=ed"])
    await anext(stream)
    running = asyncio.Event()
    attributing = asyncio.create_task(
        client.attribute(_image_bytes(), "endless", on_progress=lambda _: running.set())
    )
    await running.wait()
    listing = asyncio.create_task(client.list_models(metadata=[("x-hang", "1")]))
    assert await asyncio.to_thread(explain.listing.wait, 10)
    explaining = asyncio.create_task(stream.result())
    await client.close()
    for task in (explaining, attributing, listing):
        with pytest.raises(PropscopeError) as info:
            await task
        assert info.value.code == grpc.StatusCode.CANCELLED


def _image() -> np.ndarray:
    return np.full((8, 8, 3), 200, dtype=np.uint8)
