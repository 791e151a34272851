"""One result per call (``explain(...).result()``), mappings of properties and typed field
violations, against the in-process fake services of test_client_rpc and test_client_attribution
(pure client logic)."""

import json
from concurrent import futures

import grpc
import numpy as np
import pytest

from propscope import (
    Accepted,
    Client,
    Done,
    ExplainResult,
    FieldViolation,
    Progress,
    Property,
    PropertyResult,
    PropscopeError,
)
from propscope._requests import build_explain_request
from propscope._results import ExplainCollector
from propscope.v1 import attribution_pb2_grpc, explain_pb2_grpc
from tests.unit.test_client_attribution import FakeAttribution
from tests.unit.test_client_rpc import FakeService


@pytest.fixture
def services():
    """Both fakes on one server: (explain service, attribution service, target)."""
    explain, attribution = FakeService(), FakeAttribution()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    explain_pb2_grpc.add_ExplainServiceServicer_to_server(explain, server)
    attribution_pb2_grpc.add_AttributionServiceServicer_to_server(attribution, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield explain, attribution, f"127.0.0.1:{port}"
    server.stop(grace=None)


def _image() -> np.ndarray:
    return np.full((8, 8, 3), 200, dtype=np.uint8)


def test_result_holds_the_plan_every_property_and_the_timings(services):
    explain, _, target = services
    properties = {"hue": "procedural:operation=hue", "bad": "nope", "blur": "procedural"}
    with Client(target) as client:
        result = client.explain(_image(), "resnet", properties, request_id="r1").result()
    assert isinstance(result, ExplainResult)
    assert result.request_id == "r1"
    assert result.accepted.property_names == ("hue", "bad", "blur")
    # In the plan's order, the failed one included.
    assert [r.property_name for r in result.properties] == ["hue", "bad", "blur"]
    assert result["blur"].score == pytest.approx(0.3)
    assert not result.ok and [r.property_name for r in result.failed] == ["bad"]
    assert result["bad"].error == "unknown editor"
    assert result.done.total_ms == 12.0 and result.done.properties_failed == 1
    with pytest.raises(KeyError, match="no property 'hues'; explained: hue, bad, blur"):
        result["hues"]
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["properties"][0]["property_name"] == "hue"
    assert as_json["done"]["total_ms"] == 12.0
    assert explain.requests[0].properties[0].editor.parameters == {"operation": "hue"}


def test_result_after_reading_some_events_keeps_them(services):
    _, _, target = services
    with Client(target) as client:
        stream = client.explain(_image(), "resnet", ["a=ed", "b=ed"])
        seen = [next(stream), next(stream), next(stream)]
        result = stream.result()
        assert [type(e) for e in seen] == [Accepted, Progress, PropertyResult]
        assert result.properties[0] is seen[2]
        assert [r.property_name for r in result.properties] == ["a", "b"]
        # Read to its end: a second result() is the same, with no call.
        assert stream.result() == result


def test_result_raises_the_call_failure_also_after_iterating(services):
    _, _, target = services
    with Client(target) as client:
        with pytest.raises(PropscopeError) as direct:
            client.explain(_image(), "fail-midway", ["a=ed"]).result()
        stream = client.explain(_image(), "fail-midway", ["a=ed"])
        with pytest.raises(PropscopeError):
            list(stream)
        with pytest.raises(PropscopeError) as again:
            stream.result()
        closed = client.explain(_image(), "endless", ["a=ed"])
        next(closed)
        closed.close()
        with pytest.raises(ValueError, match="closed before its end"):
            closed.result()
    assert direct.value.code == again.value.code == grpc.StatusCode.UNAVAILABLE
    assert again.value.message == "triton went away"


def test_a_stream_without_its_end_or_a_planned_result_is_a_server_fault():
    accepted = Accepted("r", ("a", "b"), 1, 4, 0, 0.01, "1", 4, 4, 0.05)
    done = Done("r", 1.0, 0.5, 0.2, 0.1, 0.0, 0)
    collector = ExplainCollector()
    collector.add(accepted)
    with pytest.raises(PropscopeError, match="without the plan and its end") as no_done:
        collector.result()
    collector.add(done)
    with pytest.raises(PropscopeError, match="without the results of a, b") as missing:
        collector.result()
    assert no_done.value.code == missing.value.code == grpc.StatusCode.INTERNAL


def test_a_mapping_of_properties_names_each_spec():
    hue = Property("hue", editor="procedural", parameters={"operation": "hue"})
    request = build_explain_request(
        _image(),
        "resnet",
        {"object_hue": "procedural:operation=hue;box=0,0,0.5,0.5", "hue": hue},
    )
    first, second = request.properties
    assert (first.name, first.editor.model) == ("object_hue", "procedural")
    assert first.editor.parameters == {"operation": "hue"}
    assert first.region.box.right == pytest.approx(0.5)
    assert second == hue.to_proto()


@pytest.mark.parametrize(
    ("properties", "error", "message"),
    [
        ({"hue": Property("tint", editor="procedural")}, ValueError, "is a Property named 'tint'"),
        ({"hue": 3}, TypeError, r"properties\['hue'\] must be a str .*without the name"),
        ({1: "procedural"}, TypeError, "names .* must be str"),
        ({"hue": "procedural:"}, ValueError, "no parameters after ':'"),
        ({}, ValueError, "at least one property"),
        ([("hue", "procedural")], TypeError, r"a mapping \{NAME: SPEC\}, not tuple"),
    ],
)
def test_bad_mappings_name_the_entry(properties, error, message):
    with pytest.raises(error, match=message):
        build_explain_request(_image(), "resnet", properties)


def test_field_violations_are_typed_and_still_unpack(services):
    _, _, target = services
    with Client(target) as client:
        with pytest.raises(PropscopeError) as info:
            client.attribute(_image(), "refused", nb_design=16)
    (violation,) = info.value.field_violations
    assert isinstance(violation, FieldViolation)
    assert violation.field == "sobol.nb_design" and violation.description == "use 16 or 32"
    field, description = violation
    assert (field, description) == ("sobol.nb_design", "use 16 or 32")
