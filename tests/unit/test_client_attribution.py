"""propscope SDK and CLI for attribution maps against an in-process fake AttributionService
(pure client logic: request building, map reshaping, errors, files and tables)."""

import base64
import io
import json
import re
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image
from typer.testing import CliRunner

from propscope import (
    Attribution,
    AttributionProgress,
    Client,
    Evaluation,
    EvaOptions,
    EvaResult,
    PropscopeError,
    RiseOptions,
    SobolOptions,
)
from propscope._maps import attribution_json, overlay_png, read_map
from propscope.cli import app
from propscope.v1 import attribution_pb2, attribution_pb2_grpc, explain_pb2, explain_pb2_grpc

HEIGHT, WIDTH = 6, 10  # a non-square image: rows and columns must not be swapped
LONG_SETTINGS = (
    "steps 10, baseline input zero (black for this UINT8 model), max fraction 1, target "
    "probability, curve integrated with the trapezoidal rule over the fraction perturbed"
)


def _image_bytes(height: int = HEIGHT, width: int = WIDTH) -> bytes:
    buffer = io.BytesIO()
    pixels = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _map_values(height: int, width: int) -> np.ndarray:
    """Row r, column c holds r + c / 100: a swapped or transposed map cannot pass."""
    rows, cols = np.mgrid[0:height, 0:width]
    return (rows + cols / 100).astype(np.float32)


