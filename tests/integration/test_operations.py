"""Production behaviour of a real gateway process on the session's Triton and Redis:
bearer tokens and tenants, TLS and mutual TLS, tenant-isolated cache, admission
control, metrics, JSON logs, and graceful shutdown."""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import propscope
import propscope_server
from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc
from propscope_dev import stack
from propscope_dev.hostile import bearer, hue_request_fields
from tests.integration.conftest import ExtraGateway, extra_gateway, png, scene_png

TOKENS = json.dumps({"token-a": "team-a", "token-b": "team-b", "token-c": "team-c"})
HUE = "hue=procedural:operation=hue"


def explain_request(seed: int = 0, **fields: object) -> pb.ExplainRequest:
    values = hue_request_fields(scene_png(hue_deg=float(seed % 360)), seed)
    values.update(fields)
    return pb.ExplainRequest(**values)


def heavy_request(seed: int) -> pb.ExplainRequest:
    """Seconds of work on two cores: 8 properties x 4 samples x 64 steps, no cache."""
    properties = [
        pb.Property(
            name=f"hue{i}",
            editor=pb.EditorIntervention(
                model="procedural", parameters={"operation": "hue", "amount": str(90 + i)}
            ),
        )
        for i in range(8)
    ]
    return explain_request(seed, properties=properties, samples=4, steps=64, permutations=100)


def long_request(seed: int) -> pb.ExplainRequest:
    """heavy_request on a 160 x 160 image (6x the pixels): for a deadline that must pass
    mid-work on any machine (heavy_request ended in 1.6 s here)."""
    scene = Image.open(io.BytesIO(scene_png(hue_deg=float(seed % 360)))).resize((160, 160))
    request = heavy_request(seed)
    request.image = png(np.asarray(scene))
    return request


def diffusion_request(seed: int) -> pb.ExplainRequest:
    """Tens of seconds of work whatever the machine (a deadline test must not depend on how
    fast procedural edits are): SDEdit, a diffusion editor, over 2 samples x 32 steps."""
    snow = pb.Property(
        name="snow",
        editor=pb.EditorIntervention(
            model="sdedit",
            parameters={
                "source_prompt": "a red circle",
                "target_prompt": "snow",
                "num_inference_steps": "20",
            },
        ),
    )
    return explain_request(seed, properties=[snow], samples=2, steps=32, permutations=100)


def explain(channel: grpc.Channel, request: pb.ExplainRequest, token: str | None = None) -> list:
    stub = explain_pb2_grpc.ExplainServiceStub(channel)
    return list(stub.Explain(request, metadata=bearer(token), timeout=120))


