"""protobuf <-> domain. Validation of what a caller can get wrong lives here,
so every refusal names the field to change."""

from __future__ import annotations

import io
import math
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from PIL import Image

from propscope.v1 import explain_pb2 as pb
from propscope_server import domain, methods
from propscope_server.api.status import status_code
from propscope_server.config import Limits, PreprocessingConfig
from propscope_server.errors import InvalidArgument, PropscopeError
from propscope_server.inference import ModelDescription, RepositoryEntry
from propscope_server.regions import (
    PNG_SIGNATURE,
    UnreadableImage,
    box_mask,
    caller_image,
    decode_mask,
)
from propscope_server.scoring.property_gradient import DEFAULT_MIN_PROBABILITY_CHANGE, Decision

DEFAULT_STEPS = 10
DEFAULT_SAMPLES = 1
DEFAULT_PERMUTATIONS = 10_000
DEFAULT_ALPHA = 0.01
# Adaptive paths double N at most this many times by default (10 -> 80).
DEFAULT_DOUBLINGS = 3
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")
# Pillow cuts 16-bit colour PNGs to 8 bits without a word (and reads 16-bit grey as 32-bit
# integers), so 16-bit PNGs are refused from their IHDR before decoding.
SIXTEEN_BITS = 16
# A PNG chunk: 4 bytes of length, 4 of type, the data, 4 of CRC; IHDR's bit depth follows
# the chunk's length and type, then width and height (4 bytes each).
CHUNK_OVERHEAD = 12
IHDR_BIT_DEPTH_OFFSET = 16
# Names (models, outputs, properties, request ids) and editor parameters: long enough
# for any real one, short enough that echoing one in an error stays small.
MAX_NAME_CHARS = 256
MAX_PARAMETER_CHARS = 1024
# Preprocessing on the [0, 1] pixel scale: anything outside overflows float32 models.
PREPROCESSING_RANGE = (1e-4, 1e4)
# A status message longer than this many UTF-8 bytes is cut: backends may echo whole
# inputs, and a client with gRPC's default limits reads at most 8 KiB of trailers.
MAX_MESSAGE_BYTES = 2048


def check_reachable(points: int, permutations: int, alpha: float, field: str) -> None:
    """Refuse a test that can never come out significant. Reversing a path keeps
    its score, so the smallest p-value is about max(2 / points!, 1 / (K + 1))."""
    if 1.0 / (permutations + 1) >= alpha:
        raise InvalidArgument(
            f"with {permutations} permutations the smallest p-value is {1 / (permutations + 1):.3g}, "
            f"not below alpha {alpha}; raise permutations",
            field="permutations",
        )
    # Beyond 20 points, 2 / points! < 1e-18: always below an alpha the test can reach.
    if points < 20 and 2.0 / math.factorial(points) >= alpha:
        needed = fewest_reachable_steps(alpha) + 1  # images: the original and N edits
        raise InvalidArgument(
            f"a path of {points} images can never be significant at alpha {alpha} "
            f"(smallest p-value {2 / math.factorial(points):.3g}); use at least {needed} images",
            field=field,
        )


def fewest_reachable_steps(alpha: float) -> int:
    """The fewest steps N (at least 2) whose path of N + 1 images can come out
    significant at `alpha` (check_reachable's rule)."""
    return next(n for n in range(2, 64) if 2.0 / math.factorial(n + 1) < alpha)