class FakeAttribution(attribution_pb2_grpc.AttributionServiceServicer):
    """Answers with maps at the request image's size and a plan that echoes the request; the
    model "refused" is refused with a BadRequest naming nb_design, "fail-midway" fails after
    the plan, "no-result" ends without a map, "endless" streams progress until cancelled."""

    def __init__(self):
        self.requests = []
        self.cancelled = threading.Event()

    def _refuse(self, request, context):
        if request.model.name == "refused":
            status = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT,
                message="sobol.nb_design 24 is not a power of two",
            )
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="sobol.nb_design", description="use 16 or 32"
                        )
                    ]
                )
            )
            status.details.append(detail)
            context.abort_with_status(rpc_status.to_status(status))

    def Attribute(self, request, context):
        self.requests.append(request)
        self._refuse(request, context)
        rid = request.request_id or "server-made"
        with Image.open(io.BytesIO(request.image)) as image:
            width, height = image.size
        rise = request.WhichOneof("method") == "rise"
        if request.WhichOneof("method") == "eva":
            yield from self._eva(request, rid)
            return
        grid = request.rise.grid_size if rise else request.sobol.grid_size or 8
        sobol = attribution_pb2.SobolOptions(
            grid_size=grid,
            nb_design=request.sobol.nb_design or 32,
            estimator=request.sobol.estimator or attribution_pb2.SOBOL_ESTIMATOR_JANSEN,
            per_channel=request.sobol.per_channel,
            scrambled=request.sobol.scrambled,
        )
        passes = 4000 if rise else sobol.nb_design * (grid * grid + 2)
        yield attribution_pb2.AttributeEvent(
            request_id=rid,
            accepted=attribution_pb2.AttributeAccepted(
                method="rise" if rise else "sobol",
                model_version="3",
                planned_forward_passes=passes,
                planned_forward_passes_total=passes + 1,
                sobol=None if rise else sobol,
                rise=attribution_pb2.RiseOptions(
                    grid_size=grid, nb_samples=4000, preservation_probability=0.3
                )
                if rise
                else None,
                perturbation=attribution_pb2.Perturbation(
                    kind=request.perturbation.kind or attribution_pb2.Perturbation.KIND_INPAINTING,
                    baseline=request.perturbation.baseline
                    or attribution_pb2.Perturbation.BASELINE_INPUT_ZERO,
                    blur_sigma=0.5,
                ),
                target_score=request.target_score or attribution_pb2.TARGET_SCORE_PROBABILITY,
                target_class=4,
                target_label="tabby cat",
                warnings=["the model's input is UINT8: perturbed images are rounded"],
                perturbation_description="inpainting toward black at the model's 32x32 input",
            ),
        )
        if request.model.name == "fail-midway":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "limits.max_forward_passes")
        if request.model.name == "endless":
            context.add_callback(self.cancelled.set)
            while context.is_active():
                yield attribution_pb2.AttributeEvent(
                    request_id=rid,
                    progress=attribution_pb2.AttributeProgress(
                        forward_passes_done=1, forward_passes_total=passes
                    ),
                )
            return
        for done in (passes // 2, passes):
            yield attribution_pb2.AttributeEvent(
                request_id=rid,
                progress=attribution_pb2.AttributeProgress(
                    forward_passes_done=done, forward_passes_total=passes
                ),
            )
        if request.model.name == "no-result":
            return
        channel_grid = []
        if request.sobol.per_channel:
            channel_grid = np.arange(grid * grid * 3, dtype=np.float32).tolist()
        height_sent = height + 1 if request.model.name == "malformed" else height
        yield attribution_pb2.AttributeEvent(
            request_id=rid,
            result=attribution_pb2.AttributionResult(
                map=attribution_pb2.AttributionMap(
                    height=height_sent,
                    width=width,
                    values=_map_values(height, width).ravel().tolist(),
                ),
                grid=attribution_pb2.AttributionMap(
                    height=grid, width=grid, values=_map_values(grid, grid).ravel().tolist()
                ),
                channel_grid=channel_grid,
                forward_passes=passes,
                original_score=0.875,
                target_class=4,
                target_label="tabby cat",
                target_score=request.target_score or attribution_pb2.TARGET_SCORE_PROBABILITY,
                total_ms=12.5,
            ),
        )

    def _eva(self, request, rid):
        """An EVA map: the plan echoes the options (defaults filled in); the result's bounds
        are long numbers, a hybrid's is not guaranteed."""
        options = request.eva
        grid = options.grid_size or 8
        resolved = attribution_pb2.EvaOptions(
            grid_size=grid,
            epsilon=options.epsilon if options.HasField("epsilon") else 8 / 255,
            bound=options.bound or attribution_pb2.BOUND_METHOD_CROWN,
            hybrid_layer=options.hybrid_layer,
            samples=options.samples or 256,
        )
        rows = grid * grid + 1
        yield attribution_pb2.AttributeEvent(
            request_id=rid,
            accepted=attribution_pb2.AttributeAccepted(
                method="eva",
                model_version="3",
                planned_forward_passes=rows,
                planned_forward_passes_total=rows + 1,
                eva=resolved,
                target_score=attribution_pb2.TARGET_SCORE_LOGIT,
                target_class=4,
                target_label="tabby cat",
            ),
        )
        with Image.open(io.BytesIO(request.image)) as image:
            width, height = image.size
        region_bounds = (-1234.56789 - _map_values(grid, grid)).ravel()
        guaranteed = not options.hybrid_layer
        yield attribution_pb2.AttributeEvent(
            request_id=rid,
            result=attribution_pb2.AttributionResult(
                map=attribution_pb2.AttributionMap(
                    height=height, width=width, values=_map_values(height, width).ravel().tolist()
                ),
                grid=attribution_pb2.AttributionMap(
                    height=grid, width=grid, values=_map_values(grid, grid).ravel().tolist()
                ),
                forward_passes=rows,
                original_score=7.25,
                target_class=4,
                target_label="tabby cat",
                target_score=attribution_pb2.TARGET_SCORE_LOGIT,
                total_ms=12.5,
                warnings=[] if guaranteed else ["hybrid: the bounds are NOT guaranteed"],
                eva=attribution_pb2.EvaResult(
                    guaranteed=guaranteed,
                    bound=resolved.bound,
                    epsilon=resolved.epsilon,
                    epsilon_input=[0.137254901960784, 0.1394335511982571, 0.13071895424836602],
                    hybrid_layer=options.hybrid_layer,
                    overlap_bound=-1234.56789,
                    adversary_class=17,
                    adversary_label="a rather long adversary class label",
                    sampled_overlap=-98765.4321,
                    samples=resolved.samples,
                    region_bounds=region_bounds.tolist(),
                    certified=True,
                    bound_passes=rows,
                    sample_passes=123456789012,
                ),
            ),
        )

    def EvaluateAttribution(self, request, context):
        self.requests.append(request)
        self._refuse(request, context)
        names = [
            name
            for name in ("deletion", "insertion", "mu_fidelity", "stability")
            if request.HasField(name)
        ]
        rid = request.request_id or "server-made"
        yield attribution_pb2.EvaluateAttributionEvent(
            request_id=rid,
            accepted=attribution_pb2.EvaluationAccepted(
                metrics=names,
                model_version="3",
                planned_forward_passes=40,
                target_class=request.model.target_class,
                target_score=request.target_score or attribution_pb2.TARGET_SCORE_PROBABILITY,
                warnings=["the map's values are all equal"] if request.seed == 13 else [],
            ),
        )
        yield attribution_pb2.EvaluateAttributionEvent(
            request_id=rid,
            progress=attribution_pb2.AttributeProgress(
                forward_passes_done=20, forward_passes_total=40
            ),
        )
        # The sum of the map the server received: proves the map arrived in order.
        values = np.array(request.explanation.values, dtype=np.float64)
        first_row = float(values[: request.explanation.width].sum()) if values.size else 0.0
        results = {
            "deletion": attribution_pb2.MetricResult(
                metric="deletion",
                value=0.000123456789,
                fractions=[0.0, 0.5, 1.0],
                scores=[0.9, 0.2, 0.1],
                settings=LONG_SETTINGS,
                forward_passes=11,
            ),
            "insertion": attribution_pb2.MetricResult(
                metric="insertion",
                value=-93425.5,
                fractions=[0.0, 0.5, 1.0],
                scores=[0.1, 0.6, 0.9],
                settings="steps 10, baseline input zero, max fraction 1",
                forward_passes=11,
            ),
            "mu_fidelity": attribution_pb2.MetricResult(
                metric="mu_fidelity",
                value=first_row,
                attribution_sums=[1.0, 2.0],
                score_drops=[0.1, 0.3],
                settings="grid 9, subset 0.2, 200 samples",
                forward_passes=200,
            ),
            "stability": attribution_pb2.MetricResult(
                metric="stability",
                value=float("nan"),
                distances=[0.5, 0.25],
                settings="radius 0.1, 2 samples, sobol grid 8 N 32",
                forward_passes=4224,
            ),
        }
        skip = "insertion" if request.model.name == "missing-metric" else None
        for name in names:
            if name != skip:
                yield attribution_pb2.EvaluateAttributionEvent(request_id=rid, metric=results[name])


class FakeModels(explain_pb2_grpc.ExplainServiceServicer):
    """ListModels for the CLI's pre-flight: the fake's models, every method allowed."""

    def ListModels(self, request, context):
        names = ("resnet", "refused", "missing-metric")
        return explain_pb2.ListModelsResponse(
            models=[explain_pb2.ModelInfo(name=n, versions=["1"], state="READY") for n in names]
        )


@pytest.fixture
def service():
    fake = FakeAttribution()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    attribution_pb2_grpc.add_AttributionServiceServicer_to_server(fake, server)
    explain_pb2_grpc.add_ExplainServiceServicer_to_server(FakeModels(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.target = f"127.0.0.1:{port}"
    yield fake
    server.stop(grace=None)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(_image_bytes())
    return path


def _recording_calls(stub, method: str, monkeypatch) -> list:
    """The calls the stub's method starts, as they start."""
    started = []
    start = getattr(stub, method)

    def recorded(*args, **kwargs):
        started.append(start(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(stub, method, recorded)
    return started


# --- SDK ------------------------------------------------------------------------------------


def test_attribute_round_trip_reshapes_the_map_row_major(service, image_file):
    progress: list[AttributionProgress] = []
    with Client(service.target, timeout=30) as client:
        found = client.attribute(
            image_file,
            "resnet",
            grid_size=4,
            nb_design=16,
            estimator="glen_isaacs",
            scrambled=True,
            seed=9,
            target_score="logit",
            baseline="mean_colour",
            request_id="mine",
            on_progress=progress.append,
        )
    request = service.requests[0]
    assert request.WhichOneof("method") == "sobol"
    assert (request.sobol.grid_size, request.sobol.nb_design) == (4, 16)
    assert request.sobol.estimator == attribution_pb2.SOBOL_ESTIMATOR_GLEN_ISAACS
    assert request.sobol.scrambled and request.seed == 9
    assert request.target_score == attribution_pb2.TARGET_SCORE_LOGIT
    assert request.perturbation.baseline == attribution_pb2.Perturbation.BASELINE_MEAN_COLOUR
    assert request.model.predicted_class  # no target_class: follow the prediction
    assert request.image == image_file.read_bytes()  # a PNG file is sent unchanged

    assert isinstance(found, Attribution)
    assert found.map.dtype == np.float32 and found.map.shape == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(found.map, _map_values(HEIGHT, WIDTH))
    assert found.grid.shape == (4, 4) and found.channel_grid is None
    assert not found.map.flags.writeable
    assert found.options == SobolOptions(
        grid_size=4, nb_design=16, estimator="glen_isaacs", per_channel=False, scrambled=True
    )
    assert found.options.describe() == "grid 4, N 16, glen_isaacs, scrambled"
    assert found.perturbation.baseline == "mean_colour" and found.perturbation.blur_sigma == 0.5
    assert found.target_score == "logit"
    assert (found.target_class, found.target_label) == (4, "tabby cat")
    assert found.forward_passes == 16 * (4 * 4 + 2) == found.planned_forward_passes
    assert found.planned_forward_passes_total == found.planned_forward_passes + 1
    assert found.original_score == 0.875 and not found.cache_hit
    assert found.request_id == "mine" and found.model_version == "3"
    assert found.warnings == ("the model's input is UINT8: perturbed images are rounded",)
    assert [(p.done, p.total) for p in progress] == [(144, 288), (288, 288)]


def test_attribute_rise_and_per_channel(service):
    with Client(service.target) as client:
        rise = client.attribute(
            _image_bytes(),
            "resnet",
            method="rise",
            grid_size=5,
            nb_samples=4000,
            preservation_probability=0.3,
            target_class=4,
        )
        per_channel = client.attribute(_image_bytes(), "resnet", grid_size=3, per_channel=True)
    sent = service.requests[0]
    assert sent.WhichOneof("method") == "rise" and sent.model.target_class == 4
    assert sent.rise.preservation_probability == pytest.approx(0.3)
    assert rise.method == "rise"
    assert rise.options == RiseOptions(grid_size=5, nb_samples=4000, preservation_probability=0.3)
    assert per_channel.channel_grid.shape == (3, 3, 3)
    # channel last: cell (r, c) holds channels 3 * (r * g + c) + 0..2
    assert per_channel.channel_grid[1, 2].tolist() == [15.0, 16.0, 17.0]


def test_attribute_eva_sends_its_options_and_reads_its_bounds(service):
    with Client(service.target) as client:
        found = client.attribute(
            _image_bytes(),
            "resnet",
            method="eva",
            grid_size=4,
            epsilon=4 / 255,
            bound="ibp",
            samples=64,
            seed=3,
        )
        hybrid = client.attribute(
            _image_bytes(), "resnet", method="eva", hybrid_layer="features.3", target_score="logit"
        )
    sent, sent_hybrid = service.requests
    assert sent.WhichOneof("method") == "eva" and sent.seed == 3
    assert (sent.eva.grid_size, sent.eva.samples, sent.eva.hybrid_layer) == (4, 64, "")
    assert sent.eva.epsilon == pytest.approx(4 / 255)
    assert sent.eva.bound == attribution_pb2.BOUND_METHOD_IBP
    # Unset: the server's defaults (crown, 8/255), not the client's guess.
    assert sent_hybrid.eva.bound == attribution_pb2.BOUND_METHOD_UNSPECIFIED
    assert not sent_hybrid.eva.HasField("epsilon") and sent_hybrid.eva.hybrid_layer == "features.3"

    assert found.method == "eva" and found.target_score == "logit"
    assert found.options == EvaOptions(
        grid_size=4, epsilon=0.015686275, bound="ibp", hybrid_layer="", samples=64
    )
    assert found.options.describe() == "grid 4, eps 0.01569, ibp, verified, 64 samples"
    eva = found.eva
    assert eva.guaranteed and eva.certified and eva.guarantee == "verified (guaranteed)"
    assert (eva.bound, eva.samples, eva.bound_passes) == ("ibp", 64, 17)
    assert (eva.overlap_bound, eva.sampled_overlap) == (-1234.56789, -98765.4321)
    assert (eva.adversary_class, eva.adversary_label) == (17, "a rather long adversary class label")
    assert eva.sample_passes == 123456789012 and len(eva.epsilon_input) == 3
    # region_bounds row-major g x g: cell (r, c) is -1234.56789 - (r + c / 100)
    assert eva.region_bounds.shape == (4, 4) and not eva.region_bounds.flags.writeable
    assert eva.region_bounds[1, 2] == pytest.approx(-1234.56789 - 1.02)
    document = found.to_dict()
    assert document["eva"]["region_bounds"][1][2] == pytest.approx(-1235.58789)
    assert document["eva"]["guaranteed"] is True and document["options"]["bound"] == "ibp"
    assert json.loads(json.dumps(found.plan_dict()))["eva"]["sample_passes"] == 123456789012
    # EVA perturbs nothing: no perturbation in the SDK's result or its JSON.
    assert found.perturbation is None and "perturbation" not in document
    assert "perturbation_description" in document

    assert not hybrid.eva.guaranteed
    assert hybrid.eva.guarantee == "hybrid from features.3: NOT guaranteed"
    assert hybrid.options.describe() == (
        "grid 8, eps 0.03137, crown, hybrid from features.3, 256 samples"
    )
    assert hybrid.warnings == ("hybrid: the bounds are NOT guaranteed",)


@pytest.mark.parametrize(
    ("number", "word"),
    [
        (attribution_pb2.EVA_DECISION_CERTIFIED, "certified"),
        (attribution_pb2.EVA_DECISION_NOT_ROBUST, "not_robust"),
        (attribution_pb2.EVA_DECISION_UNDECIDED, "undecided"),
        # An older server that decides nothing: never read as certified.
        (attribution_pb2.EVA_DECISION_UNSPECIFIED, "undecided"),
    ],
)
def test_an_eva_result_carries_the_servers_decision_and_verdict(number, word):
    """The decision is the server's (scoring/eva.py decide), read, not derived again."""
    message = attribution_pb2.EvaResult(
        region_bounds=[0.0] * 4, decision=number, verdict="undecided: a gap of 176.6"
    )
    found = EvaResult.from_proto(message, (2, 2))
    assert found.decision == word
    assert found.verdict == "undecided: a gap of 176.6"
    assert found.to_dict()["decision"] == word


def test_a_warning_in_the_plan_and_the_result_is_said_once():
    caveat = "not guaranteed: hybrid from layer 'features.1'"
    accepted = attribution_pb2.AttributeAccepted(method="rise", warnings=[caveat, "plan only"])
    cell = attribution_pb2.AttributionMap(height=1, width=1, values=[0.0])
    result = attribution_pb2.AttributionResult(
        map=cell, grid=cell, warnings=[caveat, "result only"]
    )
    found = Attribution.from_events("r", accepted, result)
    assert found.warnings == (caveat, "plan only", "result only")


def test_sobol_and_rise_results_have_no_eva(service):
    with Client(service.target) as client:
        found = client.attribute(_image_bytes(), "resnet", grid_size=2)
    assert found.eva is None and found.plan_dict()["eva"] is None


def test_an_eva_result_without_whole_region_bounds_is_malformed():
    accepted = attribution_pb2.AttributeAccepted(
        method="eva", eva=attribution_pb2.EvaOptions(grid_size=2)
    )
    grid = attribution_pb2.AttributionMap(height=2, width=2, values=[0.0] * 4)
    result = attribution_pb2.AttributionResult(
        map=grid, grid=grid, eva=attribution_pb2.EvaResult(region_bounds=[1.0, 2.0, 3.0])
    )
    with pytest.raises(ValueError, match="eva.region_bounds: 3 values for a 2 x 2 grid"):
        Attribution.from_events("r", accepted, result)
    result.ClearField("eva")
    with pytest.raises(ValueError, match="EVA map without its bounds"):
        Attribution.from_events("r", accepted, result)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epsilon": 0.0}, "epsilon \\(--epsilon\\) must be in \\(0, 1\\]"),
        ({"epsilon": 1.5}, "epsilon \\(--epsilon\\) must be in \\(0, 1\\]"),
        ({"epsilon": float("nan")}, "epsilon \\(--epsilon\\) must be in \\(0, 1\\]"),
        ({"bound": "zonotope"}, "bound must be one of ibp, crown"),
        ({"grid_size": 1}, "grid_size \\(--grid-size\\) must be in 2..32"),
        ({"grid_size": 33}, "grid_size \\(--grid-size\\) must be in 2..32"),
        ({"samples": 65537}, "samples \\(--samples\\) must be in 1..65536"),
        ({"samples": -1}, "samples must be >= 0"),
        ({"nb_design": 32}, "are Sobol options; EVA takes"),
        ({"nb_samples": 100}, "are RISE options; EVA's sampled points are samples"),
        (
            {"target_score": "probability"},
            "target_score \\(--target-score\\) must be auto or logit for EVA",
        ),
        ({"perturbation": "blur"}, "perturbation, baseline and blur_sigma"),
        ({"baseline": "black"}, "perturbation, baseline and blur_sigma"),
        ({"hybrid_layer": 3}, "hybrid_layer must be a declared layer's name"),
    ],
)
def test_attribute_eva_bad_arguments_raise_before_the_call(service, options, message):
    with Client(service.target) as client:
        with pytest.raises((ValueError, TypeError), match=message):
            client.attribute(_image_bytes(), "resnet", method="eva", **options)
    assert service.requests == []


@pytest.mark.parametrize(
    "options",
    [{"epsilon": 0.1}, {"bound": "ibp"}, {"hybrid_layer": "features.3"}, {"samples": 10}],
)
@pytest.mark.parametrize("method", ["sobol", "rise"])
def test_eva_options_are_refused_for_the_other_methods(service, method, options):
    with Client(service.target) as client:
        with pytest.raises(ValueError, match="are EVA options; choose method eva"):
            client.attribute(_image_bytes(), "resnet", method=method, **options)
    assert service.requests == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nb_design": 24}, "power of two"),
        ({"method": "lime"}, "method must be sobol, rise or eva"),
        ({"estimator": "sobol"}, "estimator must be one of"),
        ({"baseline": "grey"}, "baseline must be one of"),
        ({"method": "rise", "nb_design": 32}, "are Sobol options"),
        ({"method": "rise", "scrambled": True}, "are Sobol options"),
        ({"nb_samples": 10}, "are RISE options"),
        ({"method": "rise", "preservation_probability": 1.0}, "preservation_probability"),
        ({"target_class": -1}, "target_class must be >= 0"),
        ({"target_score": "softmax"}, "target_score must be one of"),
    ],
)
def test_attribute_bad_arguments_raise_before_the_call(service, options, message):
    with Client(service.target) as client:
        with pytest.raises(ValueError, match=message):
            client.attribute(_image_bytes(), "resnet", **options)
    assert service.requests == []


def test_refusal_carries_code_and_field_violations(service):
    with Client(service.target) as client:
        with pytest.raises(PropscopeError) as info:
            client.attribute(_image_bytes(), "refused", nb_design=16)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field_violations == (("sobol.nb_design", "use 16 or 32"),)
    assert "sobol.nb_design: use 16 or 32" in str(info.value)


def test_errors_midway_and_incomplete_streams(service):
    with Client(service.target) as client:
        with pytest.raises(PropscopeError) as midway:
            client.attribute(_image_bytes(), "fail-midway")
        with pytest.raises(PropscopeError, match="without the plan and the map") as missing:
            client.attribute(_image_bytes(), "no-result")
        with pytest.raises(PropscopeError, match="malformed map") as malformed:
            client.attribute(_image_bytes(), "malformed")
    assert midway.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert midway.value.message == "limits.max_forward_passes"
    assert missing.value.code == malformed.value.code == grpc.StatusCode.INTERNAL


def test_an_exception_in_on_progress_cancels_the_call(service, monkeypatch):
    def stop(update):
        raise KeyboardInterrupt

    with Client(service.target) as client:
        started = _recording_calls(client._attribution, "Attribute", monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            client.attribute(_image_bytes(), "endless", on_progress=stop)
        assert started[0].cancelled()  # before it raises
    assert service.cancelled.wait(timeout=10)


def test_evaluate_round_trip(service):
    explanation = _map_values(HEIGHT, WIDTH)
    seen = []
    with Client(service.target) as client:
        found = client.evaluate_attribution(
            _image_bytes(),
            "resnet",
            explanation,
            steps=10,
            max_percentage_perturbed=0.5,
            baseline="black",
            subset_percent=0.25,
            target_class=4,
            on_metric=seen.append,
        )
    request = service.requests[0]
    assert (request.explanation.height, request.explanation.width) == (HEIGHT, WIDTH)
    assert request.deletion.steps == request.insertion.steps == 10
    assert request.deletion.max_percentage_perturbed == pytest.approx(0.5)
    assert request.mu_fidelity.baseline == attribution_pb2.Perturbation.BASELINE_BLACK
    assert request.mu_fidelity.subset_percent == pytest.approx(0.25)
    assert not request.HasField("stability")

    assert isinstance(found, Evaluation)
    assert found.metrics == ("deletion", "insertion", "mu_fidelity")
    assert [r.metric for r in found.results] == list(found.metrics) == [r.metric for r in seen]
    deletion = found["deletion"]
    np.testing.assert_array_equal(deletion.fractions, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(deletion.scores, [0.9, 0.2, 0.1])
    assert deletion.settings == LONG_SETTINGS
    # The server summed the first row it received: row-major, rows not swapped with columns.
    assert found["mu_fidelity"].value == pytest.approx(float(explanation[0].sum()), rel=1e-6)
    assert found.target_class == 4 and found.target_score == "probability"
    with pytest.raises(KeyError, match="no 'stability' result"):
        found["stability"]


def test_evaluate_takes_an_attribution_and_stability_alone(service):
    with Client(service.target) as client:
        attribution = client.attribute(_image_bytes(), "resnet")
        client.evaluate_attribution(_image_bytes(), "resnet", attribution, metrics=["deletion"])
        stability = client.evaluate_attribution(
            _image_bytes(),
            "resnet",
            metrics=["stability"],
            radius=0.2,
            stability_samples=2,
            stability_method="rise",
            stability_options={"grid_size": 5},
        )
    sent = service.requests[1].explanation
    np.testing.assert_array_equal(sent.values, attribution.map.ravel())
    request = service.requests[2]
    assert not request.HasField("explanation") and not request.HasField("deletion")
    assert request.stability.WhichOneof("method") == "rise"
    assert request.stability.rise.grid_size == 5 and request.stability.nb_samples == 2
    result = stability["stability"]
    assert np.isnan(result.value) and result.to_dict()["value"] is None
    assert result.distances.tolist() == [0.5, 0.25] and result.fractions.size == 0


@pytest.mark.parametrize(
    ("explanation", "options", "message"),
    [
        (None, {}, "explanation .* is required for deletion"),
        (np.zeros((2, 3, 3)), {}, "HxW array"),
        (np.array([[0.0, np.nan]]), {}, "NaN"),
        (np.ones((2, 2)), {"metrics": ["deletion", "shap"]}, "metrics must be some of"),
        (np.ones((2, 2)), {"max_percentage_perturbed": 0.0}, r"\(0, 1\]"),
        (np.ones((2, 2)), {"subset_percent": 1.0}, r"\(0, 1\)"),
    ],
)
def test_evaluate_bad_arguments_raise_before_the_call(service, explanation, options, message):
    with Client(service.target) as client:
        with pytest.raises(ValueError, match=message):
            client.evaluate_attribution(_image_bytes(), "resnet", explanation, **options)
    assert service.requests == []


def test_evaluate_missing_metric_is_a_server_fault(service):
    with Client(service.target) as client:
        with pytest.raises(PropscopeError, match="results of insertion"):
            client.evaluate_attribution(_image_bytes(), "missing-metric", np.ones((HEIGHT, WIDTH)))


# --- files ----------------------------------------------------------------------------------


def test_map_json_round_trip_is_exact(service, tmp_path):
    with Client(service.target) as client:
        found = client.attribute(_image_bytes(), "resnet", grid_size=2)
    path = tmp_path / "x.json"
    path.write_text(json.dumps(attribution_json(found, model="resnet")))
    values, stored = read_map(path)
    np.testing.assert_array_equal(values, found.map)
    assert stored["method"] == "sobol" and stored["target_class"] == 4
    assert stored["grid"] == [[0.0, 0.01], [1.0, 1.01]]  # float32 spelled shortest

    npy = tmp_path / "captum.npy"
    np.save(npy, np.arange(6, dtype=np.float64).reshape(2, 3))
    assert read_map(npy)[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    (tmp_path / "rows.json").write_text(json.dumps({"map": [[1, 2], [3, 4]]}))
    assert read_map(tmp_path / "rows.json")[0].shape == (2, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"grid": []}, "needs a 'map' key"),
        ({"map": {"height": 2, "width": 2, "base64": "AAAA"}}, "holds 3 bytes"),
        ({"map": [[1, 2], [3]]}, "equal-length rows"),
        ({"map": [1, 2, 3]}, "HxW"),
    ],
)
def test_read_map_names_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_map(path)


def test_overlay_colours_the_hottest_pixels_and_keeps_the_size():
    image = np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    values = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
    values[0, WIDTH - 1] = 1.0
    with Image.open(io.BytesIO(overlay_png(buffer.getvalue(), values, alpha=1.0))) as out:
        pixels = np.asarray(out.convert("RGB"))
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    # jet: the maximum is dark red, the minimum dark blue.
    hot, cold = pixels[0, WIDTH - 1], pixels[HEIGHT - 1, 0]
    assert hot[0] > 100 and hot[2] < 50 and cold[2] > 100 and cold[0] < 50
    with pytest.raises(ValueError, match="unknown matplotlib colormap"):
        overlay_png(buffer.getvalue(), values, colormap="no-such-map")


# --- CLI ------------------------------------------------------------------------------------


def test_cli_attribute_writes_png_and_json(service, image_file, tmp_path):
    out = tmp_path / "maps"
    result = CliRunner().invoke(
        app,
        [
            "attribute",
            str(image_file),
            "--model",
            "resnet",
            "--target",
            service.target,
            "--grid-size",
            "4",
            "--nb-design",
            "16",
            "--out",
            str(out),
        ],
        env={"COLUMNS": "80"},
    )
    assert result.exit_code == 0, result.output
    png, written = out / "cat.sobol.png", out / "cat.sobol.json"
    with Image.open(png) as overlay:
        assert overlay.size == (WIDTH, HEIGHT)
    document = json.loads(written.read_text())
    assert document["format"] == "propscope.attribution/1"
    assert (document["model"], document["image"]) == ("resnet", str(image_file))
    assert document["overlay"] == "cat.sobol.png"
    assert document["options"] == {
        "grid_size": 4,
        "nb_design": 16,
        "estimator": "jansen",
        "per_channel": False,
        "scrambled": False,
    }
    assert document["forward_passes"] == 288 and document["total_ms"] == 12.5
    raw = base64.b64decode(document["map"]["base64"])
    values = np.frombuffer(raw, dtype="<f4").reshape(HEIGHT, WIDTH)
    np.testing.assert_array_equal(values, _map_values(HEIGHT, WIDTH))
    # Not a terminal: progress as plain lines on stderr, with the passes and an ETA.
    assert "144/288 sobol passes (50%" in result.output and "ETA" in result.output
    assert f"wrote {png}" in result.output
    assert "target class 4 (tabby cat), probability 0.875" in result.output


def test_cli_attribute_rise_options_and_bad_choice(service, image_file, tmp_path):
    runner = CliRunner()
    common = ["--model", "resnet", "--target", service.target, "--out", str(tmp_path)]
    ok = runner.invoke(
        app,
        ["attribute", str(image_file), *common, "--method", "rise", "--samples", "500"],
    )
    assert ok.exit_code == 0, ok.output
    assert service.requests[0].rise.nb_samples == 500
    assert (tmp_path / "cat.rise.png").is_file()
    bad = runner.invoke(app, ["attribute", str(image_file), *common, "--estimator", "x"])
    assert bad.exit_code == 2 and "--estimator" in bad.output
    refused = runner.invoke(app, ["attribute", str(image_file), *common[2:], "--model", "refused"])
    assert refused.exit_code == 2
    assert "INVALID_ARGUMENT" in refused.output and "sobol.nb_design" in refused.output
    assert "(option --nb-design)" in refused.output  # the field's option, named
    assert len(service.requests) == 2


def test_cli_evaluate_table_fits_80_columns_and_keeps_numbers_whole(service, image_file, tmp_path):
    map_file = tmp_path / "maps" / "cat.sobol.json"
    map_file.parent.mkdir()
    values = _map_values(HEIGHT, WIDTH)
    found_json = {"map": values.tolist(), "target_class": 4}
    map_file.write_text(json.dumps(found_json))
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(image_file),
            "--model",
            "resnet",
            "--map",
            str(map_file),
            "--target",
            service.target,
            "--seed",
            "13",
        ],
        env={"COLUMNS": "80"},
    )
    assert result.exit_code == 0, result.output
    request = service.requests[-1]
    assert request.model.target_class == 4  # the map file's class
    lines = [line for line in result.stdout.splitlines() if not line.startswith("wrote ")]
    assert max(len(line) for line in lines) <= 80, result.stdout
    assert "…" not in result.stdout
    for number in ("0.0001235", "-9.343e+04", f"{float(values[0].sum()):.4g}"):
        assert re.search(rf"(^|\s){re.escape(number)}(\s|$)", result.stdout), number
    # the long settings are folded onto more lines, never cut
    assert "trapezoidal" in result.stdout and "warning: the map's values" in result.stdout