def cache_hits(events: list) -> int:
    return sum(e.property_result.cache_hits for e in events if e.HasField("property_result"))


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples whose line starts with `name`."""
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.fixture(scope="module")
def authed(live_stack, tmp_path_factory) -> ExtraGateway:
    with extra_gateway(
        live_stack, tmp_path_factory.mktemp("authed"), PROPSCOPE_AUTH__TOKENS=TOKENS
    ) as gateway:
        yield gateway


@pytest.fixture
def channel(authed: ExtraGateway):
    with grpc.insecure_channel(authed.target) as grpc_channel:
        yield grpc_channel


@pytest.mark.parametrize(
    ("token", "words"), [(None, "missing bearer token"), ("wrong", "unknown bearer token")]
)
def test_calls_without_a_known_token_are_unauthenticated(authed, channel, token, words):
    before = metric(authed.metrics_url, "propscope_auth_failures_total")
    stub = explain_pb2_grpc.ExplainServiceStub(channel)
    metadata = bearer(token)
    for call in (
        lambda: list(stub.Explain(explain_request(), metadata=metadata, timeout=30)),
        lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert words in caught.value.details()
    assert metric(authed.metrics_url, "propscope_auth_failures_total") == before + 2


def test_health_is_open_and_reflection_is_not(channel):
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    with pytest.raises(grpc.RpcError) as caught:
        list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(requests))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_tenant_never_hits_another_tenants_cache(channel):
    request = explain_request(seed=101)
    assert cache_hits(explain(channel, request, "token-a")) == 0
    assert cache_hits(explain(channel, request, "token-a")) == 1
    assert cache_hits(explain(channel, request, "token-b")) == 0  # same image, other tenant
    assert cache_hits(explain(channel, request, "token-b")) == 1


def test_the_sdk_sends_its_token(authed):
    with propscope.Client(authed.target, token="token-c", timeout=60) as client:
        assert {m.name for m in client.list_models()} >= {"synth_hue", "procedural"}


def test_a_shared_namespace_shares_hits_across_tenants(live_stack, tmp_path):
    with extra_gateway(
        live_stack,
        tmp_path,
        PROPSCOPE_AUTH__TOKENS=TOKENS,
        PROPSCOPE_CACHE_SHARED_NAMESPACE="true",
    ) as gateway:
        with grpc.insecure_channel(gateway.target) as channel:
            request = explain_request(seed=202)
            assert cache_hits(explain(channel, request, "token-a")) == 0
            assert cache_hits(explain(channel, request, "token-b")) == 1


def test_a_corrupted_cache_value_is_a_miss_and_counted(authed, channel, live_stack):
    request = explain_request(seed=303)
    explain(channel, request, "token-c")
    store = redis.Redis.from_url(live_stack.redis_url)
    keys = store.keys("propscope:path:v2:tenant.team-c:*")
    assert keys, "the path was not cached under the tenant's namespace"
    for key in keys:
        value = store.get(key)
        store.set(key, value[:-1] + bytes([value[-1] ^ 1]))
    before = metric(authed.metrics_url, "propscope_cache_rejected_values_total")
    assert cache_hits(explain(channel, request, "token-c")) == 0
    assert metric(authed.metrics_url, "propscope_cache_rejected_values_total") > before
    assert cache_hits(explain(channel, request, "token-c")) == 1  # rewritten intact


def test_admission_refuses_over_the_tenant_and_total_limits(live_stack, tmp_path):
    limits = dict(
        PROPSCOPE_LIMITS__MAX_STREAMS_PER_TENANT="1",
        PROPSCOPE_LIMITS__MAX_STREAMS_TOTAL="2",
    )
    with extra_gateway(live_stack, tmp_path, PROPSCOPE_AUTH__TOKENS=TOKENS, **limits) as gateway:
        metrics_url = gateway.metrics_url
        with grpc.insecure_channel(gateway.target) as channel:
            stub = explain_pb2_grpc.ExplainServiceStub(channel)
            holding = []
            for token in ("token-a", "token-b"):
                call = stub.Explain(heavy_request(seed=404), metadata=bearer(token), timeout=120)
                assert next(call).HasField("accepted")  # the slot is held from here
                holding.append(call)
            for token, limit in (("token-a", "max_streams_per_tenant"), ("token-c", "total")):
                with pytest.raises(grpc.RpcError) as caught:
                    list(stub.Explain(explain_request(), metadata=bearer(token), timeout=30))
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert limit in caught.value.details()
            for call in holding:
                call.cancel()
            assert metric(metrics_url, "propscope_admission_rejections_total") == 2
            wait_until(lambda: metric(metrics_url, "propscope_inflight_streams") == 0)
            assert explain(channel, explain_request(), "token-a")[-1].HasField("done")


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_metrics_cover_rpcs_stages_cache_and_triton(authed, channel):
    explain(channel, explain_request(seed=505), "token-a")
    body = urllib.request.urlopen(authed.metrics_url, timeout=5).read().decode()
    for needle in (
        'propscope_rpc_total{code="OK",method="Explain"}',
        'propscope_rpc_seconds_bucket{code="OK",le="0.5",method="Explain"}',
        'propscope_stage_seconds_count{stage="edit"}',
        'propscope_stage_seconds_count{stage="classify"}',
        'propscope_stage_seconds_count{stage="score"}',
        'propscope_stage_seconds_count{stage="cache"}',
        'propscope_cache_lookups_total{result="miss"}',
        "propscope_cache_bytes_written_total",
        "propscope_edits_per_request_count",
        "propscope_inflight_streams",
        'propscope_dependency_up{dependency="triton"} 1.0',
        'propscope_dependency_up{dependency="cache"} 1.0',
        'propscope_triton_seconds_count{kind="classify",model="synth_hue",outcome="ok"}',
    ):
        assert needle in body, needle


def samples(url: str) -> list:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return [sample for family in text_string_to_metric_families(body) for sample in family.samples]


def sample_sum(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` that carry these labels (among others)."""
    return sum(
        sample.value
        for sample in samples(url)
        if sample.name == name and labels.items() <= sample.labels.items()
    )


EXPLAIN = {"grpc_service": "propscope.v1.ExplainService", "grpc_method": "Explain"}
LIST_MODELS = {"grpc_service": "propscope.v1.ExplainService", "grpc_method": "ListModels"}


