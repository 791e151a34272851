"""Standard health and server reflection, usable by generic gRPC tools."""

from __future__ import annotations

import importlib
import pkgutil
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import propscope.v1
from propscope_dev import stack
from tests.integration.conftest import SAMPLE, extra_gateway


def test_health_is_serving_with_triton_and_redis_up(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "propscope.v1.ExplainService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def propscope_services() -> set[str]:
    """Every service the propscope.v1 protos define, from the installed stubs (not from the
    gateway's own list, so that a service left out of it is found)."""
    found = set()
    for module in pkgutil.iter_modules(propscope.v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"propscope.v1.{module.name}").DESCRIPTOR
            found.update(service.full_name for service in descriptor.services_by_name.values())
    return found


def test_health_and_reflection_cover_every_propscope_service(channel):
    # ConceptService was missing from health until f44e403.
    services = propscope_services()
    assert {"propscope.v1.ConceptService", "propscope.v1.ConsistencyService"} <= services
    stub = health_pb2_grpc.HealthStub(channel)
    for service in sorted(services):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services="")]
    requests += [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)
        for service in sorted(services)
    ]
    listing, *descriptors = reflection.ServerReflectionInfo(iter(requests), timeout=5)
    assert services <= {s.name for s in listing.list_services_response.service}
    for service, answer in zip(sorted(services), descriptors, strict=True):
        assert answer.WhichOneof("message_response") == "file_descriptor_response", service
        assert answer.file_descriptor_response.file_descriptor_proto, service


def test_reflection_lists_and_describes_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter(
        [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="propscope.v1.ExplainService"
            ),
        ]
    )
    listing, descriptor = list(stub.ServerReflectionInfo(requests, timeout=5))
    names = {s.name for s in listing.list_services_response.service}
    assert {"propscope.v1.ExplainService", "grpc.health.v1.Health"} <= names
    assert descriptor.file_descriptor_response.file_descriptor_proto


def test_metrics_are_exported(client, live_stack):
    list(
        client.explain(
            SAMPLE.read_bytes(), "synth_unbiased", ["hue=procedural:operation=hue"], steps=6
        )
    )
    body = urllib.request.urlopen(live_stack.metrics_url, timeout=5).read().decode()
    assert 'propscope_rpc_total{code="OK",method="Explain"}' in body
    assert "propscope_stage_seconds_bucket" in body
    assert "propscope_cache_lookups_total" in body


def test_an_unreachable_cache_degrades_health_without_stopping_service(live_stack, tmp_path):
    """The gateway serves uncached; the cache's own health service tells operators."""
    with extra_gateway(
        live_stack, tmp_path, REDIS_URL=f"redis://127.0.0.1:{stack.free_port()}/0"
    ) as gateway:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return stub.Check(request, timeout=5).status

            assert status("propscope.cache") == health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("", "propscope.v1.ExplainService"):
                assert status(service) == health_pb2.HealthCheckResponse.SERVING
