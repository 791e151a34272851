"""protobuf <-> domain: image decoding limits, request defaults and refusals, result events."""

from __future__ import annotations

import io

import numpy as np
import pytest
from google.rpc import code_pb2, error_details_pb2
from PIL import Image

from propscope.v1 import explain_pb2 as pb
from propscope_server import domain
from propscope_server.api.convert import (
    MAX_MESSAGE_BYTES,
    checked_version,
    decode_image,
    error_status,
    event_message,
    explain_spec,
    property_result,
)
from propscope_server.config import Limits
from propscope_server.errors import DeadlineExceeded, InvalidArgument, NotFound
from propscope_server.scoring.property_gradient import Decision, PropertyScore

PIXELS = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = encode(PIXELS, "PNG")


@pytest.mark.parametrize(
    ("data", "limits", "needle"),
    [
        (b"", Limits(), "image is empty"),
        (b"definitely not an image", Limits(), "could not be decoded"),
        (PNG[: len(PNG) // 2], Limits(), "could not be decoded"),
        (encode(PIXELS, "GIF"), Limits(), "image is GIF; send PNG or JPEG"),
        (encode(PIXELS, "BMP"), Limits(), "image is BMP; send PNG or JPEG"),
        (PNG, Limits(max_image_bytes=len(PNG) - 1), f"the limit max_image_bytes is {len(PNG) - 1}"),
        (
            PNG,
            Limits(max_image_pixels=119),
            "image is 10x12 pixels; the limit max_image_pixels is 119",
        ),
    ],
)
def test_decode_image_refusals(data, limits, needle):
    with pytest.raises(InvalidArgument) as info:
        decode_image(data, limits)
    assert needle in str(info.value)


def test_limits_are_inclusive():
    assert decode_image(PNG, Limits(max_image_bytes=len(PNG), max_image_pixels=120)).shape == (
        12,
        10,
        3,
    )


@pytest.mark.parametrize("mode", [None, "RGBA", "L"])
def test_png_decodes_to_rgb(mode):
    image = decode_image(encode(PIXELS, "PNG", mode), Limits())
    assert image.dtype == np.uint8 and image.shape == (12, 10, 3)
    if mode is None:
        np.testing.assert_array_equal(image, PIXELS)


def test_jpeg_decodes_to_rgb():
    flat = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    image = decode_image(encode(flat, "JPEG"), Limits())
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    assert np.abs(image.astype(int) - flat).max() <= 3


def editor_property(name: str = "hue") -> pb.Property:
    return pb.Property(
        name=name,
        editor=pb.EditorIntervention(model="procedural", parameters={"operation": "hue"}),
    )


def request(**fields) -> pb.ExplainRequest:
    fields.setdefault("model", pb.ModelRef(name="cnn"))
    fields.setdefault("properties", [editor_property()])
    fields.setdefault("image", PNG)
    return pb.ExplainRequest(**fields)


def test_explain_spec_defaults():
    spec = explain_spec(request(seed=5), Limits())
    assert (spec.steps, spec.samples, spec.permutations, spec.alpha) == (10, 1, 10_000, 0.01)
    assert spec.seed == 5 and spec.request_id and not spec.return_path_images
    assert spec.min_probability_change == 0.05
    # Presence, not value, selects the default: 0 means "relevant = significant".
    assert explain_spec(request(min_probability_change=0.0), Limits()).min_probability_change == 0
    np.testing.assert_array_equal(spec.image, PIXELS)
    assert spec.classifier == domain.ClassifierRef(name="cnn")
    assert spec.properties == (
        domain.PropertySpec(
            name="hue", editor=domain.EditorRef("procedural", "", {"operation": "hue"})
        ),
    )


@pytest.mark.parametrize(
    ("model", "target"),
    [
        (pb.ModelRef(name="cnn"), None),
        (pb.ModelRef(name="cnn", predicted_class=True), None),
        (pb.ModelRef(name="cnn", target_class=0), 0),
        (pb.ModelRef(name="cnn", target_class=7), 7),
    ],
)
def test_target_class(model, target):
    assert explain_spec(request(model=model), Limits()).classifier.target_class == target


def test_provided_path():
    spec = explain_spec(
        request(
            properties=[pb.Property(name="p", provided_path=pb.ProvidedPath(images=[PNG] * 6))]
        ),
        Limits(),
    )
    assert len(spec.properties[0].provided_path) == 6
    np.testing.assert_array_equal(spec.properties[0].provided_path[0], PIXELS)


def test_a_provided_path_too_short_to_ever_be_significant_is_refused():
    short = [pb.Property(name="p", provided_path=pb.ProvidedPath(images=[PNG] * 3))]
    with pytest.raises(
        InvalidArgument, match="a path of 4 images can never be significant"
    ) as caught:
        explain_spec(request(properties=short), Limits())
    assert caught.value.field == "properties[0].provided_path"


def test_provided_path_images_must_have_the_image_size():
    other = encode(np.zeros((PIXELS.shape[0] + 1, PIXELS.shape[1], 3), np.uint8), "PNG")
    wrong = [pb.Property(name="p", provided_path=pb.ProvidedPath(images=[PNG] * 5 + [other]))]
    with pytest.raises(InvalidArgument, match="must have the image's size") as caught:
        explain_spec(request(properties=wrong), Limits())
    assert caught.value.field == "properties[0].provided_path.images[5]"


PROVIDED = [pb.Property(name="p", provided_path=pb.ProvidedPath(images=[PNG]))]


@pytest.mark.parametrize(
    ("fields", "needle", "field"),
    [
        (dict(samples=2, properties=PROVIDED), "'p': a provided path needs samples = 1", None),
        (dict(steps=1), "steps must be in 2..256", "steps"),
        (dict(steps=300), "the limit max_steps is 256", "steps"),
        (dict(samples=33), "samples must be in 1..32", "samples"),
        (dict(permutations=99), "permutations must be in 100..100000", "permutations"),
        (dict(alpha=0.6), "alpha must be in (0, 0.5]", "alpha"),
        (
            dict(min_probability_change=1.5),
            "min_probability_change must be in [0, 1]",
            "min_probability_change",
        ),
        (
            dict(min_probability_change=float("nan")),
            "min_probability_change must be in [0, 1]",
            "min_probability_change",
        ),
        (dict(model=pb.ModelRef()), "model.name is required", "model.name"),
        (dict(properties=[]), "properties is empty", "properties"),
        (dict(properties=[editor_property()] * 2), "repeated: hue", "properties"),
        (dict(properties=[pb.Property(name="x")]), "'x' needs an editor or a provided_path", None),
        (dict(image=b""), "image is empty", "image"),
    ],
)
def test_explain_spec_refusals(fields, needle, field):
    with pytest.raises(InvalidArgument) as info:
        explain_spec(request(**fields), Limits())
    assert needle in str(info.value)
    if field is not None:  # None: this refusal is not (yet) tied to a field
        assert info.value.field == field


@pytest.mark.parametrize(
    ("limits", "needle"),
    [
        (Limits(max_properties=1), "the limit max_properties is 1"),
        (Limits(max_edits=2 * 10 * 2 - 1), "needs up to 40 edited images"),
        (Limits(max_edits=2 * 10 * 2 - 1), "the limit max_edits is 39"),
    ],
)
def test_request_size_limits_are_named(limits, needle):
    """Two edited properties, 2 samples, 10 steps: 40 edits."""
    fields = dict(properties=[editor_property("a"), editor_property("b")], samples=2, steps=10)
    explain_spec(request(**fields), Limits())
    with pytest.raises(InvalidArgument) as info:
        explain_spec(request(**fields), limits)
    assert needle in str(info.value)


def test_provided_paths_do_not_count_as_edits():
    path = pb.ProvidedPath(images=[PNG] * 6)
    provided = [pb.Property(name="p", provided_path=path)]
    explain_spec(request(properties=provided, steps=10), Limits(max_edits=0))


SCORE = PropertyScore(
    score=0.1,
    score_per_unit_strength=1.0,
    ci_low=0.05,
    ci_high=0.15,
    p_value=0.002,
    significant=True,
    prediction_flipped=True,
    flip_rate=0.5,
    mean_signed_gradient=-0.1,
    probability_change=0.5,
    relevant=True,
    pearson_correlation=None,
    mutual_information=0.25,
    sample_scores=(0.1,),
    sample_p_values=(0.002,),
    decision=Decision.RELEVANT,
    decision_detail="significant and large",
)


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (InvalidArgument("bad parameter 'x'"), code_pb2.INVALID_ARGUMENT, "bad parameter 'x'"),
        (NotFound("no model 'm'"), code_pb2.NOT_FOUND, "no model 'm'"),
        (
            DeadlineExceeded("the deadline passed"),
            code_pb2.DEADLINE_EXCEEDED,
            "the deadline passed",
        ),
        (RuntimeError("secret detail"), code_pb2.INTERNAL, "internal error"),
        (None, code_pb2.INTERNAL, "internal error"),  # no score and no error
    ],
)
def test_failed_property_becomes_a_status(error, code, message):
    event = event_message("r", domain.PropertyOutcome(property_name="hue", error=error))
    assert event.request_id == "r" and event.WhichOneof("event") == "property_result"
    result = event.property_result
    assert (result.property_name, result.status.code, result.status.message) == (
        "hue",
        code,
        message,
    )
    assert result.score == 0.0 and not result.samples