def explain_call_counts(url: str) -> dict[str, float]:
    streamed = {"grpc_type": "server_stream", **EXPLAIN}
    return {
        "started": sample_sum(url, "grpc_server_started_total", **streamed),
        "handled OK": sample_sum(url, "grpc_server_handled_total", **streamed, grpc_code="OK"),
        "timed": sample_sum(url, "grpc_server_handling_seconds_count", **streamed),
        "received": sample_sum(url, "grpc_server_msg_received_total", **streamed),
        "sent": sample_sum(url, "grpc_server_msg_sent_total", **streamed),
        "deprecated OK": sample_sum(url, "propscope_rpc_total", method="Explain", code="OK"),
    }


def test_rpc_metrics_are_go_grpc_prometheus_ones_beside_the_deprecated(authed, channel):
    url = authed.metrics_url
    refused = {"grpc_type": "unary", "grpc_code": "Unauthenticated", **LIST_MODELS}
    refused_before = sample_sum(url, "grpc_server_handled_total", **refused)
    before = explain_call_counts(url)
    events = explain(channel, explain_request(seed=707), "token-a")
    with pytest.raises(grpc.RpcError):
        explain_pb2_grpc.ExplainServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    after = explain_call_counts(url)
    assert len(events) >= 3  # accepted, the result, done
    assert {name: after[name] - before[name] for name in after} == {
        "started": 1,
        "handled OK": 1,
        "timed": 1,
        "received": 1,
        "sent": len(events),
        "deprecated OK": 1,
    }
    assert sample_sum(url, "grpc_server_handled_total", **refused) == refused_before + 1


def test_build_info_is_exported_and_no_created_series(authed):
    body = urllib.request.urlopen(authed.metrics_url, timeout=5).read().decode()
    (build,) = [s for s in samples(authed.metrics_url) if s.name == "propscope_build_info"]
    assert build.value == 1
    assert build.labels["version"] == propscope_server.__version__
    assert build.labels["api_version"] == "propscope.v1"
    assert build.labels["python"].startswith("3.") and build.labels["grpc"] == grpc.__version__
    assert "grpc_server_handled_total" in body
    assert [line for line in body.splitlines() if "_created" in line] == []


def test_property_results_count_failures_in_ok_streams_and_only_served_models(authed, channel):
    url = authed.metrics_url
    results = "propscope_property_results_total"
    events = explain(channel, explain_request(seed=808), "token-a")
    (result,) = [e.property_result for e in events if e.HasField("property_result")]
    flags = {
        "significant": str(result.significant).lower(),
        "relevant": str(result.relevant).lower(),
        "flipped": str(result.prediction_flipped).lower(),
    }
    assert sample_sum(url, results, model="synth_hue", status="OK", **flags) >= 1
    # A hue rotation of a grey image changes nothing: the property fails, the stream is OK.
    failed = {"model": "synth_hue", "status": "FailedPrecondition"}
    before = sample_sum(url, results, **failed, significant="", relevant="", flipped="")
    handled_before = sample_sum(url, "grpc_server_handled_total", **EXPLAIN, grpc_code="OK")
    grey = png(np.full((64, 64, 3), 128, np.uint8))
    events = explain(channel, explain_request(seed=809, image=grey), "token-a")
    assert events[-1].done.properties_failed == 1
    assert sample_sum(url, results, **failed, significant="", relevant="", flipped="") == (
        before + 1
    )
    assert sample_sum(url, "grpc_server_handled_total", **EXPLAIN, grpc_code="OK") == (
        handled_before + 1
    )
    # A model nobody serves is refused before any result: its name makes no series.
    unknown = "no_such_model_31337"
    with pytest.raises(grpc.RpcError) as caught:
        explain(channel, explain_request(model=pb.ModelRef(name=unknown)), "token-a")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert [s for s in samples(url) if unknown in s.labels.values()] == []


def test_logs_are_json_lines_with_request_id_and_tenant(authed, channel):
    explain(channel, explain_request(request_id="req-logged"), "token-b")
    logs = [json.loads(line) for line in authed.log_file.read_text().splitlines()]
    ours = [entry for entry in logs if entry.get("request_id") == "req-logged"]
    assert ours and all(entry["tenant"] == "team-b" for entry in ours)
    assert {"time", "level", "logger", "message"} <= set(ours[0])
    assert any("Explain finished: OK" in entry["message"] for entry in ours)


