"""Memory admission: each request's peak memory is estimated from its declared sizes
(image headers, counts, the classifier's input) before anything is decoded, and admitted
against one gateway-wide budget. A 49 KB PNG can declare 4096 x 4096 pixels: counting
streams alone let a few such requests take the gateway past its container limit.

The factors below are bytes per pixel, measured (tests/unit/test_server_memory.py runs
the real orchestration with a fake Triton under tracemalloc) and rounded up, plus the
copies tracemalloc cannot see (Pillow's image cores, protobuf and gRPC buffers of the
Triton calls and of the reply), taken from the gateway's RSS (tests/integration/
test_memory_admission.py). An estimate is an upper bound of the request's own peak, not
of the process: the budget leaves the rest of the container to the gateway itself."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from google.protobuf.message import Message

from propscope.v1 import attribution_pb2 as apb
from propscope.v1 import concepts_pb2 as cpb
from propscope.v1 import consistency_pb2
from propscope.v1 import explain_pb2 as pb
from propscope.v1 import graph_pb2 as gpb
from propscope.v1 import interactions_pb2 as ipb
from propscope.v1 import visualization_pb2 as vpb
from propscope_server import metrics
from propscope_server.api.convert import (
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    classifier_ref,
    resolve_max_steps,
)
from propscope_server.api.convert_interactions import check_budgets
from propscope_server.api.parsing import PendingRequest
from propscope_server.backends.preprocessing import input_layout
from propscope_server.config import Limits, Settings
from propscope_server.consistency_domain import EXPLAINERS
from propscope_server.domain import EvaSpec
from propscope_server.errors import (
    DeadlineExceeded,
    PropscopeError,
    ResourceExhausted,
    Unavailable,
)
from propscope_server.inference import Inference, ModelDescription
from propscope_server.interactions_domain import MIN_DESIGN_SIZE
from propscope_server.methods.attribution import PERTURBATION_BATCH_PIXELS, RISE_BLOCK
from propscope_server.orchestration.explain import automatic_region
from propscope_server.regions import UnreadableImage, caller_image
from propscope_server.scoring.interactions import DEFAULT_DESIGN_SIZE, design_row_count

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
# Messages, events and Python objects of any request, whatever its size.
REQUEST_OVERHEAD_BYTES = MIB
# The request while its call lasts: gRPC's received buffer, its bytes and the parsed
# message (measured: 2.7 to 3.0 times a 63 MiB message's size, as RECEIVE_COPIES below;
# counting two let 16 concurrent 63 MiB calls overshoot a 768 MiB budget by 12 to 82 MiB).
REQUEST_COPIES = 3
# While a message is received and parsed: gRPC's buffer, its bytes and the parsed message,
# with a margin (measured: 16 concurrent 63 MiB messages took 2.7 to 3.0 times their size
# each at the peak).
RECEIVE_COPIES = 4
# Decoding one image: Pillow's 4-byte core, its RGB conversion and the uint8 array
# (then freed: the estimate counts the larger of decoding and the method's work).
DECODE_BYTES_PER_PIXEL = 11
# A decoded image (or provided path image, or explanation map), held for the call.
IMAGE_BYTES_PER_PIXEL = 3
# Explain, per pixel of a property's path images (samples x (steps + 1)): the editor's
# answer as received (gRPC, protobuf, array), the path with its original, the stacked
# paths, the unchanged-image check and the cache's encoding.
PATH_BYTES_PER_PIXEL = 16
# A provided path, per pixel of its images with the original: concatenated, stacked.
PROVIDED_PATH_BYTES_PER_PIXEL = 10
# return_path_images: each image's PNG in the reply and its serialisation (an
# incompressible image's PNG is as large as its pixels).
RETURNED_PATH_BYTES_PER_PIXEL = 15
# A region: float64 compositing of one sample's edited images.
REGION_BYTES_PER_PIXEL = 60
# A region's float32 mask, held with the request.
MASK_BYTES_PER_PIXEL = 4
# The editor's automatic object/background split, checked on the image (float64 maps).
OBJECT_MASK_BYTES_PER_PIXEL = 56
# Resizing one image to a fixed-size model's input: Pillow's cores of the image and of
# its resampling passes.
RESIZE_BYTES_PER_PIXEL = 8
# Explain's classifier input per pixel of its view, beyond the images themselves: a
# UINT8 model's resized copy; a float model's normalisation (two arrays at a time).
INPUT_BYTES_PER_VIEW_PIXEL = {"UINT8": 6, "FP16": 30, "FP32": 30}
# Copies of one Triton call's input tensor: tritonclient's bytes, the protobuf request,
# its serialisation and gRPC's send buffer.
TRANSPORT_COPIES = 4
ELEMENT_BYTES = {"UINT8": 1, "FP16": 2, "FP32": 4}
# Attribute and EvaluateAttribution: the model's view as uint8 and float32, the
# baseline (blurred through float32 copies), the map and its resizing.
VIEW_BYTES_PER_PIXEL = 48
# Per pixel of the perturbed images in flight (a batch waiting for Triton, or being
# made): masks, the float32 blend and its temporaries; the model's input and its
# transport come on top.
BATCH_BYTES_PER_PIXEL = 40
# RISE draws its masks in blocks of RISE_BLOCK (float64, then float32) per batch.
RISE_BYTES_PER_BLOCK_PIXEL = 16
# EVA, per pixel of each bound row in flight: its float32 radii per channel (made
# through a mask and a layout copy) and their transport to Triton (measured in
# tests/unit/test_server_memory.py: estimates 1.4 to 2.5 times the peak).
EVA_BYTES_PER_ROW_PIXEL = 96
# Attribute's map brought back to the image (Pillow's float cores, the array, the
# message and its serialisation).
IMAGE_MAP_BYTES_PER_PIXEL = 20
# EvaluateAttribution's explanation: its values as float32, then over the view.
MAP_BYTES_PER_VALUE = 8
# Deletion and Insertion: the pixels' order (argsort, ranks) over the view.
ORDER_BYTES_PER_PIXEL = 32
# Stability: a noisy view (float64 noise, float32 result) and each map it keeps.
NOISY_VIEW_BYTES_PER_PIXEL = 48
KEPT_MAP_BYTES_PER_PIXEL = 20
# The options' defaults (api/convert_attribution.py), for the forward passes in flight.
SOBOL_DEFAULTS = (8, 32)  # grid_size, nb_design
EVA_DEFAULT_GRID = EvaSpec().grid  # EVA's are EvaSpec's fields, defined once
RISE_DEFAULT_SAMPLES = 4000
DELETION_DEFAULT_STEPS = 10
MU_FIDELITY_DEFAULT_SAMPLES = 200
STABILITY_DEFAULT_SAMPLES = 20
# BuildGraph, per pixel of every image and reference image: its decoded array held for the
# call, the model's view and the intervention batches around it. Not measured yet: a bound
# from the attribution methods' view (VIEW_BYTES_PER_PIXEL) with room for the activations.
GRAPH_BYTES_PER_PIXEL = 64
# Visualize (MACO), per crop pixel of one step: the crops, their noise and gradients as
# float64 RGB, the model's batch and its INPUT_GRADIENT in transport; per picture pixel:
# the picture's forward states, the transparency and the spectra (float64 and complex).
VISUALIZE_BYTES_PER_CROP_PIXEL = 160
VISUALIZE_BYTES_PER_PICTURE_PIXEL = 400
# EvaluateConsistency, per image pixel: each model's map per explainer held (float64)
# with the scoring's flattened copies.
CONSISTENCY_BYTES_PER_MAP_PIXEL = 24
# Interactions, per pixel of each composed image held (the distinct design rows and one
# stage's edits, at most as many): the image, the editor's answer as received and the
# cache's encoding of a call's images (measured in tests/unit/test_server_memory.py:
# estimates 1.3 to 2.2 times the peak).
COMPOSED_BYTES_PER_PIXEL = 8
# An estimate is rounded up by this much: what a measured request may vary by.
MARGIN = 1.1


@dataclass(frozen=True)
class ClassifierInput:
    """What the classifier takes, as far as memory goes: its view's pixels (None: the
    image's own size, a variable-size model), its datatype and its batch."""

    pixels: int | None
    datatype: str
    max_batch_size: int

    def view(self, image_pixels: int) -> int:
        return self.pixels if self.pixels is not None else image_pixels


