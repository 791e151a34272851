"""Property-based fuzzing of issue 18's RPCs (FitConcepts, GetConceptBank, ConceptMaps,
DecomposeConcept, Visualize, EvaluateConsistency) as test_fuzz.py fuzzes Explain and
BuildGraph: whatever the request holds, every call ends in a proper status (never UNKNOWN,
INTERNAL or a hang) and the gateway keeps serving.

Valid requests stay cheap: one or two small images, ranks and designs of a few, MACO with
at most 3 steps of 3 crops, MeGe/ReCo with the gradient and random explainers or a Sobol
or RISE design of a few masks. Wild values are ones the gateway refuses (over a limit, not a
power of two, unknown names), never a default that would run a full-size job.
"""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from propscope.v1 import attribution_pb2 as apb
from propscope.v1 import concepts_pb2 as cpb
from propscope.v1 import consistency_pb2 as kpb
from propscope.v1 import explain_pb2 as pb
from propscope.v1 import visualization_pb2 as vpb
from propscope_dev.validation import craft as craft_validation
from tests.integration.conftest import png
from tests.integration.test_fuzz import (
    DOUBLES,
    FUZZ_SETTINGS,
    INVALID_UTF8,
    NEGATIVE,
    TEXT,
    UINT32_EDGES,
    UINT64,
    check_outcome,
    damaged,
    encoded,
    hostile_images,
    key,
    length_delimited,
    model_refs,
    pixels,
    varint,
    wild_or,
)

DEADLINE_S = 60.0
SERVICE = {
    "FitConcepts": ("ConceptService", cpb.FitConceptsEvent, True),
    "DecomposeConcept": ("ConceptService", cpb.DecomposeConceptEvent, True),
    "GetConceptBank": ("ConceptService", cpb.ConceptBank, False),
    "ConceptMaps": ("ConceptService", cpb.ConceptMapsResponse, False),
    "Visualize": ("VisualizationService", vpb.VisualizeEvent, True),
    "EvaluateConsistency": ("ConsistencyService", kpb.EvaluateConsistencyEvent, True),
}
SMALL_FUZZ = settings(FUZZ_SETTINGS, max_examples=80)
WIRE_FUZZ = settings(FUZZ_SETTINGS, max_examples=150)
MODEL_FIELDS = ("model.name", "model.version", "model.output", "model.target")
# A bank id of the right shape that no fit returned.
UNKNOWN_BANK = "cb_" + "0" * 32


def call(channel: grpc.Channel, rpc: str, data: bytes) -> tuple[grpc.StatusCode, str, list]:
    """Send `data` (raw bytes) to `rpc`; the final status, its details and the messages."""
    service, response, streaming = SERVICE[rpc]
    stub = (channel.unary_stream if streaming else channel.unary_unary)(
        f"/propscope.v1.{service}/{rpc}",
        request_serializer=lambda raw: raw,
        response_deserializer=response.FromString,
    )
    messages: list = []
    try:
        if streaming:
            messages.extend(stub(data, timeout=DEADLINE_S))
        else:
            messages.append(stub(data, timeout=DEADLINE_S))
    except grpc.RpcError as error:
        return error.code(), error.details() or "", messages
    return grpc.StatusCode.OK, "", messages


def check(code: grpc.StatusCode, details: str, messages: list, streaming: bool) -> None:
    if streaming or code != grpc.StatusCode.OK:
        check_outcome(code, details, messages, properties=None)
    else:
        assert len(messages) == 1


@pytest.fixture(scope="module")
def bank_images() -> list[bytes]:
    return craft_validation.class_images(2)


@pytest.fixture(scope="module")
def bank(fuzz_channel, bank_images) -> cpb.ConceptBank:
    """A small real bank of synth_patch's squares, for the requests that name one."""
    request = cpb.FitConceptsRequest(
        model=pb.ModelRef(name="synth_patch", target_class=1),
        images=bank_images,
        rank=2,
        nb_design=4,
        top_crops=1,
    )
    code, details, events = call(fuzz_channel, "FitConcepts", request.SerializeToString())
    assert code == grpc.StatusCode.OK, f"{code.name}: {details}"
    return events[-1].done


@pytest.fixture(scope="module")
def fuzz_channel(live_stack):
    options = [("grpc.max_metadata_size", 4 * 1024 * 1024)]
    with grpc.insecure_channel(live_stack.gateway, options=options) as channel:
        yield channel