def test_refusal_naming_a_field_carries_a_bad_request_detail():
    error = InvalidArgument("steps must be in 2..256", field="steps")
    status = property_result(domain.PropertyOutcome("hue", error=error)).status
    (detail,) = status.details
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request)
    (violation,) = bad_request.field_violations
    assert (violation.field, violation.description) == ("steps", "steps must be in 2..256")
    assert not property_result(domain.PropertyOutcome("hue", error=NotFound("m"))).status.details


@pytest.mark.parametrize("character", ["a", "é", "\U00010000"])
def test_a_long_message_is_cut_to_its_byte_limit_on_a_character_boundary(character):
    """Four-byte characters once made a 2,048-character cut an 8 KiB message."""
    error = InvalidArgument("repeated: " + character * 5000, field="properties")
    message = error_status(error).message
    assert len(message.encode()) <= MAX_MESSAGE_BYTES
    assert message.startswith("repeated: " + character) and message.endswith("…")
    short = InvalidArgument("steps must be in 2..256")
    assert error_status(short).message == "steps must be in 2..256"


def test_successful_property_carries_the_numbers():
    path = np.stack([PIXELS, 255 - PIXELS])
    sample = domain.SampleOutcome(
        seed=9,
        score=0.1,
        p_value=0.002,
        prediction_curve=np.array([0.75, 0.25]),
        predicted_classes=np.array([1, 0]),
        cache_hit=True,
        path=path,
    )
    outcome = domain.PropertyOutcome(
        "hue", SCORE, target_class=1, samples=(sample,), cache_hits=1, cache_misses=2
    )
    result = property_result(outcome)
    assert result.status.code == code_pb2.OK
    assert (result.score, result.score_per_unit_strength) == (0.1, 1.0)
    assert (result.score_ci_low, result.score_ci_high, result.p_value) == (0.05, 0.15, 0.002)
    assert result.significant and result.prediction_flipped
    assert (result.flip_rate, result.mean_signed_gradient) == (0.5, -0.1)
    assert (result.probability_change, result.relevant) == (0.5, True)
    assert not result.HasField("pearson_correlation")
    assert result.HasField("mutual_information") and result.mutual_information == 0.25
    assert (result.target_class, result.cache_hits, result.cache_misses) == (1, 1, 2)
    (s,) = result.samples
    assert (s.seed, s.score, s.p_value, s.cache_hit) == (9, 0.1, 0.002, True)
    assert list(s.prediction_curve) == [0.75, 0.25] and list(s.predicted_classes) == [1, 0]
    frames = [np.asarray(Image.open(io.BytesIO(png))) for png in s.path_images]
    np.testing.assert_array_equal(np.stack(frames), path)
    without = property_result(
        domain.PropertyOutcome(
            "hue", SCORE, samples=(domain.SampleOutcome(**{**sample.__dict__, "path": None}),)
        )
    )
    assert not without.samples[0].path_images