def test_cli_evaluate_json_and_errors(service, image_file, tmp_path):
    npy = tmp_path / "m.npy"
    np.save(npy, np.ones((HEIGHT, WIDTH)))
    runner = CliRunner()
    common = ["--model", "resnet", "--target", service.target]
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(image_file),
            *common,
            "--map",
            str(npy),
            "--metrics",
            "deletion",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["metrics"] == ["deletion"]
    assert document["results"][0]["scores"] == [0.9, 0.2, 0.1]
    no_map = runner.invoke(app, ["evaluate", str(image_file), *common])
    assert no_map.exit_code == 2 and "--map is required" in no_map.output
    bad_metric = runner.invoke(
        app, ["evaluate", str(image_file), *common, "--map", str(npy), "--metrics", "shap"]
    )
    assert bad_metric.exit_code == 2 and "--metrics" in bad_metric.output
    stability = runner.invoke(
        app, ["evaluate", str(image_file), *common, "--metrics", "stability", "--json"]
    )
    assert stability.exit_code == 0, stability.output
    assert json.loads(stability.stdout)["results"][0]["value"] is None


def test_cli_attribute_plain_writes_its_warnings(service, image_file, tmp_path):
    """A CI log reads the caveats too: plain output has a warning line for each."""
    common = ["--model", "resnet", "--target", service.target, "--out", str(tmp_path)]
    result = CliRunner().invoke(app, ["attribute", str(image_file), *common, "--format", "plain"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("attribution model=resnet method=sobol")
    assert (
        'warning model=resnet message="the model\'s input is UINT8: perturbed images are rounded"'
        in lines
    )


def test_cli_attribute_eva_in_every_format(service, image_file, tmp_path):
    runner = CliRunner()
    common = ["--model", "resnet", "--target", service.target, "--out", str(tmp_path)]
    eva = ["--method", "eva", "--epsilon", "0.02", "--bound", "ibp", "--samples", "32"]
    table = runner.invoke(app, ["attribute", str(image_file), *common, *eva], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    sent = service.requests[0]
    assert sent.WhichOneof("method") == "eva"
    assert (sent.eva.samples, sent.eva.bound) == (32, attribution_pb2.BOUND_METHOD_IBP)
    assert sent.eva.epsilon == pytest.approx(0.02)
    # "wrote PATH" lines are never broken (a path must stay one string to copy): the rest fit.
    table_lines = [line for line in table.stdout.splitlines() if not line.startswith("wrote ")]
    assert max(len(line) for line in table_lines) <= 80, table.stdout
    assert "bounds: verified (guaranteed), ibp" in table.stdout
    assert "overlap bound -1235 " in table.stdout and "-9.877e+04" in table.stdout
    assert "adversary class 17" in table.stdout and "perturbation:" not in table.stdout
    document = json.loads((tmp_path / "cat.eva.json").read_text())
    assert (
        document["eva"]["overlap_bound"] == -1234.56789
        and len(document["eva"]["region_bounds"]) == 8
    )

    plain = runner.invoke(
        app,
        ["attribute", str(image_file), *common, "--method", "eva", "--hybrid-layer", "features.3",
         "--format", "plain"],
    )  # fmt: skip
    assert plain.exit_code == 0, plain.output
    line = plain.stdout.splitlines()[0]
    assert line.startswith("attribution model=resnet method=eva")
    for pair in ("guaranteed=no", "hybrid_layer=features.3", "overlap_bound=-1234.56789",
                 "sampled_overlap=-98765.4321", "certified=yes", "sample_passes=123456789012"):  # fmt: skip
        assert pair in line.split(), (pair, line)

    as_json = runner.invoke(
        app, ["attribute", str(image_file), *common, "--method", "eva", "--format", "json"]
    )
    assert as_json.exit_code == 0, as_json.output
    figures = json.loads(as_json.stdout)
    assert figures["eva"]["guaranteed"] is True and figures["options"]["samples"] == 256

    bad_bound = runner.invoke(
        app, ["attribute", str(image_file), *common, *eva[:4], "--bound", "x"]
    )
    assert bad_bound.exit_code == 2 and "--bound" in bad_bound.output
    sobol_epsilon = runner.invoke(app, ["attribute", str(image_file), *common, "--epsilon", "0.1"])
    assert sobol_epsilon.exit_code == 2 and "are EVA options" in sobol_epsilon.output
    assert len(service.requests) == 3