def assert_still_serving(channel: grpc.Channel, live_stack, bank: cpb.ConceptBank) -> None:
    """The gateway lives, is healthy and shows the bank (the concept service and the cache)."""
    os.kill(live_stack.pids["gateway"], 0)
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    request = cpb.GetConceptBankRequest(bank_id=bank.bank_id)
    code, details, (shown,) = call(channel, "GetConceptBank", request.SerializeToString())
    assert code == grpc.StatusCode.OK, f"{code.name}: {details}"
    assert shown.bank_id == bank.bank_id


# ----------------------------------------------------------------------------- fields


def images_of(draw: st.DrawFn, broken: set[str], valid: list[bytes], field: str) -> list[bytes]:
    image = draw(pixels())
    wild = st.one_of(
        st.just([]),
        st.lists(st.one_of(encoded(image), hostile_images()), min_size=1, max_size=2),
        st.just([png(image)] * 65),  # over the 64 images of every limit
    )
    return draw(wild_or(st.just(valid), wild, field, broken))


def bank_ids(draw: st.DrawFn, bank: cpb.ConceptBank, broken: bool) -> str:
    if not broken:
        return bank.bank_id
    return draw(
        st.one_of(
            st.sampled_from(["", UNKNOWN_BANK, bank.bank_id.upper(), bank.bank_id + "0"]),
            TEXT,
        )
    )


def small(draw: st.DrawFn, low: int, high: int, name: str, broken: set[str]) -> int:
    """A small valid count, or when broken one the gateway refuses."""
    return draw(wild_or(st.integers(low, high), UINT32_EDGES, name, broken))


def power_of_two(draw: st.DrawFn, name: str, broken: set[str], high: int = 4) -> int:
    wild = st.one_of(st.sampled_from([3, 6, 1000, 2048]), UINT32_EDGES)
    return draw(
        wild_or(st.sampled_from([v for v in (1, 2, 4, 8) if v <= high]), wild, name, broken)
    )


def layers(draw: st.DrawFn, valid: list[str], broken: set[str]) -> str:
    wild = st.one_of(st.sampled_from(["features", "features.9", "head", "no.such"]), TEXT)
    return draw(wild_or(st.sampled_from(valid), wild, "layer", broken))


# ----------------------------------------------------------------------------- ConceptService

FIT_FIELDS = (*MODEL_FIELDS, "request_id", "images", "layer", "rank", "patch_size")
FIT_FIELDS += ("nb_design", "top_crops", "budget")


@st.composite
def fit_requests(draw: st.DrawFn, images: list[bytes]) -> cpb.FitConceptsRequest:
    broken = draw(st.sets(st.sampled_from(FIT_FIELDS), max_size=3))
    request = cpb.FitConceptsRequest(
        request_id=draw(wild_or(st.just(""), TEXT, "request_id", broken)),
        model=draw(model_refs(broken)),
        images=images_of(draw, broken, images[: draw(st.integers(1, 2))], "images"),
        layer=layers(draw, ["", "features.2", "features.1"], broken),
        rank=small(draw, 1, 3, "rank", broken),
        patch_size=draw(
            wild_or(st.sampled_from([0, 12, 64]), st.sampled_from([1, 4097]), "patch_size", broken)
        ),
        nb_design=power_of_two(draw, "nb_design", broken),
        seed=draw(UINT64),
        top_crops=small(draw, 1, 2, "top_crops", broken),
    )
    if "budget" in broken:  # over max_concept_passes: 1024 * 66 h passes per image
        request.rank, request.nb_design = 64, 1024
    return request


@SMALL_FUZZ
@given(data=st.data())
def test_any_fit_concepts_request_ends_in_a_status(
    fuzz_channel, live_stack, bank, bank_images, data
):
    request = data.draw(fit_requests(bank_images))
    code, details, events = call(fuzz_channel, "FitConcepts", request.SerializeToString())
    check(code, details, events, streaming=True)
    assert_still_serving(fuzz_channel, live_stack, bank)


DECOMPOSE_FIELDS = (
    "request_id",
    "bank_id",
    "concept",
    "images",
    "layer",
    "rank",
    "nb_design",
    "top_crops",
)
DECOMPOSE_FIELDS += MODEL_FIELDS