# When the classifier cannot be described: the costliest one the gateway accepts, a
# float32 model that sees the image at its own size, batching freely.
ANY_CLASSIFIER = ClassifierInput(None, "FP32", 1 << 30)


def classifier_input(model: ModelDescription | None) -> ClassifierInput:
    """The model's input as ClassifierInput; ANY_CLASSIFIER when it cannot be read (the
    plan refuses such a model with its own error)."""
    if model is None or len(model.required_inputs) != 1 or model.max_batch_size <= 0:
        return ANY_CLASSIFIER
    tensor = model.required_inputs[0]
    try:
        layout = input_layout(tensor.name, tensor.datatype, tensor.shape, model.name)
    except PropscopeError:
        return ANY_CLASSIFIER
    pixels = layout.height * layout.width if layout.height and layout.width else None
    return ClassifierInput(pixels, layout.datatype, model.max_batch_size)


def declared_pixels(data: bytes, limits: Limits) -> int:
    """The pixels an image's header declares, read without decoding. 0 for what the
    decoder refuses before it allocates (empty, too many bytes or pixels, not PNG or
    JPEG, an unreadable header): that request is refused, not admitted."""
    if not data or len(data) > limits.max_image_bytes:
        return 0
    try:
        with caller_image(data) as image:  # as the decoder opens it
            width, height = image.size
            if image.format not in ("PNG", "JPEG"):
                return 0
    except UnreadableImage:  # the decoder says why
        return 0
    pixels = width * height
    return pixels if 0 < pixels <= limits.max_image_pixels else 0