def issue_certificate(
    name: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A CA (issuer None), or a certificate it signs for 127.0.0.1 (server) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signing_key, issuer_name = (key, subject) if issuer is None else (issuer[0], issuer[1].subject)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(signing_key, hashes.SHA256())


def write_pem(directory: Path, name: str, key, certificate) -> tuple[Path, Path]:
    key_file, cert_file = directory / f"{name}.key", directory / f"{name}.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = issue_certificate("propscope test CA", None, server=False)
    files = {"ca": write_pem(directory, "ca", *ca)[1]}
    for name, server in (("server", True), ("client", False)):
        files[f"{name}_key"], files[name] = write_pem(
            directory, name, *issue_certificate(name, ca, server)
        )
    other_ca = issue_certificate("someone else's CA", None, server=False)
    files["stranger_key"], files["stranger"] = write_pem(
        directory, "stranger", *issue_certificate("stranger", other_ca, server=False)
    )
    return files


def list_models_over(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    with channel:
        try:
            explain_pb2_grpc.ExplainServiceStub(channel).ListModels(
                pb.ListModelsRequest(), timeout=10
            )
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_tls_serves_encrypted_calls_only_and_probes_get_a_plaintext_health_port(
    live_stack, tmp_path, pki
):
    health_port = stack.free_port()
    with extra_gateway(
        live_stack,
        tmp_path,
        PROPSCOPE_TLS__CERT_FILE=str(pki["server"]),
        PROPSCOPE_TLS__KEY_FILE=str(pki["server_key"]),
        PROPSCOPE_HEALTH_LISTEN_ADDRESS=f"127.0.0.1:{health_port}",
    ) as gateway:
        trusted = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        assert list_models_over(gateway.target, trusted) == grpc.StatusCode.OK
        assert list_models_over(gateway.target, None) == grpc.StatusCode.UNAVAILABLE
        probe_port = f"127.0.0.1:{health_port}"
        with grpc.insecure_channel(probe_port) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert list_models_over(probe_port, None) == grpc.StatusCode.UNIMPLEMENTED


def test_mutual_tls_needs_a_client_certificate_from_the_trusted_ca(live_stack, tmp_path, pki):
    with extra_gateway(
        live_stack,
        tmp_path,
        PROPSCOPE_TLS__CERT_FILE=str(pki["server"]),
        PROPSCOPE_TLS__KEY_FILE=str(pki["server_key"]),
        PROPSCOPE_TLS__CLIENT_CA_FILE=str(pki["ca"]),
    ) as gateway:

        def credentials(name: str | None) -> grpc.ChannelCredentials:
            return grpc.ssl_channel_credentials(
                root_certificates=pki["ca"].read_bytes(),
                private_key=pki[f"{name}_key"].read_bytes() if name else None,
                certificate_chain=pki[name].read_bytes() if name else None,
            )

        assert list_models_over(gateway.target, credentials("client")) == grpc.StatusCode.OK
        assert list_models_over(gateway.target, credentials(None)) == grpc.StatusCode.UNAVAILABLE
        assert (
            list_models_over(gateway.target, credentials("stranger")) == grpc.StatusCode.UNAVAILABLE
        )


def test_sigterm_goes_not_serving_then_refuses_and_lets_streams_finish(live_stack, tmp_path):
    with extra_gateway(
        live_stack, tmp_path, PROPSCOPE_SHUTDOWN_DRAIN_S="2", PROPSCOPE_SHUTDOWN_GRACE_S="120"
    ) as gateway:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = explain_pb2_grpc.ExplainServiceStub(channel)
            stream = stub.Explain(heavy_request(seed=606), timeout=300)
            events = [next(stream)]
            assert events[0].HasField("accepted")
            rest: list = []
            reader = threading.Thread(target=lambda: rest.extend(stream))
            reader.start()
            gateway.process.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            wait_until(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                timeout_s=1.5,
            )
            time.sleep(2.5)  # past the drain period
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Explain(explain_request(), timeout=10))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            reader.join(300)
        assert rest[-1].HasField("done") and rest[-1].done.properties_failed == 0
        assert sum(e.HasField("property_result") for e in rest) == 8
        assert gateway.process.wait(30) == 0


def test_a_request_over_max_request_bytes_is_refused_by_size(live_stack, tmp_path):
    """gRPC itself refuses the message before it is parsed; its message names both sizes."""
    with extra_gateway(
        live_stack, tmp_path, PROPSCOPE_LIMITS__MAX_REQUEST_BYTES="100000"
    ) as gateway:
        with grpc.insecure_channel(gateway.target) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                explain(channel, explain_request(image=b"\0" * 150_000))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "vs. 100000" in caught.value.details()
            assert explain(channel, explain_request())[-1].HasField("done")