@SMALL_FUZZ
@given(data=st.data())
def test_any_decompose_concept_request_ends_in_a_status(
    fuzz_channel, live_stack, bank, bank_images, data
):
    draw = data.draw
    broken = draw(st.sets(st.sampled_from(DECOMPOSE_FIELDS), max_size=2))
    request = cpb.DecomposeConceptRequest(
        request_id=draw(wild_or(st.just(""), TEXT, "request_id", broken)),
        bank_id=bank_ids(draw, bank, "bank_id" in broken),
        concept=draw(
            wild_or(
                st.integers(0, bank.rank - 1),
                st.one_of(st.just(bank.rank), UINT32_EDGES),
                "concept",
                broken,
            )
        ),
        images=images_of(draw, broken, bank_images, "images"),
        layer=layers(draw, ["", "features.1"], broken),
        rank=small(draw, 1, 2, "rank", broken),
        nb_design=power_of_two(draw, "nb_design", broken),
        seed=draw(UINT64),
        top_crops=small(draw, 1, 2, "top_crops", broken),
    )
    if broken & set(MODEL_FIELDS) or draw(st.booleans()):
        request.model.CopyFrom(draw(model_refs(broken)))
    code, details, events = call(fuzz_channel, "DecomposeConcept", request.SerializeToString())
    check(code, details, events, streaming=True)
    assert_still_serving(fuzz_channel, live_stack, bank)


@SMALL_FUZZ
@given(data=st.data())
def test_any_concept_bank_or_maps_request_ends_in_a_status(fuzz_channel, live_stack, bank, data):
    draw = data.draw
    broken = draw(st.sets(st.sampled_from(("bank_id", "image", *MODEL_FIELDS)), max_size=2))
    bank_id = bank_ids(draw, bank, "bank_id" in broken)
    if broken & set(MODEL_FIELDS):
        model = draw(model_refs(broken))
    else:  # the bank's own model, named or not
        model = draw(st.sampled_from([pb.ModelRef(), pb.ModelRef(name=bank.model)]))
    image = draw(pixels())
    picture = draw(
        wild_or(st.just(png(image)), st.one_of(encoded(image), hostile_images()), "image", broken)
    )
    for rpc, request in (
        ("GetConceptBank", cpb.GetConceptBankRequest(bank_id=bank_id, model=model)),
        ("ConceptMaps", cpb.ConceptMapsRequest(bank_id=bank_id, image=picture, model=model)),
    ):
        code, details, messages = call(fuzz_channel, rpc, request.SerializeToString())
        check(code, details, messages, streaming=False)
    assert_still_serving(fuzz_channel, live_stack, bank)


# ----------------------------------------------------------------------------- Visualize

VISUALIZE_FIELDS = (
    *MODEL_FIELDS,
    "request_id",
    "objective",
    "steps",
    "crops",
    "noise",
    "box_start",
)
VISUALIZE_FIELDS += ("box_end", "learning_rate", "spectrum_images", "size_px", "placement")


@SMALL_FUZZ
@given(data=st.data())
def test_any_visualize_request_ends_in_a_status(fuzz_channel, live_stack, bank, data):
    draw = data.draw
    broken = draw(st.sets(st.sampled_from(VISUALIZE_FIELDS), max_size=3))
    request = vpb.VisualizeRequest(
        request_id=draw(wild_or(st.just(""), TEXT, "request_id", broken)),
        model=draw(model_refs(broken)),
        steps=small(draw, 1, 3, "steps", broken),
        crops=small(draw, 1, 3, "crops", broken),
        seed=draw(UINT64),
        size_px=draw(
            wild_or(
                st.sampled_from([0, 16, 32]),
                st.one_of(st.sampled_from([1, 15, 17, 514]), UINT32_EDGES),
                "size_px",
                broken,
            )
        ),
        placement=draw(
            wild_or(st.sampled_from(["", "uniform", "centred"]), TEXT, "placement", broken)
        ),
    )
    objective = draw(st.sampled_from(["class", "channel", "concept", "none"]))
    if objective == "class":
        request.class_index = draw(
            wild_or(st.integers(0, 1), st.one_of(st.just(2), UINT32_EDGES), "objective", broken)
        )
    elif objective == "channel":
        request.channel.layer = layers(draw, ["features.0", "features.2"], broken)
        request.channel.channel = draw(
            wild_or(st.integers(0, 15), st.one_of(st.just(64), UINT32_EDGES), "objective", broken)
        )
    elif objective == "concept":
        request.concept.bank_id = bank_ids(draw, bank, "objective" in broken)
        request.concept.concept = draw(st.integers(0, bank.rank))
    for name, valid in (
        ("noise", st.floats(0, 0.2)),
        ("box_start", st.floats(0.3, 1.0)),
        ("box_end", st.floats(0.05, 0.3)),
        ("learning_rate", st.floats(0.1, 2.0)),
    ):
        if name in broken or draw(st.booleans()):
            setattr(request, name, draw(wild_or(valid, DOUBLES, name, broken)))
    if "spectrum_images" in broken:
        request.spectrum_images.extend(images_of(draw, broken, [], "spectrum_images"))
    elif draw(st.booleans()):
        request.spectrum_images.append(png(draw(pixels())))
    code, details, events = call(fuzz_channel, "Visualize", request.SerializeToString())
    check(code, details, events, streaming=True)
    assert_still_serving(fuzz_channel, live_stack, bank)