Request = (
    pb.ExplainRequest
    | apb.AttributeRequest
    | apb.EvaluateAttributionRequest
    | gpb.BuildGraphRequest
    | cpb.FitConceptsRequest
    | cpb.DecomposeConceptRequest
    | consistency_pb2.EvaluateConsistencyRequest
    | vpb.VisualizeRequest
    | ipb.InteractionsRequest
)


def estimate_bytes(
    request: Request, settings: Settings, classifier: ModelDescription | None = None
) -> int:
    """An upper bound of the memory the gateway needs to serve `request`, from the
    request's declared sizes and the classifier's input (None: the costliest model)."""
    limits = settings.limits
    if isinstance(request, gpb.BuildGraphRequest):
        return _graph(request, settings, classifier_input(classifier))
    if isinstance(request, consistency_pb2.EvaluateConsistencyRequest):
        return _consistency(request, settings, classifier_input(classifier))
    if isinstance(request, cpb.FitConceptsRequest | cpb.DecomposeConceptRequest):
        return _concepts(request, settings, classifier_input(classifier))
    if isinstance(request, vpb.VisualizeRequest):
        return _visualize(request, settings, classifier_input(classifier))
    pixels = declared_pixels(request.image, limits)
    held = REQUEST_COPIES * request.ByteSize() + REQUEST_OVERHEAD_BYTES
    if pixels == 0:
        return held
    model = classifier_input(classifier)
    if isinstance(request, pb.ExplainRequest):
        method = _explain(request, settings, pixels, model)
    elif isinstance(request, apb.AttributeRequest):
        method = _attribute(request, settings, pixels, model)
    elif isinstance(request, ipb.InteractionsRequest):
        method = _interactions(request, settings, pixels, model)
    else:
        method = _evaluate(request, settings, pixels, model)
    # Decoding's buffers are gone before the method runs; the image stays.
    working = IMAGE_BYTES_PER_PIXEL * pixels + max(DECODE_BYTES_PER_PIXEL * pixels, method)
    return held + int(MARGIN * working)