def test_done_event_in_milliseconds():
    done = domain.Done(1.5, domain.StageTimes(0.25, 0.5, 0.125, 0.0625), properties_failed=2)
    message = event_message("r", done).done
    assert (message.total_ms, message.edit_ms, message.classify_ms) == (1500.0, 250.0, 500.0)
    assert (message.score_ms, message.cache_ms, message.properties_failed) == (125.0, 62.5, 2)


def test_a_bad_provided_path_image_names_its_own_field():
    request = pb.ExplainRequest(
        image=encode(np.zeros((4, 4, 3), np.uint8), "PNG"),
        model=pb.ModelRef(name="m"),
        properties=[pb.Property(name="p", provided_path=pb.ProvidedPath(images=[b"garbage"]))],
    )
    with pytest.raises(InvalidArgument) as caught:
        explain_spec(request, Limits())
    assert caught.value.field == "properties[0].provided_path.images[0]"


def test_sixteen_bit_images_are_refused_not_clipped():
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 30000, np.uint16)).save(buffer, format="PNG")
    with pytest.raises(InvalidArgument, match="send 8 bits per channel"):
        decode_image(buffer.getvalue(), Limits())


@pytest.mark.parametrize(
    ("fields", "needle", "field"),
    [
        (dict(model=pb.ModelRef(name="cnn", version="x")), "positive integer", "model.version"),
        (dict(model=pb.ModelRef(name="cnn", version="-1")), "positive integer", "model.version"),
        (dict(model=pb.ModelRef(name="cnn", version="9" * 20)), "positive integer", None),
        (dict(model=pb.ModelRef(name="cnn", version="0" * 5000)), "positive integer", None),
        (dict(model=pb.ModelRef(name="cnn", version="1" * 5000)), "positive integer", None),
        (dict(model=pb.ModelRef(name="m" * 20_000)), "20000 characters; at most 256", None),
        (dict(model=pb.ModelRef(name="cnn", output="o" * 300)), "at most 256", "model.output"),
        (dict(request_id="r" * 300), "at most 256", "request_id"),
        (
            dict(
                properties=[
                    pb.Property(
                        name="p",
                        editor=pb.EditorIntervention(model="procedural", version="0"),
                    )
                ]
            ),
            "positive integer",
            "properties[0].editor.version",
        ),
        (
            dict(
                properties=[
                    pb.Property(
                        name="p",
                        editor=pb.EditorIntervention(
                            model="procedural", parameters={"amount": "1" * 2000}
                        ),
                    )
                ]
            ),
            "at most 1024",
            "properties[0].editor.parameters['amount']",
        ),
        (
            dict(model=pb.ModelRef(name="cnn", preprocessing=pb.Preprocessing(std=[1e-38] * 3))),
            "std must be in [0.0001, 10000]",
            "model.preprocessing",
        ),
        (
            dict(model=pb.ModelRef(name="cnn", preprocessing=pb.Preprocessing(mean=[1e9] * 3))),
            "|mean| at most 10000",
            "model.preprocessing",
        ),
    ],
)
def test_names_versions_and_preprocessing_are_bounded(fields, needle, field):
    """Found by the fuzz test: each of these once reached Triton and came back INTERNAL."""
    with pytest.raises(InvalidArgument) as info:
        explain_spec(request(**fields), Limits())
    assert needle in str(info.value) and len(str(info.value)) < 400
    if field is not None:
        assert info.value.field == field


