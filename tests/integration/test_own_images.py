"""The caller's own images on the real stack: regions given as a mask or a box on a
photo-like image of another size, warnings when the automatic object split is
unreliable, a no-op edit's clear status, a late jump decided by an adaptive path,
and the preprocessing and labels said in Accepted."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2
from PIL import Image

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc as rpc
from tests.integration.conftest import SAMPLE, png
from tests.photos import photo_like

PHOTO = photo_like(333, 500, seed=3)


@pytest.fixture(scope="module")
def stub(channel) -> rpc.ExplainServiceStub:
    return rpc.ExplainServiceStub(channel)


def hue(**parameters: str) -> pb.EditorIntervention:
    return pb.EditorIntervention(model="procedural", parameters={"operation": "hue", **parameters})


def explain(stub, image: bytes, properties: list[pb.Property], **fields) -> list[pb.ExplainEvent]:
    fields.setdefault("model", pb.ModelRef(name="synth_unbiased"))
    request = pb.ExplainRequest(image=image, properties=properties, **fields)
    return list(stub.Explain(request, timeout=120))


def result_of(events: list[pb.ExplainEvent]) -> pb.PropertyResult:
    (result,) = [e.property_result for e in events if e.HasField("property_result")]
    return result


def decoded_path(result: pb.PropertyResult) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in result.samples[0].path_images])


def test_a_mask_of_another_size_confines_the_edit_on_a_photo(stub):
    # The mask is half the photo's size: the left half of its width, rows 40%..90%.
    mask = np.zeros((166, 250), np.uint8)
    mask[66:150, :125] = 255
    prop = pb.Property(name="hue", editor=hue(), region=pb.Region(mask=png(mask)))
    events = explain(
        stub, png(PHOTO), [prop], steps=6, path_mode=pb.PATH_MODE_FIXED, return_path_images=True
    )
    result = result_of(events)
    assert result.status.code == code_pb2.OK, result.status.message
    path = decoded_path(result)
    assert path.shape == (7, 333, 500, 3) and np.array_equal(path[0], PHOTO)
    changed = np.any(path != PHOTO, axis=(0, 3))
    outside = np.ones((333, 500), bool)
    outside[130:302, :252] = False  # the mask scaled twice, with a 2-pixel margin for blending
    assert not changed[outside].any()
    inside = changed[134:298, :246]
    assert inside.mean() > 0.9


def test_a_box_in_fractions_confines_the_edit(stub):
    box = pb.Box(left=0.5, top=0.0, right=1.0, bottom=0.5)
    prop = pb.Property(name="hue", editor=hue(), region=pb.Region(box=box))
    result = result_of(
        explain(
            stub, png(PHOTO), [prop], steps=6, path_mode=pb.PATH_MODE_FIXED, return_path_images=True
        )
    )
    changed = np.any(decoded_path(result) != PHOTO, axis=(0, 3))
    assert changed[:166, 250:].mean() > 0.9
    changed[:166, 250:] = False  # round(0.5 * 333) = 166 rows, 250 columns
    assert not changed.any()


def test_the_automatic_object_split_warns_on_a_photo_not_on_the_synthetic_world(stub):
    prop = pb.Property(name="object_hue", editor=hue(region="object"))
    on_photo = result_of(explain(stub, png(PHOTO), [prop]))
    assert on_photo.status.code == code_pb2.OK
    assert any("unreliable" in w and "mask or a box" in w for w in on_photo.warnings)
    on_sample = result_of(explain(stub, SAMPLE.read_bytes(), [prop]))
    assert list(on_sample.warnings) == []


def test_a_hue_edit_on_a_grey_image_gets_a_status_not_a_score_of_zero(stub):
    grey = np.full((64, 64, 3), 128, np.uint8)
    result = result_of(explain(stub, png(grey), [pb.Property(name="hue", editor=hue())]))
    assert result.status.code == code_pb2.FAILED_PRECONDITION
    assert "equal to the original" in result.status.message


def test_a_late_jump_is_decided_at_default_settings_and_a_fixed_path_says_it_could_not(stub):
    desaturate = pb.EditorIntervention(
        model="procedural", parameters={"operation": "saturation", "region": "object"}
    )
    prop = pb.Property(name="saturation", editor=desaturate)
    model = pb.ModelRef(name="synth_hue")
    fixed = result_of(
        explain(stub, SAMPLE.read_bytes(), [prop], model=model, path_mode=pb.PATH_MODE_FIXED)
    )
    assert fixed.steps == 10 and fixed.probability_change > 0.5
    assert fixed.decision == pb.DECISION_CANNOT_REACH_ALPHA and not fixed.relevant
    assert "N = 10" in fixed.decision_detail
    events = explain(stub, SAMPLE.read_bytes(), [prop], model=model)
    accepted = events[0].accepted
    assert accepted.path_mode == pb.PATH_MODE_ADAPTIVE and accepted.max_steps == 80
    adaptive = result_of(events)
    assert adaptive.decision == pb.DECISION_RELEVANT and adaptive.relevant
    assert adaptive.steps in (20, 40, 80) and adaptive.p_value < 0.01
    assert len(adaptive.samples[0].prediction_curve) == adaptive.steps + 1
    assert adaptive.edits == sum(n for n in (10, 20, 40, 80) if n <= adaptive.steps)


def test_accepted_says_which_preprocessing_applies_and_where_it_came_from(stub):
    prop = [pb.Property(name="hue", editor=hue(region="object"))]
    sample = SAMPLE.read_bytes()
    from_file = explain(stub, sample, prop, model=pb.ModelRef(name="synth_hue_fp32"))[0].accepted
    assert list(from_file.preprocessing.mean) == pytest.approx([0.5] * 3)
    assert "mean: gateway file" in from_file.preprocessing_sources
    assert from_file.preprocessing.output_kind == pb.Preprocessing.OUTPUT_KIND_LOGITS
    override = pb.Preprocessing(mean=[0.4] * 3, std=[0.3] * 3)
    from_request = explain(
        stub, sample, prop, model=pb.ModelRef(name="synth_hue_fp32", preprocessing=override)
    )[0].accepted
    assert list(from_request.preprocessing.std) == pytest.approx([0.3] * 3)
    assert "std: request" in from_request.preprocessing_sources
    declared = explain(stub, sample, prop, model=pb.ModelRef(name="synth_hue"))[0].accepted
    assert "output_kind: model config" in declared.preprocessing_sources
    assert list(declared.warnings) == []


def test_class_labels_name_the_target(stub):
    prop = [pb.Property(name="hue", editor=hue())]
    declared = explain(stub, SAMPLE.read_bytes(), prop, model=pb.ModelRef(name="synth_hue"))
    assert list(declared[0].accepted.class_labels) == ["circle", "square"]  # its config.pbtxt
    assert result_of(declared).target_label == "circle"
    model = pb.ModelRef(name="synth_hue", class_labels=["round", "angular"])
    events = explain(stub, SAMPLE.read_bytes(), prop, model=model)
    assert list(events[0].accepted.class_labels) == ["round", "angular"]
    assert result_of(events).target_label == "round"
    wrong = pb.ModelRef(name="synth_hue", class_labels=["only one"])
    with pytest.raises(grpc.RpcError) as info:
        explain(stub, SAMPLE.read_bytes(), [pb.Property(name="hue", editor=hue())], model=wrong)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.class_labels has 1 names" in info.value.details()


@pytest.mark.parametrize(
    ("region", "needle"),
    [
        (pb.Region(box=pb.Box(left=0.6, right=0.2, bottom=1)), "properties[0].region.box"),
        (pb.Region(mask=b"not an image"), "properties[0].region.mask"),
        (pb.Region(mask=png(np.zeros((8, 8), np.uint8))), "all zero"),
    ],
)
def test_a_bad_region_is_refused_naming_the_field(stub, region, needle):
    prop = pb.Property(name="hue", editor=hue(), region=region)
    with pytest.raises(grpc.RpcError) as info:
        explain(stub, SAMPLE.read_bytes(), [prop])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()