def _graph(request: gpb.BuildGraphRequest, settings: Settings, model: ClassifierInput) -> int:
    """Every image and reference image held with its working arrays; batches of
    max_batch_size intervened copies of the largest image's model input in flight,
    graph_concurrency of them at once. An image the decoder refuses counts nothing: the
    request is refused before any work. So does a classifier that cannot be described
    (ANY_CLASSIFIER): the plan refuses it before any batch, and its unbounded batch
    (2^30 rows) would turn an unknown model name into RESOURCE_EXHAUSTED."""
    limits = settings.limits
    held = REQUEST_COPIES * request.ByteSize() + REQUEST_OVERHEAD_BYTES
    images = request.images[: limits.max_graph_images]
    pixels = [declared_pixels(data, limits) for data in (*images, *request.reference_images)]
    largest = max(pixels, default=0)
    if largest == 0:
        return held
    method = GRAPH_BYTES_PER_PIXEL * sum(pixels)
    if model != ANY_CLASSIFIER:
        in_flight = model.max_batch_size * settings.graph_concurrency
        method += _classified(in_flight, largest, model)
    working = IMAGE_BYTES_PER_PIXEL * sum(pixels) + max(DECODE_BYTES_PER_PIXEL * largest, method)
    return held + int(MARGIN * working)


def _visualize(request: vpb.VisualizeRequest, settings: Settings, model: ClassifierInput) -> int:
    """The spectrum images decoded one at a time, then one step's crops at the model's
    input size (the picture's when the model takes any) and the picture's arrays."""
    limits = settings.limits
    held = REQUEST_COPIES * request.ByteSize() + REQUEST_OVERHEAD_BYTES
    images = request.spectrum_images[: limits.max_visualize_images]
    pixels = [declared_pixels(data, limits) for data in images]
    side = min(request.size_px or 512, limits.max_visualize_side_px)
    picture = side * side
    crops = min(request.crops or 32, limits.max_visualize_crops)
    method = VISUALIZE_BYTES_PER_CROP_PIXEL * crops * model.view(picture)
    method += VISUALIZE_BYTES_PER_PICTURE_PIXEL * picture * (1 + len(pixels))
    working = DECODE_BYTES_PER_PIXEL * max(pixels, default=0) + method
    return held + int(MARGIN * working)


def _concepts(
    request: cpb.FitConceptsRequest | cpb.DecomposeConceptRequest,
    settings: Settings,
    model: ClassifierInput,
) -> int:
    """As BuildGraph's: every image held with its working arrays (crops, activations)
    and one batch of max_batch_size model inputs in flight."""
    limits = settings.limits
    held = REQUEST_COPIES * request.ByteSize() + REQUEST_OVERHEAD_BYTES
    pixels = [declared_pixels(data, limits) for data in request.images[: limits.max_concept_images]]
    largest = max(pixels, default=0)
    if largest == 0:
        return held
    method = GRAPH_BYTES_PER_PIXEL * sum(pixels)
    if model != ANY_CLASSIFIER:
        method += _classified(model.max_batch_size, largest, model)
    working = IMAGE_BYTES_PER_PIXEL * sum(pixels) + max(DECODE_BYTES_PER_PIXEL * largest, method)
    return held + int(MARGIN * working)