def test_a_version_has_one_spelling_however_many_leading_zeros():
    """Found by the fuzz test: a version of over 4,300 digits once made int() raise."""
    assert checked_version("0" * 5000 + "7", "model.version") == "7"
    assert checked_version("", "model.version") == ""


@pytest.mark.parametrize("steps", [170, 200, 256])
def test_long_paths_are_reachable_not_an_overflow(steps):
    assert explain_spec(request(steps=steps), Limits()).steps == steps


def test_the_budget_is_checked_before_any_provided_image_is_decoded():
    """A few kB of PNG can decode to gigabytes: refuse by counts first."""
    path = pb.ProvidedPath(images=[b"never decoded"] * 50)
    provided = [pb.Property(name="p", provided_path=path)]
    with pytest.raises(InvalidArgument, match="the limit max_path_pixels"):
        explain_spec(request(properties=provided), Limits(max_path_pixels=120 * 49))


def path_pixels_refusal(limit: int, **fields) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        explain_spec(request(**fields), Limits(max_path_pixels=limit))
    assert "besides the original" in str(info.value)  # x_1..x_N: what is counted
    assert "raise PROPSCOPE_LIMITS__MAX_PATH_PIXELS" in str(info.value)
    return info.value


def named_size(error: InvalidArgument) -> tuple[int, int]:
    width, height = (
        str(error).split("at most ", 2)[-1].split(" pixels at this aspect")[0].split("x")
    )
    return int(width), int(height)