# ----------------------------------------------------------------------------- consistency

CONSISTENCY_FIELDS = (
    *MODEL_FIELDS,
    "request_id",
    "models",
    "explainers",
    "images",
    "labels",
    "sobol",
)
CONSISTENCY_FIELDS += ("rise", "target_score")
CHEAP_EXPLAINERS = (
    kpb.CONSISTENCY_EXPLAINER_SALIENCY,
    kpb.CONSISTENCY_EXPLAINER_GRADIENT_X_INPUT,
    kpb.CONSISTENCY_EXPLAINER_RANDOM,
    kpb.CONSISTENCY_EXPLAINER_SOBOL,
    kpb.CONSISTENCY_EXPLAINER_RISE,
)


@SMALL_FUZZ
@given(data=st.data())
def test_any_consistency_request_ends_in_a_status(fuzz_channel, live_stack, bank, data):
    draw = data.draw
    broken = draw(st.sets(st.sampled_from(CONSISTENCY_FIELDS), max_size=3))
    count = draw(wild_or(st.integers(2, 3), st.sampled_from([0, 1, 9]), "models", broken))
    models = [draw(model_refs(broken)) for _ in range(count)]
    for model in models:  # every model explains the same class: target_class stays unset
        if model.WhichOneof("target") == "target_class" and "model.target" not in broken:
            model.ClearField("target_class")
    explainers = draw(
        wild_or(
            st.lists(st.sampled_from(CHEAP_EXPLAINERS), min_size=1, max_size=2, unique=True),
            st.one_of(
                st.lists(st.sampled_from([0, 6, 2**31 - 1, -1]), min_size=1, max_size=2),
                st.just([kpb.CONSISTENCY_EXPLAINER_RANDOM] * 2),
            ),
            "explainers",
            broken,
        )
    )
    image_count = draw(st.integers(2, 3))
    images = [png(draw(pixels((64, 64)))) for _ in range(image_count)]
    request = kpb.EvaluateConsistencyRequest(
        request_id=draw(wild_or(st.just(""), TEXT, "request_id", broken)),
        models=models,
        explainers=explainers,
        images=images_of(draw, broken, images, "images"),
        seed=draw(UINT64),
        sobol=apb.SobolOptions(
            grid_size=small(draw, 2, 3, "sobol", broken),
            nb_design=power_of_two(draw, "sobol", broken),
        ),
        rise=apb.RiseOptions(
            grid_size=draw(st.integers(2, 3)), nb_samples=small(draw, 1, 8, "rise", broken)
        ),
        target_score=draw(
            wild_or(st.integers(0, 2), st.sampled_from([3, 99, -1]), "target_score", broken)
        ),
    )
    if request.sobol.nb_design == 1:
        request.sobol.nb_design = 2  # Sobol's smallest design
    if "rise" in broken and draw(st.booleans()):
        request.rise.preservation_probability = draw(st.floats(width=32, allow_nan=True))
    if "labels" in broken:
        request.labels.extend(
            draw(st.lists(st.one_of(st.integers(0, 3), UINT32_EDGES), max_size=4))
        )
    elif draw(st.booleans()):
        request.labels.extend(draw(st.integers(0, 1)) for _ in request.images)
    code, details, events = call(fuzz_channel, "EvaluateConsistency", request.SerializeToString())
    check(code, details, events, streaming=True)
    assert_still_serving(fuzz_channel, live_stack, bank)


# ----------------------------------------------------------------------------- wire level