def _consistency(
    request: consistency_pb2.EvaluateConsistencyRequest, settings: Settings, model: ClassifierInput
) -> int:
    """Every image held with every model's map per explainer; the models' perturbed
    batches side by side (one attribution per model at once, as Attribute's on the
    largest image), sized by the first model's input."""
    limits = settings.limits
    held = REQUEST_COPIES * request.ByteSize() + REQUEST_OVERHEAD_BYTES
    pixels = [
        declared_pixels(data, limits) for data in request.images[: limits.max_consistency_images]
    ]
    largest = max(pixels, default=0)
    if largest == 0:
        return held
    models = min(len(request.models), limits.max_consistency_models)
    maps = CONSISTENCY_BYTES_PER_MAP_PIXEL * models * len(EXPLAINERS) * sum(pixels)
    view = model.view(largest)
    perturbed = _perturbed(
        view, model, limits.max_consistency_passes, settings.attribution_concurrency, "rise"
    )
    method = maps + models * (_view(largest, model) + perturbed)
    working = IMAGE_BYTES_PER_PIXEL * sum(pixels) + max(DECODE_BYTES_PER_PIXEL * largest, method)
    return held + int(MARGIN * working)


def _classified(images: int, pixels: int, model: ClassifierInput) -> int:
    """`images` images of `pixels` pixels classified in one call (Explain's)."""
    view = model.view(pixels)
    element = ELEMENT_BYTES[model.datatype]
    resize = RESIZE_BYTES_PER_PIXEL * pixels if view != pixels else 0
    chunk = min(images, model.max_batch_size) * view
    return (
        images * view * INPUT_BYTES_PER_VIEW_PIXEL[model.datatype]
        + chunk * 3 * element * TRANSPORT_COPIES
        + resize
    )


def _explain(
    request: pb.ExplainRequest, settings: Settings, pixels: int, model: ClassifierInput
) -> int:
    """The decoded provided paths and masks, held; then the properties that run at once
    (property_concurrency), the costliest first."""
    limits = settings.limits
    properties = request.properties[: limits.max_properties]
    steps = min(max(request.steps or DEFAULT_STEPS, 2), limits.max_steps)
    samples = min(request.samples or DEFAULT_SAMPLES, limits.max_samples)
    adaptive = request.path_mode != pb.PATH_MODE_FIXED
    try:
        longest = resolve_max_steps(request, (pixels, 1), steps, samples, adaptive, limits)
    except PropscopeError:  # refused by the validation that decodes
        longest = steps
    returned = pixels
    if request.path_image_max_side_px:  # thumbnails: at most a square of that side
        returned = min(pixels, request.path_image_max_side_px**2)
    held, costs = 0, []
    for prop in properties:
        provided = prop.WhichOneof("source") == "provided_path"
        images = len(prop.provided_path.images) + 1 if provided else samples * (longest + 1)
        per_pixel = PROVIDED_PATH_BYTES_PER_PIXEL if provided else PATH_BYTES_PER_PIXEL
        cost = per_pixel * images * pixels + _classified(images, pixels, model)
        if request.return_path_images:
            cost += RETURNED_PATH_BYTES_PER_PIXEL * images * returned
        if provided:
            held += IMAGE_BYTES_PER_PIXEL * pixels * (images - 1)
        if prop.region.WhichOneof("shape") is not None:
            held += MASK_BYTES_PER_PIXEL * pixels + _mask_decoding(prop.region, limits)
            cost += REGION_BYTES_PER_PIXEL * longest * pixels
        if automatic_region(prop.editor.parameters):
            cost += OBJECT_MASK_BYTES_PER_PIXEL * pixels
        costs.append(cost)
    running = sorted(costs, reverse=True)[: settings.property_concurrency]
    return held + sum(running)


