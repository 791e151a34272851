"""The Python SDK on the real stack: AsyncClient makes Client's calls with the same answers,
``explain(...).result()`` gathers a whole call, a mapping names the properties and a refusal's
field violations are typed."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import propscope
from tests.integration.conftest import SAMPLE, scene_png

PROPERTIES = {
    "object_hue": "procedural:operation=hue,region=object",
    "background_brightness": "procedural:operation=brightness,region=background,amount=0.2",
}
# Fixed, short paths: the answers are deterministic and cheap.
EXPLAIN = {"steps": 8, "seed": 0, "path_mode": "fixed"}
SOBOL = {"grid_size": 4, "nb_design": 8, "seed": 0}


def _decisions(result: propscope.ExplainResult) -> dict[str, tuple]:
    """What a property's answer is, without its cache counters (the second call hits the
    cache the first filled)."""
    return {
        r.property_name: (r.score, r.p_value, r.significant, r.relevant, r.decision)
        for r in result.properties
    }


async def test_async_explain_answers_as_the_sync_client(client, live_stack):
    image = scene_png(hue_deg=5.0)
    expected = client.explain(image, "synth_hue", PROPERTIES, **EXPLAIN).result()
    async with propscope.AsyncClient(live_stack.gateway, timeout=300) as aclient:
        stream = aclient.explain(image, "synth_hue", PROPERTIES, **EXPLAIN)
        kinds = [type(event) async for event in stream]
        result = await stream.result()
    assert kinds[0] is propscope.Accepted and kinds[-1] is propscope.Done
    assert kinds.count(propscope.PropertyResult) == 2
    assert result.accepted.property_names == tuple(PROPERTIES)
    assert [r.property_name for r in result.properties] == list(PROPERTIES)
    assert result.ok and result.done.properties_failed == 0 and result.done.total_ms > 0
    # The hue-biased model's hue bias, found through both clients alike.
    assert result["object_hue"].relevant and result["object_hue"].prediction_flipped
    assert not result["background_brightness"].prediction_flipped
    assert _decisions(result) == _decisions(expected)


async def test_async_attribute_evaluate_and_list_models(client, live_stack):
    # An image no other test explains: the async call computes the map, the sync one reads it
    # from the cache.
    image = scene_png(hue_deg=117.0, patch=True)
    progress: list[propscope.AttributionProgress] = []
    async with propscope.AsyncClient(live_stack.gateway, timeout=300) as aclient:
        found = await aclient.attribute(image, "synth_patch", on_progress=progress.append, **SOBOL)
        evaluation = await aclient.evaluate_attribution(
            image, "synth_patch", found, metrics=["deletion"], steps=4
        )
        models = {m.name: m for m in await aclient.list_models()}
    expected = client.attribute(image, "synth_patch", **SOBOL)
    assert (found.cache_hit, expected.cache_hit) == (False, True)
    np.testing.assert_array_equal(found.map, expected.map)
    assert found.map.shape == (64, 64) and found.options == expected.options
    assert progress[-1].done == progress[-1].total == found.forward_passes == 8 * (4 * 4 + 2)
    assert evaluation.metrics == ("deletion",) and np.isfinite(evaluation["deletion"].value)
    assert models["synth_hue"].is_classifier and not models["procedural"].is_classifier


async def test_async_eva_map_and_its_bounds_as_the_sync_client(client, live_stack):
    """EVA through both clients: the verified bounds bracket the sampled overlap, and the map
    is the bound's drop when each cell is held fixed."""
    image = scene_png(hue_deg=131.0, patch=True)
    eva = {"method": "eva", "grid_size": 4, "samples": 16, "epsilon": 2 / 255, "seed": 0}
    async with propscope.AsyncClient(live_stack.gateway, timeout=300) as aclient:
        found = await aclient.attribute(image, "synth_patch", **eva)
    expected = client.attribute(image, "synth_patch", **eva)
    assert (found.cache_hit, expected.cache_hit) == (False, True)
    np.testing.assert_array_equal(found.grid, expected.grid)
    assert found.eva == expected.eva and found.options == expected.options
    bounds = found.eva
    assert found.method == "eva" and bounds.guaranteed and bounds.bound == "crown"
    assert bounds.bound_passes == 4 * 4 + 1 and bounds.region_bounds.shape == (4, 4)
    assert bounds.sampled_overlap <= bounds.overlap_bound
    assert bounds.certified == (bounds.overlap_bound < 0)
    np.testing.assert_allclose(
        found.grid, bounds.overlap_bound - bounds.region_bounds, rtol=1e-5, atol=1e-5
    )


async def test_async_refusal_carries_typed_field_violations(live_stack):
    async with propscope.AsyncClient(live_stack.gateway, timeout=60) as aclient:
        with pytest.raises(propscope.PropscopeError) as caught:
            await aclient.explain(
                SAMPLE.read_bytes(), "synth_hue", {"hue": "procedural:operation=hue"}, steps=1
            ).result()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = caught.value.field_violations
    assert isinstance(violation, propscope.FieldViolation)
    assert violation.field == "steps" and "steps must be in 2..256" in violation.description
