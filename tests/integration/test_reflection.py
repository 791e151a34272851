"""A client without the .proto files, as grpcurl is: everything it needs, google.rpc.Status of
the results and google.rpc.BadRequest of the refusals included, comes from server reflection."""

from __future__ import annotations

import base64

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.integration.conftest import SAMPLE

SERVICE = "propscope.v1.ExplainService"
HUE = {"operation": "hue", "region": "object"}


def test_a_client_without_the_protos_explains_through_reflection(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE in database.get_services()
    pool = DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE)
    status = pool.FindMessageTypeByName("propscope.v1.PropertyResult").fields_by_name["status"]
    assert status.message_type.full_name == "google.rpc.Status"
    assert pool.FindMessageTypeByName("google.rpc.BadRequest").file.name == (
        "google/rpc/error_details.proto"
    )

    def method(name: str, streaming: bool):
        descriptor = service.methods_by_name[name]
        request_class = message_factory.GetMessageClass(descriptor.input_type)
        response_class = message_factory.GetMessageClass(descriptor.output_type)
        call = channel.unary_stream if streaming else channel.unary_unary
        stub = call(
            f"/{SERVICE}/{name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        return stub, request_class

    list_models, list_request = method("ListModels", streaming=False)
    assert "synth_hue" in {model.name for model in list_models(list_request(), timeout=30).models}

    explain, explain_request = method("Explain", streaming=True)
    request = {  # the JSON a tool such as grpcurl sends with -d
        "image": base64.b64encode(SAMPLE.read_bytes()).decode(),
        "model": {"name": "synth_hue"},
        "properties": [
            {"name": "object_hue", "editor": {"model": "procedural", "parameters": HUE}},
        ],
        "steps": 6,
    }
    events = list(explain(json_format.ParseDict(request, explain_request()), timeout=60))
    assert [event.WhichOneof("event") for event in (events[0], events[-1])] == ["accepted", "done"]
    (result,) = [e.property_result for e in events if e.WhichOneof("event") == "property_result"]
    assert result.status.code == 0 and result.significant