def _interactions(
    request: ipb.InteractionsRequest, settings: Settings, pixels: int, model: ClassifierInput
) -> int:
    """The composed images (the distinct rows and one stage's edits) or the decoded
    provided ones, the regions' masks and compositing, and the batches being classified
    (attribution_concurrency of max_batch_size at once)."""
    limits = settings.limits
    properties = request.properties[: limits.max_properties]
    size = min(request.design_size or DEFAULT_DESIGN_SIZE, limits.max_interaction_design_size)
    rows = design_row_count(max(len(properties), 2), size, bool(request.second_order_pair))
    rows = min(rows, limits.max_interaction_images)
    if request.HasField("provided_design"):
        held = (IMAGE_BYTES_PER_PIXEL + PROVIDED_PATH_BYTES_PER_PIXEL) * rows * pixels
    else:
        held = COMPOSED_BYTES_PER_PIXEL * 2 * rows * pixels
    in_flight = min(rows, model.max_batch_size * settings.attribution_concurrency)
    method = held + _classified(in_flight, pixels, model)
    regions = [p.region for p in properties if p.region.WhichOneof("shape") is not None]
    for region in regions:
        method += MASK_BYTES_PER_PIXEL * pixels + _mask_decoding(region, limits)
    if regions:  # one call's images composited at a time per call in flight
        method += REGION_BYTES_PER_PIXEL * min(rows, 2 * size) * pixels
    if any(automatic_region(p.editor.parameters) for p in properties):
        method += OBJECT_MASK_BYTES_PER_PIXEL * pixels
    return method


def _mask_decoding(region: pb.Region, limits: Limits) -> int:
    """A mask image is decoded at its own size, then scaled to the image."""
    if region.WhichOneof("shape") != "mask":
        return 0
    return DECODE_BYTES_PER_PIXEL * declared_pixels(region.mask, limits)


def _view(pixels: int, model: ClassifierInput) -> int:
    """The model's view and the arrays around it, for the attribution methods."""
    view = model.view(pixels)
    resize = RESIZE_BYTES_PER_PIXEL * pixels if view != pixels else 0
    return VIEW_BYTES_PER_PIXEL * view + resize