def largest_size(width: int, height: int, pixels: int) -> tuple[int, int]:
    """The largest width x height of the aspect ratio width:height with at most
    `pixels` pixels (integer arithmetic: never one pixel over)."""
    new_width = max(math.isqrt(pixels * width // height), 1)
    return new_width, max(new_width * height // width, 1)


def decode_image(
    data: bytes,
    limits: Limits,
    what: str = "image",
    field: str = "image",
    expected_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [H, W, 3], refusing oversized and bomb-like inputs.

    Every way the bytes can be wrong is an InvalidArgument naming `field`."""
    if not data:
        raise InvalidArgument(f"{what} is empty; send PNG or JPEG bytes", field=field)
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(
            f"{what} is {len(data)} bytes; the limit max_image_bytes is {limits.max_image_bytes}",
            field=field,
        )
    if SIXTEEN_BITS in png_bit_depths(data):
        raise InvalidArgument(
            f"{what} is a PNG with 16 bits per channel; send 8 bits per channel "
            "(RGB, RGBA or grey)",
            field=field,
        )
    try:
        with caller_image(data) as image:
            if image.format not in ("PNG", "JPEG"):
                raise InvalidArgument(f"{what} is {image.format}; send PNG or JPEG", field=field)
            if image.mode not in EIGHT_BIT_MODES:
                raise InvalidArgument(
                    f"{what} has mode {image.mode}; send 8 bits per channel (RGB, RGBA or grey)",
                    field=field,
                )
            width, height = image.size
            if expected_size is not None and image.size != expected_size:
                raise InvalidArgument(
                    f"{what} is {width}x{height} pixels; path images must have the "
                    f"image's size {expected_size[0]}x{expected_size[1]}",
                    field=field,
                )
            if width * height > limits.max_image_pixels:
                raise InvalidArgument(
                    f"{what} is {width}x{height} pixels; the limit max_image_pixels is "
                    f"{limits.max_image_pixels}",
                    field=field,
                )
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except UnreadableImage as error:
        raise InvalidArgument(
            f"{what} could not be decoded as PNG or JPEG ({error}); send an intact PNG or JPEG",
            field=field,
        ) from None


def png_bit_depths(data: bytes) -> set[int]:
    """The bit depths a PNG's IHDR chunks declare before its image data (empty when
    `data` is no PNG). IHDR comes first in a well-formed file (bit depth at byte 24),
    but Pillow takes one anywhere before the first IDAT."""
    depths: set[int] = set()
    if not data.startswith(PNG_SIGNATURE):
        return depths
    offset = len(PNG_SIGNATURE)
    while offset + IHDR_BIT_DEPTH_OFFSET < len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        if kind == b"IDAT":
            break
        if kind == b"IHDR":
            depths.add(data[offset + IHDR_BIT_DEPTH_OFFSET])
        offset += CHUNK_OVERHEAD + length
    return depths


def bounded(value: int, default: int, low: int, high: int, field: str, limit: str) -> int:
    value = value or default
    if not low <= value <= high:
        raise InvalidArgument(
            f"{field} must be in {low}..{high} (0 for the default {default}; the limit {limit} "
            f"is {high}); got {value}",
            field=field,
        )
    return value


def explain_spec(
    request: pb.ExplainRequest, limits: Limits, tenant: str = domain.DEFAULT_TENANT
) -> domain.ExplainSpec:
    """Every refusal of a configured limit names it (Limits, PROPSCOPE_LIMITS__*)."""
    check_name(request.request_id, "request_id")
    if not request.model.name:
        raise InvalidArgument(
            "model.name is required: the Triton name of the classifier", field="model.name"
        )
    if not request.properties:
        raise InvalidArgument(
            "properties is empty; give at least one property to intervene on", field="properties"
        )
    if len(request.properties) > limits.max_properties:
        raise InvalidArgument(
            f"{len(request.properties)} properties; the limit max_properties is "
            f"{limits.max_properties} per request",
            field="properties",
        )
    steps = bounded(request.steps, DEFAULT_STEPS, 2, limits.max_steps, "steps", "max_steps")
    samples = bounded(
        request.samples, DEFAULT_SAMPLES, 1, limits.max_samples, "samples", "max_samples"
    )
    permutations = bounded(
        request.permutations,
        DEFAULT_PERMUTATIONS,
        limits.min_permutations,
        limits.max_permutations,
        "permutations",
        "max_permutations",
    )
    alpha = request.alpha or DEFAULT_ALPHA
    if not 0.0 < alpha <= 0.5:
        raise InvalidArgument(
            f"alpha must be in (0, 0.5] (0 for the default 0.01); got {alpha}", field="alpha"
        )
    min_probability_change = (
        request.min_probability_change
        if request.HasField("min_probability_change")
        else DEFAULT_MIN_PROBABILITY_CHANGE
    )
    if not 0.0 <= min_probability_change <= 1.0:
        raise InvalidArgument(
            "min_probability_change must be in [0, 1] (unset for the default "
            f"{DEFAULT_MIN_PROBABILITY_CHANGE}); got {min_probability_change}",
            field="min_probability_change",
        )
    image = decode_image(request.image, limits)
    names = [p.name for p in request.properties]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidArgument(
            f"property names must be unique; repeated: {', '.join(duplicates)}", field="properties"
        )
    adaptive = request.path_mode != pb.PATH_MODE_FIXED
    max_steps = resolve_max_steps(request, image.shape, steps, samples, adaptive, limits)
    check_budget(request.properties, image.shape, steps, samples, limits, max_steps, alpha)
    warning = max_steps_warning(request, image.shape, steps, samples, limits, max_steps)
    properties = tuple(
        property_spec(i, p, image, samples, limits) for i, p in enumerate(request.properties)
    )
    spec = domain.ExplainSpec(
        request_id=request.request_id or uuid.uuid4().hex,
        image=image,
        classifier=classifier_ref(request.model),
        properties=properties,
        steps=steps,
        samples=samples,
        seed=request.seed,
        permutations=permutations,
        alpha=alpha,
        min_probability_change=min_probability_change,
        return_path_images=request.return_path_images,
        tenant=tenant,
        adaptive=adaptive,
        max_steps=max_steps,
        path_image_max_side_px=request.path_image_max_side_px,
        warnings=(warning,) if warning else (),
    )
    for index, prop in enumerate(properties):
        length = spec.path_shape(prop)[1]
        field = "steps" if prop.provided_path is None else f"properties[{index}].provided_path"
        check_reachable(length + 1, permutations, alpha, field)
    return spec


def resolve_max_steps(
    request: pb.ExplainRequest,
    image_shape: tuple[int, ...],
    steps: int,
    samples: int,
    adaptive: bool,
    limits: Limits,
) -> int:
    """The longest path of an adaptive property: steps x 2^k up to the request's
    max_steps, or by default the longest of steps x 1, 2, 4, 8 that fits every limit."""
    if not adaptive:
        if request.max_steps not in (0, steps):
            raise InvalidArgument(
                "max_steps applies to adaptive paths; a fixed path has exactly steps images "
                "(leave max_steps 0, or use path_mode PATH_MODE_ADAPTIVE)",
                field="max_steps",
            )
        return steps
    if request.max_steps:
        if not steps <= request.max_steps <= limits.max_steps:
            raise InvalidArgument(
                f"max_steps must be in {steps}..{limits.max_steps} (at least steps; the limit "
                f"max_steps is {limits.max_steps}), or 0 for the default; got {request.max_steps}",
                field="max_steps",
            )
        longest = steps
        while longest * 2 <= request.max_steps:
            longest *= 2
        return longest
    return _doubled(
        steps,
        lambda longer: (
            longer <= limits.max_steps
            and not _over_budget(request.properties, image_shape, steps, samples, limits, longer)
        ),
    )


def _over_budget(
    properties: Sequence[pb.Property],
    image_shape: tuple[int, ...],
    steps: int,
    samples: int,
    limits: Limits,
    max_steps: int,
) -> bool:
    try:
        check_budget(properties, image_shape, steps, samples, limits, max_steps)
    except InvalidArgument:
        return True
    return False


def max_steps_warning(
    request: pb.ExplainRequest,
    image_shape: tuple[int, ...],
    steps: int,
    samples: int,
    limits: Limits,
    max_steps: int,
) -> str | None:
    """Why default adaptive paths stop short of steps x 8, when a limit on the request's
    size (max_path_pixels, max_edits) stops them: the request said nothing, so Accepted
    says it, with a fix that reaches the N it names. The limit max_steps alone warns
    nothing: it caps every request alike, and the caller can see it in Accepted.max_steps."""
    edited = _edited(request.properties)
    asked = request.path_mode == pb.PATH_MODE_FIXED or request.max_steps
    if asked or not edited:
        return None
    goal = _doubled(steps, lambda n: n <= limits.max_steps)
    if max_steps >= goal:
        return None
    longer = max_steps * 2
    default = steps * 2**DEFAULT_DOUBLINGS
    stopped = f"adaptive paths can grow only to N = {max_steps}, not " + (
        f"the default {goal}"
        if goal == default
        else f"{goal} (the default {default} capped by the limit max_steps of {limits.max_steps})"
    )
    if max_steps == steps:
        stopped += " (so they stay fixed)"
    edits_fix = "use fewer samples or edited properties, or raise PROPSCOPE_LIMITS__MAX_EDITS"
    edits = edited * samples * (2 * longer - steps)
    if edits > limits.max_edits:
        return (
            f"{stopped}: N = {longer} would need up to {edits} edited images, over the limit "
            f"max_edits of {limits.max_edits}; {edits_fix}"
        )
    height, width = image_shape[:2]
    provided = _provided(request.properties)
    images = edited * samples * longer + provided
    warning = (
        f"{stopped}: N = {longer} would hold {images} path images of {width}x{height} "
        f"pixels, over the limit max_path_pixels of {limits.max_path_pixels} pixels"
    )
    # max_edits does not depend on the image: a smaller one reaches this N at most.
    reachable = _doubled(
        steps, lambda n: n <= goal and edited * samples * (2 * n - steps) <= limits.max_edits
    )
    per_image = limits.max_path_pixels // (edited * samples * reachable + provided)
    if per_image:
        fitting = largest_size(width, height, per_image)
        warning += (
            f"; send a smaller image (at most {fitting[0]}x{fitting[1]} pixels at this aspect "
            f"ratio hold paths of N = {reachable})"
        )
    if reachable < goal:
        beyond = edited * samples * (4 * reachable - steps)
        return (
            f"{warning}; beyond N = {reachable} the limit max_edits of {limits.max_edits} "
            f"stops them (N = {reachable * 2} would need up to {beyond} edited images): "
            f"{edits_fix}"
        )
    return f"{warning}, use fewer samples or properties, or raise PROPSCOPE_LIMITS__MAX_PATH_PIXELS"


def _doubled(steps: int, fits: Callable[[int], bool]) -> int:
    """The longest of steps x 1, 2, 4, 8 (the default adaptive growth) that `fits`."""
    longest = steps
    for _ in range(DEFAULT_DOUBLINGS):
        if not fits(longest * 2):
            break
        longest *= 2
    return longest


def _edited(properties: Sequence[pb.Property]) -> int:
    return sum(1 for p in properties if p.WhichOneof("source") == "editor")


def _provided(properties: Sequence[pb.Property]) -> int:
    return sum(
        len(p.provided_path.images) for p in properties if p.WhichOneof("source") == "provided_path"
    )


def check_budget(
    properties: Sequence[pb.Property],
    image_shape: tuple[int, ...],
    steps: int,
    samples: int,
    limits: Limits,
    max_steps: int | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> None:
    """The edit budget and the memory of all paths, from the counts alone: checked before
    any provided path image is decoded. An adaptive path may edit steps, 2 steps, ...,
    max_steps images (2 max_steps - steps in all) and holds one length at a time."""
    max_steps = max_steps or steps
    edited = _edited(properties)
    edits = edited * samples * (2 * max_steps - steps)
    field = "steps" if max_steps == steps else "max_steps"
    if edits > limits.max_edits:
        raise InvalidArgument(
            f"the request needs up to {edits} edited images (samples x steps x edited "
            "properties, every path length of an adaptive path included); the limit "
            f"max_edits is {limits.max_edits}; use fewer steps, samples or properties, "
            "a smaller max_steps, or path_mode PATH_MODE_FIXED",
            field=field,
        )
    provided = _provided(properties)
    path_images = edited * samples * max_steps + provided
    height, width = image_shape[:2]
    pixels = height * width
    if pixels * path_images <= limits.max_path_pixels:
        return
    held = (
        f"the request's paths hold {path_images} images of {width}x{height} pixels besides "
        f"the original ({path_images * pixels} pixels), over the limit max_path_pixels of "
        f"{limits.max_path_pixels}"
    )
    fitting = largest_size(width, height, limits.max_path_pixels // path_images)
    smaller = (
        f"send a smaller image (at most {fitting[0]}x{fitting[1]} pixels at this aspect "
        f"ratio fit this request{', its provided path images too' if provided else ''})"
    )
    fewest = fewest_reachable_steps(alpha)
    if (edited * fewest + provided) * pixels > limits.max_path_pixels:
        shortest = (
            f"even the shortest paths that can reach alpha {alpha} ({fewest} steps, 1 sample)"
            if edited
            else "the provided paths alone"
        )
        raise InvalidArgument(
            f"{held}; {shortest} are over it: {smaller}, or raise "
            "PROPSCOPE_LIMITS__MAX_PATH_PIXELS",
            field="image",
        )
    room = limits.max_path_pixels // pixels - provided  # edited images that fit
    fit = room // (edited * samples)  # images per path that fit
    # max_steps is refused below steps: when steps do not fit either, both must come down.
    lowered = "steps and max_steps" if max_steps != steps else "steps"
    if fit >= steps:
        raise InvalidArgument(
            f"{held}; lower max_steps to at most {fit}, use path_mode PATH_MODE_FIXED, fewer "
            f"samples or properties, {smaller}, or raise PROPSCOPE_LIMITS__MAX_PATH_PIXELS",
            field="max_steps",
        )
    if fit >= fewest:
        raise InvalidArgument(
            f"{held}; lower {lowered} to at most {fit}, use fewer samples or properties, "
            f"{smaller}, or raise PROPSCOPE_LIMITS__MAX_PATH_PIXELS",
            field="steps",
        )
    raise InvalidArgument(
        f"{held}; use fewer samples (with 1 sample, {lowered} up to {room // edited} fit), "
        f"{smaller}, or raise PROPSCOPE_LIMITS__MAX_PATH_PIXELS",
        field="samples",
    )


def check_name(value: str, field: str, limit: int = MAX_NAME_CHARS) -> None:
    if len(value) > limit:
        raise InvalidArgument(
            f"{field} is {len(value)} characters; at most {limit}: {value[:40]!r}...", field=field
        )


def checked_version(value: str, field: str) -> str:
    """Triton versions are positive 64-bit integers; empty means the latest. Returned in
    one spelling ("01" is "1"), so one version is one cache key and one description."""
    if not value:
        return value
    digits = value.lstrip("0")  # Python refuses int() of over 4,300 digits
    if not (
        value.isascii() and value.isdigit() and len(digits) <= 19 and 0 < int(digits or "0") < 2**63
    ):
        raise InvalidArgument(
            f"{field} must be a positive integer or empty (latest); got {value[:40]!r}",
            field=field,
        )
    return digits


def classifier_ref(model: pb.ModelRef) -> domain.ClassifierRef:
    check_name(model.name, "model.name")
    check_name(model.output, "model.output")
    version = checked_version(model.version, "model.version")
    preprocessing = None
    if model.HasField("preprocessing"):
        p = model.preprocessing
        for field in ("mean", "std"):
            if len(getattr(p, field)) not in (0, 3):
                raise InvalidArgument(
                    f"model.preprocessing.{field} needs 3 values (one per channel) or none"
                )
        low, high = PREPROCESSING_RANGE
        if not all(low <= s <= high for s in p.std) or not all(abs(m) <= high for m in p.mean):
            raise InvalidArgument(
                f"model.preprocessing std must be in [{low:g}, {high:g}] and |mean| at most "
                f"{high:g} (the pixel scale is [0, 1]); got mean {list(p.mean)}, std {list(p.std)}",
                field="model.preprocessing",
            )
        preprocessing = PreprocessingConfig(
            mean=tuple(p.mean) or None,
            std=tuple(p.std) or None,
            output_kind=OUTPUT_KIND_NAMES.get(p.output_kind),
            resize=RESIZE_NAMES.get(p.resize),
        )
    for index, label in enumerate(model.class_labels):
        check_name(label, f"model.class_labels[{index}]")
    return domain.ClassifierRef(
        name=model.name,
        version=version,
        output=model.output,
        target_class=model.target_class if model.WhichOneof("target") == "target_class" else None,
        preprocessing=preprocessing,
        class_labels=tuple(model.class_labels),
    )


OUTPUT_KIND_NAMES = {
    pb.Preprocessing.OUTPUT_KIND_LOGITS: "logits",
    pb.Preprocessing.OUTPUT_KIND_PROBABILITIES: "probabilities",
}
RESIZE_NAMES = {
    pb.Preprocessing.RESIZE_MODE_SQUASH: "squash",
    pb.Preprocessing.RESIZE_MODE_CENTER_CROP: "center_crop",
    pb.Preprocessing.RESIZE_MODE_LETTERBOX: "letterbox",
}


def preprocessing_message(config: PreprocessingConfig) -> pb.Preprocessing:
    message = pb.Preprocessing(mean=config.mean or (), std=config.std or ())
    by_name = {name: value for value, name in OUTPUT_KIND_NAMES.items()}
    message.output_kind = by_name.get(config.output_kind or "", 0)
    by_name = {name: value for value, name in RESIZE_NAMES.items()}
    message.resize = by_name.get(config.resize or "", 0)
    return message


def _region(index: int, prop: pb.Property, image: np.ndarray, limits: Limits) -> np.ndarray | None:
    """The property's region as [H, W] weights, or None when it has none."""
    shape = prop.region.WhichOneof("shape")
    if shape is None:
        return None
    field = f"properties[{index}].region.{shape}"
    if prop.WhichOneof("source") != "editor":
        raise InvalidArgument(
            f"property {prop.name!r}: a region applies to editor properties only; a provided "
            "path already holds the images to classify",
            field=f"properties[{index}].region",
        )
    height, width = image.shape[:2]
    try:
        if shape == "mask":
            if len(prop.region.mask) > limits.max_image_bytes:
                raise ValueError(
                    f"the mask is {len(prop.region.mask)} bytes; the limit max_image_bytes is "
                    f"{limits.max_image_bytes}"
                )
            return decode_mask(prop.region.mask, height, width, limits.max_image_pixels)
        box = prop.region.box
        return box_mask(box.left, box.top, box.right, box.bottom, box.pixels, height, width)
    except ValueError as error:
        raise InvalidArgument(f"property {prop.name!r}: {field}: {error}", field=field) from None


def property_spec(
    index: int, prop: pb.Property, image: np.ndarray, samples: int, limits: Limits
) -> domain.PropertySpec:
    if not prop.name:
        raise InvalidArgument("every property needs a name")
    check_name(prop.name, f"properties[{index}].name")
    source = prop.WhichOneof("source")
    if source == "editor":
        if not prop.editor.model:
            raise InvalidArgument(f"property {prop.name!r}: editor.model is required")
        field = f"properties[{index}].editor"
        check_name(prop.editor.model, f"{field}.model")
        version = checked_version(prop.editor.version, f"{field}.version")
        for key, value in prop.editor.parameters.items():
            check_name(key, f"{field}.parameters key")
            check_name(value, f"{field}.parameters[{key!r}]", MAX_PARAMETER_CHARS)
        return domain.PropertySpec(
            name=prop.name,
            editor=domain.EditorRef(
                model=prop.editor.model,
                version=version,
                parameters=dict(prop.editor.parameters),
            ),
            region=_region(index, prop, image, limits),
        )
    if source == "provided_path":
        images = prop.provided_path.images
        if not 1 <= len(images) <= limits.max_steps:
            raise InvalidArgument(
                f"property {prop.name!r}: provided_path needs 1..{limits.max_steps} images "
                f"(the limit max_steps); got {len(images)}"
            )
        if samples != 1:
            raise InvalidArgument(f"property {prop.name!r}: a provided path needs samples = 1")
        _region(index, prop, image, limits)
        frames = tuple(
            decode_image(
                data,
                limits,
                f"property {prop.name!r} provided_path image {i}",
                field=f"properties[{index}].provided_path.images[{i}]",
                expected_size=(image.shape[1], image.shape[0]),
            )
            for i, data in enumerate(images)
        )
        return domain.PropertySpec(name=prop.name, provided_path=frames)
    raise InvalidArgument(f"property {prop.name!r} needs an editor or a provided_path")


def encode_png(image: np.ndarray, max_side_px: int = 0) -> bytes:
    """The image as PNG, shrunk first so that its longer side is at most ``max_side_px``
    (0: full size)."""
    picture = Image.fromarray(image)
    if max_side_px:
        picture.thumbnail((max_side_px, max_side_px))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def event_message(
    request_id: str, event: domain.Event, path_image_max_side_px: int = 0
) -> pb.ExplainEvent:
    message = pb.ExplainEvent(request_id=request_id)
    if isinstance(event, domain.Accepted):
        message.accepted.CopyFrom(
            pb.Accepted(
                property_names=list(event.property_names),
                samples=event.samples,
                steps=event.steps,
                permutations=event.permutations,
                alpha=event.alpha,
                model_version=event.model_version,
                planned_edits=event.planned_edits,
                planned_classifications=event.planned_classifications,
                min_probability_change=event.min_probability_change,
                path_mode=pb.PATH_MODE_ADAPTIVE if event.adaptive else pb.PATH_MODE_FIXED,
                max_steps=event.max_steps,
                preprocessing=preprocessing_message(event.preprocessing),
                preprocessing_sources=list(event.preprocessing_sources),
                warnings=list(event.warnings),
                class_labels=list(event.class_labels),
            )
        )
    elif isinstance(event, domain.Progress):
        message.progress.CopyFrom(
            pb.Progress(
                stage=event.stage,
                property_name=event.property_name,
                completed=event.completed,
                total=event.total,
            )
        )
    elif isinstance(event, domain.PropertyOutcome):
        message.property_result.CopyFrom(property_result(event, path_image_max_side_px))
    else:
        stages = event.stages
        message.done.CopyFrom(
            pb.Done(
                total_ms=event.total_s * 1e3,
                edit_ms=stages.edit_s * 1e3,
                classify_ms=stages.classify_s * 1e3,
                score_ms=stages.score_s * 1e3,
                cache_ms=stages.cache_s * 1e3,
                properties_failed=event.properties_failed,
            )
        )
    return message


def cut_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message` cut to at most `limit` UTF-8 bytes on a character boundary, marked "…"."""
    encoded = message.encode()
    if len(encoded) <= limit:
        return message
    ellipsis = "…"
    kept = encoded[: limit - len(ellipsis.encode())].decode(errors="ignore")
    return kept + ellipsis


def error_status(error: Exception) -> status_pb2.Status:
    """A google.rpc.Status; refusals naming a field carry a BadRequest detail."""
    if isinstance(error, PropscopeError):
        status = status_pb2.Status(
            code=status_code(error).value[0], message=cut_message(str(error))
        )
        if error.field:
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=error.field, description=status.message
                        )
                    ]
                )
            )
            status.details.append(detail)
        return status
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")


DECISIONS = {
    Decision.RELEVANT: pb.DECISION_RELEVANT,
    Decision.NOT_SIGNIFICANT: pb.DECISION_NOT_SIGNIFICANT,
    Decision.CHANGE_TOO_SMALL: pb.DECISION_CHANGE_TOO_SMALL,
    Decision.CANNOT_REACH_ALPHA: pb.DECISION_CANNOT_REACH_ALPHA,
}


def property_result(
    outcome: domain.PropertyOutcome, path_image_max_side_px: int = 0
) -> pb.PropertyResult:
    if outcome.error is not None or outcome.score is None:
        return pb.PropertyResult(
            property_name=outcome.property_name,
            status=error_status(outcome.error or RuntimeError()),
            warnings=list(outcome.warnings),
        )
    score = outcome.score
    return pb.PropertyResult(
        property_name=outcome.property_name,
        status=status_pb2.Status(code=code_pb2.OK),
        score=score.score,
        score_per_unit_strength=score.score_per_unit_strength,
        score_ci_low=score.ci_low,
        score_ci_high=score.ci_high,
        p_value=score.p_value,
        significant=score.significant,
        prediction_flipped=score.prediction_flipped,
        flip_rate=score.flip_rate,
        mean_signed_gradient=score.mean_signed_gradient,
        probability_change=score.probability_change,
        relevant=score.relevant,
        pearson_correlation=score.pearson_correlation,
        mutual_information=score.mutual_information,
        target_class=outcome.target_class,
        cache_hits=outcome.cache_hits,
        cache_misses=outcome.cache_misses,
        steps=outcome.steps,
        decision=DECISIONS[score.decision],
        decision_detail=score.decision_detail,
        warnings=list(outcome.warnings),
        target_label=outcome.target_label,
        edits=outcome.edits,
        samples=[
            pb.SampleResult(
                seed=s.seed,
                score=s.score,
                p_value=s.p_value,
                prediction_curve=s.prediction_curve.tolist(),
                predicted_classes=s.predicted_classes.tolist(),
                cache_hit=s.cache_hit,
                path_images=(
                    [encode_png(frame, path_image_max_side_px) for frame in s.path]
                    if s.path is not None
                    else []
                ),
            )
            for s in outcome.samples
        ],
    )


def model_listing(
    entries: Sequence[RepositoryEntry], descriptions: Sequence[ModelDescription | None]
) -> list[pb.ModelInfo]:
    """One ModelInfo per model, in the repository's order. Triton's index has one entry per
    version of a model that serves several (version_policy all: a repaired version beside
    its original); the model is listed once, described by its latest described version,
    with every described version in ``versions``. It stays READY while a version of it
    serves, and ``state_reason`` names each version that failed with Triton's reason (else
    a failed repaired version would go unseen beside its original). A model none of whose
    entries could be described is listed bare from its first entry."""
    by_name: dict[str, list[tuple[RepositoryEntry, ModelDescription | None]]] = {}
    for entry, description in zip(entries, descriptions, strict=True):
        by_name.setdefault(entry.name, []).append((entry, description))
    listing = []
    for listed in by_name.values():
        described = [(e, d) for e, d in listed if d is not None]
        if not described:
            listing.append(model_info(*listed[0]))
            continue
        versions = sorted({v for _, d in described for v in d.versions}, key=_version_order)
        entry, latest = max(described, key=lambda pair: _version_order(pair[1].version))
        info = model_info(entry, replace(latest, versions=tuple(versions)))
        failed = [
            f"version {e.version}: {e.reason or e.state}"
            for e, d in listed
            if d is None and e.state != "READY"
        ]
        info.state_reason = "; ".join(filter(None, [info.state_reason, *failed]))
        listing.append(info)
    return listing


def _version_order(version: str) -> int:
    return int(version) if version.isdigit() else 0


def model_info(entry: RepositoryEntry, description: ModelDescription | None) -> pb.ModelInfo:
    info = pb.ModelInfo(
        name=entry.name,
        state=entry.state,
        state_reason=entry.reason,
        loads_on_demand=entry.loads_on_demand,
    )
    if description is None:
        return info
    info.versions.extend(description.versions)
    info.role = (
        pb.ModelInfo.ROLE_EDITOR if description.role == "editor" else pb.ModelInfo.ROLE_CLASSIFIER
    )
    if description.role != "editor":
        info.preprocessing.CopyFrom(preprocessing_message(description.preprocessing))
        info.class_labels.extend(description.class_labels)
        info.methods.extend(methods.supported(description))
        info.layers.extend(
            pb.LayerInfo(name=layer.name, channels=layer.channels) for layer in description.layers
        )
    info.max_batch_size = description.max_batch_size
    info.description = description.description
    for tensors, target in ((description.inputs, info.inputs), (description.outputs, info.outputs)):
        target.extend(
            pb.TensorInfo(name=t.name, datatype=t.datatype, shape=t.shape, optional=t.optional)
            for t in tensors
        )
    if description.editor_schema is not None:
        info.editor_parameters.extend(
            pb.EditorParameter(
                name=p.name,
                description=p.description,
                default_value=p.default or "",
                choices=list(p.choices),
            )
            for p in description.editor_schema.parameters
        )
    return info