def test_an_image_too_large_for_any_reachable_path_names_the_image_and_a_size_that_fits():
    """Two edited properties of the 10x12 image at 5 steps (the fewest that can reach
    alpha 0.01) hold 1,200 pixels: no steps fit 1,000, a smaller image does."""
    two = [editor_property("a"), editor_property("b")]
    error = path_pixels_refusal(1000, properties=two)
    assert error.field == "image"
    assert "shortest paths that can reach alpha 0.01 (5 steps, 1 sample)" in str(error)
    width, height = named_size(error)
    assert (width, height) == (6, 7)  # 1,000 / 20 images: 50 pixels each, at 10:12
    fitting = encode(PIXELS[:height, :width], "PNG")
    spec = explain_spec(request(properties=two, image=fitting), Limits(max_path_pixels=1000))
    assert spec.image.shape[:2] == (height, width)


def test_a_path_too_long_for_the_limit_names_the_steps_that_fit():
    error = path_pixels_refusal(1000, path_mode=pb.PATH_MODE_FIXED)  # 10 x 120 pixels
    assert error.field == "steps" and "lower steps to at most 8" in str(error)
    assert explain_spec(request(steps=8), Limits(max_path_pixels=1000)).steps == 8
    error = path_pixels_refusal(1000, steps=5, samples=3)
    assert error.field == "samples" and "with 1 sample, steps up to 8 fit" in str(error)


def test_paths_too_long_for_the_limit_are_told_values_the_server_accepts():
    """10x12 pixels under 1,000: 8 images per path fit. max_steps below steps is
    refused, so when steps do not fit both come down together."""
    limits = Limits(max_path_pixels=1000)
    error = path_pixels_refusal(1000, steps=10, max_steps=20)
    assert error.field == "steps" and "lower steps and max_steps to at most 8" in str(error)
    assert explain_spec(request(steps=8, max_steps=8), limits).max_steps == 8
    error = path_pixels_refusal(1000, steps=5, max_steps=20)  # steps fit, N = 10 does not
    assert error.field == "max_steps" and "lower max_steps to at most 8" in str(error)
    assert explain_spec(request(steps=5, max_steps=8), limits).max_steps == 5
    assert explain_spec(request(steps=5, path_mode=pb.PATH_MODE_FIXED), limits).steps == 5
    error = path_pixels_refusal(1000, steps=5, max_steps=20, samples=3)
    assert "with 1 sample, steps and max_steps up to 8 fit" in str(error)
    assert explain_spec(request(steps=5, max_steps=8, samples=1), limits).max_steps == 5