def _perturbed(
    view: int, model: ClassifierInput, passes: int, in_flight: int, method: str = "sobol"
) -> int:
    """`passes` perturbed views, made and classified in batches bounded to
    PERTURBATION_BATCH_PIXELS (one image at least), `in_flight` batches at once;
    RISE's mask blocks beside each batch; EVA's radius rows with each row."""
    images = max(1, min(model.max_batch_size, PERTURBATION_BATCH_PIXELS // view))
    in_flight = min(in_flight, -(-passes // images))
    element = ELEMENT_BYTES[model.datatype]
    per_pixel = BATCH_BYTES_PER_PIXEL + 3 * element * TRANSPORT_COPIES
    if method == "eva":
        per_pixel += EVA_BYTES_PER_ROW_PIXEL
    rise = method == "rise"
    blocks = RISE_BYTES_PER_BLOCK_PIXEL * RISE_BLOCK * view * in_flight if rise else 0
    return min(passes, in_flight * images) * view * per_pixel + blocks


def _method_passes(message: apb.AttributeRequest | apb.StabilityOptions) -> tuple[int, str]:
    """(forward passes, the method) of the `method` oneof, defaults filled in."""
    chosen = message.WhichOneof("method")
    if chosen == "rise":
        return message.rise.nb_samples or RISE_DEFAULT_SAMPLES, chosen
    if chosen == "eva":
        return (message.eva.grid_size or EVA_DEFAULT_GRID) ** 2 + 1, chosen
    grid, designs = SOBOL_DEFAULTS
    sobol = message.sobol
    channels = 3 if sobol.per_channel else 1
    return (sobol.nb_design or designs) * ((sobol.grid_size or grid) ** 2 * channels + 2), "sobol"


def _attribute(
    request: apb.AttributeRequest, settings: Settings, pixels: int, model: ClassifierInput
) -> int:
    view = model.view(pixels)
    passes, method = _method_passes(request)
    perturbed = _perturbed(view, model, passes, settings.attribution_concurrency, method)
    return _view(pixels, model) + perturbed + IMAGE_MAP_BYTES_PER_PIXEL * pixels


def _evaluate(
    request: apb.EvaluateAttributionRequest,
    settings: Settings,
    pixels: int,
    model: ClassifierInput,
) -> int:
    """The map, then the costliest metric: they run one after another, Deletion,
    Insertion and MuFidelity one batch at a time, Stability as an attribution per view."""
    view = model.view(pixels)
    values = len(request.explanation.values)
    held = _view(pixels, model) + MAP_BYTES_PER_VALUE * (values + view)
    named = [request.HasField(name) for name in ("deletion", "insertion", "mu_fidelity")]
    passes = 0
    if not any(named) and not request.HasField("stability"):
        named = [True, True, True]
    if named[0] or named[1]:
        steps = max(request.deletion.steps, request.insertion.steps) or DELETION_DEFAULT_STEPS
        passes = steps + 1
    if named[2]:
        passes = max(passes, request.mu_fidelity.nb_samples or MU_FIDELITY_DEFAULT_SAMPLES)
    metric = _perturbed(view, model, passes, 1) + ORDER_BYTES_PER_PIXEL * view if passes else 0
    if request.HasField("stability"):
        stability = request.stability
        method_passes, method = _method_passes(stability)
        samples = stability.nb_samples or STABILITY_DEFAULT_SAMPLES
        attribution = _perturbed(
            view, model, method_passes, settings.attribution_concurrency, method
        )
        maps = (samples + 1) * KEPT_MAP_BYTES_PER_PIXEL * view
        metric = max(metric, NOISY_VIEW_BYTES_PER_PIXEL * view + maps + attribution)
    return held + metric


class Lower(NamedTuple):
    """What a refusal over the whole budget says the estimate came from and what to lower."""

    basis: str
    advice: str
    field: str | None = None


PATH_LOWER = Lower(
    "its declared image size, path images, samples, steps and properties",
    "send a smaller image or fewer steps, samples, properties or returned path images",
)


def what_to_lower(
    request: Request, settings: Settings, classifier: ModelDescription | None, budget_bytes: int
) -> Lower:
    """For interactions, the largest design_size that fits both the budget and the request
    limits (field design_size), or the limits' own refusal when even the requested size
    breaks them (it names the image size to send); the generic advice for other methods."""
    if not isinstance(request, ipb.InteractionsRequest):
        return PATH_LOWER
    limits = settings.limits
    with caller_image(request.image) as image:  # readable: the estimate declared its pixels
        width, height = image.size
    names = [p.name for p in request.properties]
    wanted = list(request.second_order_pair)
    pair = None
    if len(wanted) == 2 and wanted[0] != wanted[1] and all(n in names for n in wanted):
        first, second = sorted(names.index(name) for name in wanted)
        pair = first, second
    count = max(len(request.properties), 2)
    composed = not request.HasField("provided_design")
    size = min(request.design_size or DEFAULT_DESIGN_SIZE, limits.max_interaction_design_size)
    check_budgets(count, size, request.seed, pair, limits, (height, width), composed)
    basis = "its declared image size, design size and properties"
    trial = ipb.InteractionsRequest()
    trial.CopyFrom(request)
    while size > MIN_DESIGN_SIZE:
        size //= 2
        trial.design_size = size
        if estimate_bytes(trial, settings, classifier) <= budget_bytes:
            return Lower(
                basis,
                f"send a design_size of {size} or less, a smaller image or fewer properties",
                "design_size",
            )
    return Lower(basis, "send a smaller image (fewer pixels) or fewer properties", "image")


class MemoryBudget:
    """The gateway's memory for requests: a request is admitted when its estimate fits
    beside those running, and refused at once otherwise (never queued: a queue would
    turn a burst of large images into timeouts)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._reserved = 0
        metrics.MEMORY_BUDGET_BYTES.set(budget_bytes)

    @property
    def reserved(self) -> int:
        return self._reserved

    @contextmanager
    def reserve(
        self, nbytes: int, need: str = "this request needs about", lower: Lower = PATH_LOWER
    ) -> Iterator[None]:
        """Holds `nbytes` of the budget for the block. A request larger than the whole
        budget can never run here: refused with what to lower; one that does not fit
        beside the others is told to retry."""
        if nbytes > self.budget_bytes:
            metrics.ADMISSION_REJECTIONS.labels(limit="memory_budget_bytes").inc()
            raise ResourceExhausted(
                f"this request needs about {_mib(nbytes)} of gateway memory (estimated from "
                f"{lower.basis}), more than the gateway's whole memory_budget_bytes of "
                f"{_mib(self.budget_bytes)}: it can never run here; {lower.advice}",
                field=lower.field,
            )
        if self._reserved + nbytes > self.budget_bytes:
            metrics.ADMISSION_REJECTIONS.labels(limit="memory_budget_bytes").inc()
            raise ResourceExhausted(
                f"the gateway's memory_budget_bytes of {_mib(self.budget_bytes)} is in use "
                f"({_mib(self._reserved)} reserved) and {need} {_mib(nbytes)}; retry with "
                "backoff, or send a smaller image"
            )
        self._reserved += nbytes
        metrics.MEMORY_RESERVED_BYTES.set(self._reserved)
        try:
            yield
        finally:
            self._reserved -= nbytes
            metrics.MEMORY_RESERVED_BYTES.set(self._reserved)


class MemoryAdmission:
    """Estimates a request with its classifier's input (asked of the backend, which
    caches descriptions; the plan asks again anyway) and reserves it in the budget. A
    model that cannot be described is estimated at the costliest input, and the plan
    refuses it in its turn; an unreachable Triton fails the call at once."""

    def __init__(self, budget: MemoryBudget, settings: Settings, inference: Inference) -> None:
        self.budget = budget
        self._settings = settings
        self._inference = inference

    @contextmanager
    def receiving(self) -> Iterator[None]:
        """Holds what a request message may take while it is received and parsed (its
        size is known only then): max_request_bytes, RECEIVE_COPIES times. Unread
        messages wait in HTTP/2 flow control, not in the gateway."""
        largest = RECEIVE_COPIES * self._settings.limits.max_request_bytes
        need = "receiving a request message may take up to"
        with self.budget.reserve(min(largest, self.budget.budget_bytes), need):
            yield

    async def receive(
        self, pending: PendingRequest, deadline: float | None, held: ExitStack
    ) -> Message:
        """A call's message, received within the budget; its request's estimate is then
        held in `held`, which the caller closes once the call has ended (its status
        sent), so that a message is never in memory unaccounted for. The receiving
        reservation is let go only once the estimate's is held."""
        with self.receiving():
            request = await pending.read()
            classifier = await self._classifier(request, deadline)
            nbytes = estimate_bytes(request, self._settings, classifier)
            logger.debug("memory estimate %d bytes", nbytes)
            lower = PATH_LOWER
            if nbytes > self.budget.budget_bytes:
                lower = what_to_lower(request, self._settings, classifier, self.budget.budget_bytes)
            held.enter_context(self.budget.reserve(nbytes, lower=lower))
        return request

    async def estimate(self, request: Request, deadline: float | None) -> int:
        nbytes = estimate_bytes(request, self._settings, await self._classifier(request, deadline))
        logger.debug("memory estimate %d bytes", nbytes)
        return nbytes

    async def _classifier(
        self, request: Request, deadline: float | None
    ) -> ModelDescription | None:
        """The first model's description (None: estimate the costliest input)."""
        classifier = None
        first = _first_model(request)
        if first.name:
            try:
                model = classifier_ref(first)  # no unchecked name reaches Triton
                classifier = await self._inference.describe(model.name, model.version, deadline)
            except (Unavailable, DeadlineExceeded):
                raise  # the plan would wait for the same answer again
            except PropscopeError:  # the plan reports it in its turn; estimate the worst
                classifier = None
        return classifier


def _first_model(request: Request) -> pb.ModelRef:
    """The model whose input sizes the estimate: EvaluateConsistency's first."""
    if isinstance(request, consistency_pb2.EvaluateConsistencyRequest):
        return request.models[0] if request.models else pb.ModelRef()
    return request.model


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:,.0f} MiB"
