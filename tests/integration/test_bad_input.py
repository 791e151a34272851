"""Every refusal is a clear gRPC status, and the service keeps working after it."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

import propscope
from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc
from propscope_dev import stack
from tests.integration.conftest import SAMPLE, png

HUE = {"operation": "hue", "region": "object"}


def request(**overrides) -> pb.ExplainRequest:
    message = pb.ExplainRequest(
        image=SAMPLE.read_bytes(),
        model=pb.ModelRef(name="synth_hue", predicted_class=True),
        properties=[
            pb.Property(
                name="hue", editor=pb.EditorIntervention(model="procedural", parameters=HUE)
            )
        ],
        steps=6,
        permutations=200,
    )
    for key, value in overrides.items():
        if key == "properties":
            del message.properties[:]
            message.properties.extend(value)
        elif isinstance(value, pb.ModelRef):
            message.model.CopyFrom(value)
        else:
            setattr(message, key, value)
    return message


def refusal(channel: grpc.Channel, message: pb.ExplainRequest) -> grpc.RpcError:
    stub = explain_pb2_grpc.ExplainServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Explain(message, timeout=60))
    return caught.value


def editor_property(name="hue", model="procedural", **parameters) -> pb.Property:
    return pb.Property(
        name=name, editor=pb.EditorIntervention(model=model, parameters=parameters or HUE)
    )


def big_noise_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    return png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("overrides", "code", "words"),
    [
        (
            {"image": b"definitely not a png"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "could not be decoded",
        ),
        ({"image": b""}, grpc.StatusCode.INVALID_ARGUMENT, "image is empty"),
        (
            {"image": big_noise_png(400)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "the limit max_image_bytes is 300000",
        ),
        ({"steps": 1}, grpc.StatusCode.INVALID_ARGUMENT, "steps must be in 2..256"),
        ({"steps": 10_000}, grpc.StatusCode.INVALID_ARGUMENT, "steps must be in 2..256"),
        ({"samples": 99}, grpc.StatusCode.INVALID_ARGUMENT, "samples must be in 1..32"),
        (
            {"permutations": 10},
            grpc.StatusCode.INVALID_ARGUMENT,
            "permutations must be in 100..100000",
        ),
        ({"alpha": 0.9}, grpc.StatusCode.INVALID_ARGUMENT, "alpha must be in (0, 0.5]"),
        ({"properties": []}, grpc.StatusCode.INVALID_ARGUMENT, "properties is empty"),
        (
            {"model": pb.ModelRef(name="")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "model.name is required",
        ),
        (
            {"model": pb.ModelRef(name="no_such_model")},
            grpc.StatusCode.NOT_FOUND,
            "'no_such_model'",
        ),
        (
            {"model": pb.ModelRef(name="procedural")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "is an editor",
        ),
        (
            {"model": pb.ModelRef(name="synth_hue", target_class=7)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "target_class 7 is out of range",
        ),
        (
            {"model": pb.ModelRef(name="synth_hue", output="PROBS")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "has no output 'PROBS'",
        ),
        (
            {"properties": [editor_property(model="no_such_editor")]},
            grpc.StatusCode.NOT_FOUND,
            "'no_such_editor'",
        ),
        (
            {"properties": [editor_property(model="synth_unbiased")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "is not an editor",
        ),
        (
            {"properties": [editor_property(operation="hue", colour="red")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown parameter(s) 'colour'",
        ),
        (
            {"properties": [editor_property(operation="sharpen")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "'operation' must be one of",
        ),
        (
            {"properties": [editor_property(operation="hue", amount="lots")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "'amount' must be a number",
        ),
        (
            {"properties": [editor_property(), editor_property()]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "names must be unique",
        ),
        (
            {"steps": 3},
            grpc.StatusCode.INVALID_ARGUMENT,
            "a path of 4 images can never be significant at alpha 0.01",
        ),
        (
            {"permutations": 100, "alpha": 0.005},
            grpc.StatusCode.INVALID_ARGUMENT,
            "raise permutations",
        ),
        (
            {"steps": 100, "samples": 30},
            grpc.StatusCode.INVALID_ARGUMENT,
            "the limit max_edits is 2000",
        ),
        (
            {"image": png(np.zeros((128, 128, 3), np.uint8)), "steps": 256, "samples": 2},
            grpc.StatusCode.INVALID_ARGUMENT,
            "the limit max_path_pixels",
        ),
        (
            {"properties": [pb.Property(name="nothing")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs an editor or a provided_path",
        ),
    ],
)
def test_bad_requests_are_refused_clearly(channel, overrides, code, words):
    error = refusal(channel, request(**overrides))
    assert error.code() == code
    assert words in error.details()


def test_a_decompression_bomb_is_refused_by_its_pixel_count(channel):
    # 2000 x 2000 of one colour compresses to a few kB but is over the 512 x 512 limit.
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 2000), (10, 20, 30)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 300_000
    error = refusal(channel, request(image=buffer.getvalue()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2000x2000 pixels" in error.details()


def test_the_service_still_answers_after_refusals(client):
    events = list(
        client.explain(SAMPLE.read_bytes(), "synth_hue", ["hue=procedural:operation=hue"], steps=6)
    )
    assert isinstance(events[-1], propscope.Done)


def test_triton_down_is_unavailable_quickly(tmp_path):
    port = stack.free_port()
    dead_triton = f"127.0.0.1:{stack.free_port()}"
    gateway = stack.start_gateway(
        {"PROPSCOPE_LISTEN_ADDRESS": f"127.0.0.1:{port}", "PROPSCOPE_TRITON_URL": dead_triton},
        tmp_path / "gateway.log",
    )
    try:
        stack.wait_for_gateway(f"127.0.0.1:{port}", gateway)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            error = refusal(channel, request())
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            # The setting (a typo in it reads as a Triton down); the address is in the log.
            assert "PROPSCOPE_TRITON_URL tried; its log names them" in error.details()
            assert dead_triton not in error.details()
            tried = f"(tried PROPSCOPE_TRITON_URL={dead_triton})"
        assert (
            f"Triton unreachable for model synth_hue {tried}"
            in (tmp_path / "gateway.log").read_text()
        )
    finally:
        gateway.terminate()
        gateway.wait(10)


def test_a_refusal_names_the_field_to_change(client):
    with pytest.raises(propscope.PropscopeError) as caught:
        list(
            client.explain(
                SAMPLE.read_bytes(), "synth_hue", ["hue=procedural:operation=hue"], steps=1
            )
        )
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    ((field, description),) = caught.value.field_violations
    assert field == "steps"
    assert "steps must be in 2..256" in description