@pytest.mark.parametrize(
    ("limits", "max_steps", "needle"),
    [
        (Limits(max_path_pixels=20 * 120), 20, "the limit max_path_pixels of 2400 pixels"),
        (Limits(max_edits=60), 20, "the limit max_edits of 60; use fewer samples"),
        (Limits(max_path_pixels=10 * 120), 10, "(so they stay fixed)"),
    ],
)
def test_default_adaptive_paths_cut_short_by_a_limit_say_so(limits, max_steps, needle):
    spec = explain_spec(request(), limits)
    assert spec.max_steps == max_steps
    (warning,) = spec.warnings
    assert f"can grow only to N = {max_steps}, not the default 80" in warning
    assert needle in warning


def test_the_limit_max_steps_alone_warns_nothing():
    """It caps every request alike (steps 40: N = 160 of 320 under the defaults);
    a size limit below that cap still warns, measured against the cap."""
    assert explain_spec(request(steps=40), Limits()).max_steps == 160
    assert explain_spec(request(steps=40), Limits()).warnings == ()
    assert explain_spec(request(), Limits(max_steps=30)).warnings == ()
    (warning,) = explain_spec(request(steps=40), Limits(max_path_pixels=80 * 120)).warnings
    assert "grow only to N = 80, not 160 (the default 320 capped by the limit max_steps" in warning


def suggested_size(warning: str) -> tuple[int, int, int]:
    """(width, height, N) of a warning's smaller image."""
    size, paths = warning.split("send a smaller image (at most ")[1].split(" pixels at this")
    width, height = size.split("x")
    return int(width), int(height), int(paths.split("paths of N = ")[1].split(")")[0])


def test_a_suggested_smaller_image_reaches_the_n_it_names():
    """200x200, 28 properties, 5 samples: max_path_pixels stops paths at N = 10, but
    max_edits (whatever the image) stops them at 40: the image named reaches 40, and the
    warning names max_edits for the rest."""
    many = [editor_property(f"p{i}") for i in range(28)]
    big = encode(np.zeros((200, 200, 3), np.uint8), "PNG")
    spec = explain_spec(request(properties=many, samples=5, image=big), Limits())
    assert spec.max_steps == 10
    (warning,) = spec.warnings
    width, height, paths = suggested_size(warning)
    assert paths == 40 and "the limit max_edits of 20000 stops them" in warning
    assert "raise PROPSCOPE_LIMITS__MAX_EDITS" in warning
    small = encode(np.zeros((height, width, 3), np.uint8), "PNG")
    spec = explain_spec(request(properties=many, samples=5, image=small), Limits())
    assert spec.max_steps == 40
    (warning,) = spec.warnings
    assert "max_edits" in warning and "smaller image" not in warning
    # Where pixels alone bind, the image named holds the default N = 80.
    (warning,) = explain_spec(request(image=big), Limits(max_path_pixels=20 * 40_000)).warnings
    width, height, paths = suggested_size(warning)
    small = encode(np.zeros((height, width, 3), np.uint8), "PNG")
    spec = explain_spec(request(image=small), Limits(max_path_pixels=20 * 40_000))
    assert paths == 80 and spec.max_steps == 80 and spec.warnings == ()


def test_adaptive_paths_within_the_limits_or_as_asked_warn_nothing():
    assert explain_spec(request(), Limits()).warnings == ()
    asked = request(path_mode=pb.PATH_MODE_ADAPTIVE, max_steps=20)
    assert explain_spec(asked, Limits(max_path_pixels=20 * 120)).warnings == ()
    fixed = request(path_mode=pb.PATH_MODE_FIXED)
    assert explain_spec(fixed, Limits(max_path_pixels=10 * 120)).warnings == ()
