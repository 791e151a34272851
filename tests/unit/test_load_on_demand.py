"""The gateway loads a model the setting load_on_demand names when a request first names
it (the dev stack leaves the MeGe/ReCo fold models unloaded at Triton's start), once for
requests that ask together; any other unloaded model is refused as before."""

from __future__ import annotations

import asyncio

import pytest

from propscope_server.backends.triton import TritonBackend
from propscope_server.errors import FailedPrecondition
from tests.unit.test_sick_backends import FakeClient, fake, over, triton_error


class UnloadedClient(FakeClient):
    """Triton's repository holds model `m` but serves it only once load_model ran."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded = False

    async def get_model_metadata(self, name, version="", **kwargs):
        if not self.loaded:
            self.calls.append(("get_model_metadata", {}))
            raise triton_error("UNAVAILABLE", f"Request for unknown model: '{name}' is not found")
        return await super().get_model_metadata(name, version, **kwargs)

    async def get_model_repository_index(self, **kwargs):
        state = "READY" if self.loaded else "UNAVAILABLE"
        reason = "" if self.loaded else "unloaded"
        return {"models": [{"name": "m", "version": "1", "state": state, "reason": reason}]}

    async def is_model_ready(self, name, version="", **kwargs):
        return self.loaded

    async def load_model(self, name, **kwargs):
        await asyncio.sleep(0.01)
        self.loaded = True
        return await super().load_model(name, **kwargs)


def backend_with(load_on_demand: tuple[str, ...]) -> TritonBackend:
    return TritonBackend(over(UnloadedClient()), 300.0, retries=0, load_on_demand=load_on_demand)


async def test_a_named_model_is_loaded_once_for_concurrent_requests() -> None:
    backend = backend_with(("m",))
    try:
        first, second = await asyncio.gather(backend.describe("m"), backend.describe("m"))
        assert first.name == second.name == "m"
        loads = [call for call, _ in fake(backend).calls if call == "load_model"]
        assert loads == ["load_model"]
    finally:
        await backend.close()


async def test_a_model_the_setting_does_not_name_stays_unloaded() -> None:
    backend = backend_with(())
    try:
        with pytest.raises(FailedPrecondition, match="UNAVAILABLE: unloaded"):
            await backend.describe("m")
        assert not fake(backend).loaded
    finally:
        await backend.close()