# Per RPC: its string fields, its varint fields, its ModelRef field and its double fields
# (field numbers of concepts.proto, visualization.proto, consistency.proto).
WIRE_FIELDS = {
    "FitConcepts": ((1, 4), (5, 6, 7, 8, 9), 2, ()),
    "DecomposeConcept": ((1, 2, 4), (3, 6, 7, 8, 9), 10, ()),
    "GetConceptBank": ((1,), (), 2, ()),
    "ConceptMaps": ((1,), (), 3, ()),
    "Visualize": ((1, 15), (3, 6, 7, 12, 14), 2, (8, 9, 10, 11)),
    "EvaluateConsistency": ((1,), (3, 5, 8, 9), 2, ()),
}


def known_good(rpc: str, bank: cpb.ConceptBank, images: list[bytes]) -> bytes:
    model = pb.ModelRef(name="synth_patch")
    request = {
        "FitConcepts": lambda: cpb.FitConceptsRequest(
            model=pb.ModelRef(name="synth_patch", target_class=1),
            images=images[:1],
            rank=2,
            nb_design=2,
            top_crops=1,
        ),
        "DecomposeConcept": lambda: cpb.DecomposeConceptRequest(
            bank_id=bank.bank_id, images=images, rank=1, nb_design=2, top_crops=1
        ),
        "GetConceptBank": lambda: cpb.GetConceptBankRequest(bank_id=bank.bank_id),
        "ConceptMaps": lambda: cpb.ConceptMapsRequest(bank_id=bank.bank_id, image=images[0]),
        "Visualize": lambda: vpb.VisualizeRequest(model=model, class_index=1, steps=1, crops=1),
        "EvaluateConsistency": lambda: kpb.EvaluateConsistencyRequest(
            models=[model, pb.ModelRef(name="synth_hue")],
            explainers=[kpb.CONSISTENCY_EXPLAINER_RANDOM],
            images=images,
        ),
    }[rpc]()
    return request.SerializeToString()


@st.composite
def wire_requests(draw: st.DrawFn, base: bytes, rpc: str) -> bytes:
    """`rpc`'s bytes the protobuf library would not build: non-UTF-8 strings, negative
    varints, any 64-bit pattern as a double, wrong wire types, truncated, flipped, garbage."""
    strings, varints, model_field, doubles = WIRE_FIELDS[rpc]
    kinds = ["non_utf8", "model_non_utf8", "truncated", "flipped", "garbage", "wrong_wire_type"]
    kinds += ["negative"] * bool(varints) + ["raw_double"] * bool(doubles)
    kind = draw(st.sampled_from(kinds))
    if kind == "non_utf8":
        return base + length_delimited(draw(st.sampled_from(strings)), draw(INVALID_UTF8))
    if kind == "model_non_utf8":  # model.name, .version or .output
        inner = length_delimited(draw(st.integers(1, 3)), draw(INVALID_UTF8))
        return base + length_delimited(model_field, inner)
    if kind == "negative":
        return base + key(draw(st.sampled_from(varints)), 0) + varint(draw(NEGATIVE))
    if kind == "raw_double":
        return (
            base + key(draw(st.sampled_from(doubles)), 1) + draw(st.binary(min_size=8, max_size=8))
        )
    if kind == "wrong_wire_type":
        payload = {0: varint(draw(UINT64)), 2: varint(3) + b"abc", 5: b"\0\0\x80\x7f"}
        wire_type = draw(st.sampled_from(sorted(payload)))
        return base + key(draw(st.integers(1, 15)), wire_type) + payload[wire_type]
    if kind == "truncated":
        return base[: draw(st.integers(0, len(base) - 1))]
    if kind == "flipped":
        return draw(damaged(base))
    return draw(st.binary(min_size=1, max_size=256))


@WIRE_FUZZ
@given(data=st.data())
def test_any_request_bytes_of_the_new_rpcs_end_in_a_status(
    fuzz_channel, live_stack, bank, bank_images, data
):
    rpc = data.draw(st.sampled_from(sorted(SERVICE)))
    sent = data.draw(wire_requests(known_good(rpc, bank, bank_images), rpc))
    code, details, messages = call(fuzz_channel, rpc, sent)
    check(code, details, messages, streaming=SERVICE[rpc][2])
    assert_still_serving(fuzz_channel, live_stack, bank)


@pytest.mark.parametrize("rpc", sorted(SERVICE))
def test_each_known_good_request_is_served(fuzz_channel, bank, bank_images, rpc):
    """The wire fuzzing's base requests are valid: the fuzz starts from served calls."""
    code, details, messages = call(fuzz_channel, rpc, known_good(rpc, bank, bank_images))
    assert code == grpc.StatusCode.OK, f"{rpc}: {code.name}: {details}"
    check(code, details, messages, streaming=SERVICE[rpc][2])
