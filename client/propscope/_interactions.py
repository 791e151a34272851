"""Sobol indices over semantic interventions (InteractionService): the typed result of
``Client.interactions``, its request, the caller's own edit functions rendered into a
provided design, and the calls themselves (``InteractionCalls``, which ``Client`` and
``AsyncClient`` inherit). docs/interactions.md.

First-order indices say how much of the prediction's variance one property's strength explains
alone, total-order indices add its interactions with the others; their difference, summed, is
the interaction share (0 for a model that adds the properties' effects up).
"""

from __future__ import annotations

import asyncio
import inspect
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from PIL import Image

from propscope._attribution import target_score_from_proto, target_score_to_proto
from propscope._errors import PropscopeError
from propscope._images import ImageLike, encode_image
from propscope._json import JsonRecord
from propscope._preprocessing import Preprocessing
from propscope._properties import Property
from propscope._requests import Metadata, build_model_ref, named_property, property_of
from propscope.v1 import explain_pb2, interactions_pb2, interactions_pb2_grpc

__all__ = [
    "EditFunction",
    "InteractionCalls",
    "InteractionDesign",
    "InteractionProperties",
    "InteractionsProgress",
    "InteractionsResult",
    "Interval",
    "PropertyIndices",
    "SecondOrderIndex",
    "build_interactions_request",
    "check_design_size",
    "render_design",
]

EditFunction = Callable[[np.ndarray, float], Any]
"""The caller's own edit: (RGB uint8 HxWx3 image, strength in [0, 1]) -> the edited image (an
array of the same shape, a PIL image or encoded bytes). Strength 0 should give the input back."""

InteractionProperties = Sequence[Property | str] | Mapping[str, Property | str | EditFunction]
"""Two or more properties: ``Property`` objects or ``NAME=EDITOR:...`` texts (the gateway's
editors compose them), or a mapping of names to such texts, ``Property`` objects or edit
functions (all of them functions: rendered here, sent as a provided design)."""

# The design sizes the gateway accepts (a power of two; its limits on images may be lower).
MIN_DESIGN_SIZE, MAX_DESIGN_SIZE = 4, 1024


@dataclass(frozen=True)
class Interval(JsonRecord):
    """A point estimate with its bootstrap percentile interval [low, high]."""

    value: float
    low: float
    high: float

    @classmethod
    def from_proto(cls, msg: interactions_pb2.Estimate) -> Interval:
        return cls(msg.value, msg.ci_low, msg.ci_high)


@dataclass(frozen=True)
class PropertyIndices(JsonRecord):
    """One property's first-order (alone) and total-order (with its interactions) indices,
    and their difference: its share in interactions."""

    name: str
    first_order: Interval
    total_order: Interval
    interaction: Interval


@dataclass(frozen=True)
class SecondOrderIndex(JsonRecord):
    """The closed second-order index of a pair: the variance their joint change explains
    beyond each one's own."""

    properties: tuple[str, str]
    index: Interval


@dataclass(frozen=True)
class InteractionsProgress(JsonRecord):
    """``stage`` "render" (the caller's own edits, here), "edit" or "classify" (the
    gateway's): ``completed`` of ``total``."""

    request_id: str
    stage: str
    completed: int
    total: int


@dataclass(frozen=True)
class InteractionDesign(JsonRecord):
    """The design's strengths: ``rows`` [R, P] in [0, 1], row r's image edited by property p
    at ``rows[r, p]``; ``row_kinds`` says what each row is ("A", "B", "C1".., "C12")."""

    rows: np.ndarray
    row_kinds: tuple[str, ...]

    @classmethod
    def from_proto(cls, msg: interactions_pb2.InteractionDesignResponse) -> InteractionDesign:
        rows = np.array([list(row.strengths) for row in msg.rows], dtype=np.float32)
        return cls(rows=rows, row_kinds=tuple(msg.row_kinds))

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.tolist(), "row_kinds": list(self.row_kinds)}


@dataclass(frozen=True)
class InteractionsResult(JsonRecord):
    """A finished Interactions call: the plan (model version, composition order, resolved
    options, planned images), each property's indices, the pair's second-order index, the
    interaction share and what it cost. ``own_edits``: the images were the caller's edit
    functions' (a provided design), rendered by the SDK."""

    request_id: str
    model: str
    model_version: str
    composition_order: tuple[str, ...]
    design_size: int
    bootstrap: int
    confidence: float
    target_score: str
    target_class: int
    target_label: str
    indices: tuple[PropertyIndices, ...]
    second_order: SecondOrderIndex | None
    interaction_share: Interval
    interaction_significant: bool
    variance: float
    mean: float
    planned_images: int
    planned_edits: int
    planned_forward_passes: int
    cache_hits: int
    cache_misses: int
    edits: int
    forward_passes: int
    own_edits: bool
    warnings: tuple[str, ...]
    # The score's sd over rows A and B is below 0.01: interaction_significant is then false.
    negligible_variance: bool = False

    @property
    def share_verdict(self) -> str:
        """What the interaction share decides, in the words the CLI and the reports use:
        nothing when the score barely moves (its intervals are then the score's noise),
        else whether its interval lies above 0."""
        if self.negligible_variance:
            return f"not decided: the score barely moves (variance {self.variance:.3g})"
        if self.interaction_significant:
            return "significant"
        return "not significant (the interval reaches 0)"

    def __getitem__(self, name: str) -> PropertyIndices:
        """The indices of property ``name``; KeyError naming the properties when unknown."""
        for found in self.indices:
            if found.name == name:
                return found
        raise KeyError(f"no property {name!r}; the result's: {', '.join(self.composition_order)}")


class InteractionsCollector:
    """Folds an Interactions stream into one ``InteractionsResult``; progress goes to
    ``on_progress`` as it comes."""

    def __init__(
        self,
        request_id: str,
        model: str,
        on_progress: Callable[[InteractionsProgress], None] | None = None,
        *,
        own_edits: bool = False,
    ) -> None:
        self._request_id = request_id
        self._model = model
        self._on_progress = on_progress
        self._own_edits = own_edits
        self._accepted: interactions_pb2.InteractionsAccepted | None = None
        self._result: interactions_pb2.InteractionsResult | None = None

    def add(self, message: interactions_pb2.InteractionsEvent) -> None:
        self._request_id = message.request_id or self._request_id
        kind = message.WhichOneof("event")
        if kind == "accepted":
            self._accepted = message.accepted
        elif kind == "progress" and self._on_progress is not None:
            progress = message.progress
            self._on_progress(
                InteractionsProgress(
                    self._request_id, progress.stage, progress.completed, progress.total
                )
            )
        elif kind == "result":
            self._result = message.result

    def result(self) -> InteractionsResult:
        accepted, found = self._accepted, self._result
        if accepted is None or found is None:
            raise PropscopeError(
                grpc.StatusCode.INTERNAL,
                "the Interactions stream ended without its plan and its result "
                "(InteractionsAccepted and InteractionsResult; a server fault)",
            )
        second = None
        if found.HasField("second_order") and len(found.second_order.property_names) == 2:
            first_name, second_name = found.second_order.property_names
            second = SecondOrderIndex(
                (first_name, second_name), Interval.from_proto(found.second_order.index)
            )
        return InteractionsResult(
            request_id=self._request_id,
            model=self._model,
            model_version=accepted.model_version,
            composition_order=tuple(found.composition_order or accepted.composition_order),
            design_size=accepted.design_size,
            bootstrap=accepted.bootstrap,
            confidence=accepted.confidence,
            target_score=target_score_from_proto(found.target_score or accepted.target_score),
            target_class=found.target_class,
            target_label=found.target_label,
            indices=tuple(
                PropertyIndices(
                    name=item.property_name,
                    first_order=Interval.from_proto(item.first_order),
                    total_order=Interval.from_proto(item.total_order),
                    interaction=Interval.from_proto(item.interaction),
                )
                for item in found.indices
            ),
            second_order=second,
            interaction_share=Interval.from_proto(found.interaction_share),
            interaction_significant=found.interaction_significant,
            variance=found.variance,
            mean=found.mean,
            planned_images=accepted.planned_images,
            planned_edits=accepted.planned_edits,
            planned_forward_passes=accepted.planned_forward_passes,
            cache_hits=found.cache_hits,
            cache_misses=found.cache_misses,
            edits=found.edits,
            forward_passes=found.forward_passes,
            own_edits=self._own_edits,
            # The plan's warnings may come again with the result: each once.
            warnings=tuple(dict.fromkeys((*accepted.warnings, *found.warnings))),
            negligible_variance=found.negligible_variance,
        )


def _named_properties(
    properties: InteractionProperties,
) -> tuple[list[Property], list[tuple[str, EditFunction]]]:
    """The properties as ``Property`` objects (the gateway edits) or as named edit functions
    (rendered here): never both, at least two, unique names."""
    editors: list[Property] = []
    functions: list[tuple[str, EditFunction]] = []
    if isinstance(properties, Mapping):
        for name, spec in properties.items():
            if not isinstance(name, str) or not name:
                raise TypeError(
                    f"property names (the mapping's keys) must be non-empty str: {name!r}"
                )
            found = named_property(name, spec)
            if found is not None:
                editors.append(found)
            elif callable(spec):
                functions.append((name, spec))
            else:
                raise TypeError(
                    f"properties[{name!r}] must be an edit function (image, strength) -> image, "
                    f"a Property or EDITOR[:key=value,...] text, not {type(spec).__name__}"
                )
    elif isinstance(properties, str | Property) or not isinstance(properties, Iterable):
        raise TypeError(
            "properties must be a sequence of two or more Property objects or NAME=SPEC texts, "
            "or a mapping {NAME: SPEC or edit function}"
        )
    else:
        for item in properties:
            found = property_of(item)
            if found is None:
                raise TypeError(
                    "properties: give edit functions as a mapping {NAME: function}; a sequence "
                    f"holds Property objects or NAME=SPEC texts, not {type(item).__name__}"
                )
            editors.append(found)
    if editors and functions:
        raise ValueError(
            "properties: give either editors (the gateway composes them) or edit functions "
            f"(rendered here) for every property, not both (editors: "
            f"{', '.join(p.name for p in editors)}; functions: "
            f"{', '.join(name for name, _ in functions)})"
        )
    names = [p.name for p in editors] + [name for name, _ in functions]
    if len(names) < 2:
        raise ValueError(f"properties: interactions need at least two properties, got {len(names)}")
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"properties: property name {twice[0]!r} is given twice")
    for index, prop in enumerate(editors):
        if prop.provided_path is not None:
            raise ValueError(
                f"properties[{index}] ({prop.name!r}): a provided path cannot compose with "
                "other edits; use an editor, or an edit function (image, strength) -> image"
            )
    return editors, functions


def _checked_pair(pair: Sequence[str] | None, names: Sequence[str]) -> list[str]:
    """The second-order pair's two names, checked against ``names`` (empty: no pair)."""
    if pair is None or len(pair) == 0:
        return []
    if isinstance(pair, str) or len(pair) != 2:
        raise ValueError(f"pair must be two property names, e.g. ('hue', 'patch'), got {pair!r}")
    unknown = [name for name in pair if name not in names]
    if unknown:
        raise ValueError(
            f"pair: unknown property {unknown[0]!r}; the properties: {', '.join(names)}"
        )
    if pair[0] == pair[1]:
        raise ValueError(f"pair: give two different properties, got {pair[0]!r} twice")
    return list(pair)


def check_design_size(design_size: int) -> None:
    """0 (the server's default) or a power of two in range; ValueError naming the nearest."""
    if design_size == 0:
        return
    if design_size < MIN_DESIGN_SIZE or design_size & (design_size - 1):
        below = max(MIN_DESIGN_SIZE, 1 << max(0, design_size.bit_length() - 1))
        above = max(MIN_DESIGN_SIZE, 1 << max(0, (design_size - 1).bit_length()))
        nearest = f"{below} or {above}" if below != above else str(below)
        raise ValueError(
            f"design_size must be a power of two in {MIN_DESIGN_SIZE}..{MAX_DESIGN_SIZE} (0: the "
            f"server's default 32), got {design_size}; the nearest: {nearest}"
        )
    if design_size > MAX_DESIGN_SIZE:
        raise ValueError(f"design_size must be at most {MAX_DESIGN_SIZE}, got {design_size}")


def build_interactions_request(
    image: ImageLike,
    model: str,
    properties: InteractionProperties,
    *,
    design_size: int = 0,
    pair: Sequence[str] | None = None,
    bootstrap: int = 0,
    confidence: float = 0.0,
    target_score: str = "auto",
    target_class: int | None = None,
    seed: int = 0,
    model_version: str = "",
    model_output: str = "",
    request_id: str = "",
    preprocessing: Preprocessing | None = None,
    class_labels: Sequence[str] = (),
) -> tuple[interactions_pb2.InteractionsRequest, list[tuple[str, EditFunction]]]:
    """The request for ``Client.interactions``'s arguments (0: the server's defaults), and the
    edit functions to render its provided design with (empty: the gateway's editors)."""
    editors, functions = _named_properties(properties)
    names = [p.name for p in editors] + [name for name, _ in functions]
    second_order_pair = _checked_pair(pair, names)
    check_design_size(design_size)
    for name, value in (("bootstrap", bootstrap), ("seed", seed)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0: the default), got {value}")
    if confidence != 0 and not (math.isfinite(confidence) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1) (0: the default 0.95), got {confidence}")
    model_ref = build_model_ref(
        model,
        target_class=target_class,
        model_version=model_version,
        model_output=model_output,
        preprocessing=preprocessing,
        class_labels=class_labels,
    )
    if functions:
        messages = [explain_pb2.Property(name=name) for name, _ in functions]
    else:
        messages = [prop.to_proto() for prop in editors]
    request = interactions_pb2.InteractionsRequest(
        request_id=request_id,
        image=encode_image(image),
        model=model_ref,
        properties=messages,
        design_size=design_size,
        second_order_pair=second_order_pair,
        bootstrap=bootstrap,
        confidence=confidence,
        target_score=target_score_to_proto(target_score),
        seed=seed,
    )
    return request, functions


def _design_request(
    request: interactions_pb2.InteractionsRequest,
) -> interactions_pb2.InteractionDesignRequest:
    names = [p.name for p in request.properties]
    return interactions_pb2.InteractionDesignRequest(
        properties=len(names),
        design_size=request.design_size,
        second_order_pair=[names.index(name) for name in request.second_order_pair],
        seed=request.seed,
    )


def _as_array(edited: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """An edit function's output as an RGB uint8 array of the input's shape; ValueError
    naming the property otherwise."""
    if isinstance(edited, np.ndarray):
        array = edited
    else:
        try:
            with Image.open(io.BytesIO(encode_image(edited))) as opened:
                array = np.asarray(opened.convert("RGB"))
        except (TypeError, ValueError, OSError) as error:
            raise ValueError(f"property {name!r}: the edit function's output: {error}") from None
    if array.dtype != np.uint8 or array.shape != shape:
        raise ValueError(
            f"property {name!r}: the edit function must return an RGB uint8 image of the input's "
            f"shape {shape}, got {array.dtype} {array.shape}"
        )
    return array


def render_design(
    image: bytes,
    functions: Sequence[tuple[str, EditFunction]],
    design: InteractionDesign,
    on_row: Callable[[int, int], None] | None = None,
) -> list[bytes]:
    """Each design row's image: the edit functions applied in turn (the first's output is the
    second's input), each at the row's strength for it; PNG bytes in row order. Rows that share
    their first strengths share those edits (the design's C rows repeat A's prefixes)."""
    with Image.open(io.BytesIO(image)) as opened:
        original = np.asarray(opened.convert("RGB"))
    if design.rows.ndim != 2 or design.rows.shape[1] != len(functions):
        raise PropscopeError(
            grpc.StatusCode.INTERNAL,
            f"the design has {design.rows.shape} strengths for {len(functions)} properties "
            "(a server fault)",
        )
    prefixes: dict[tuple[float, ...], np.ndarray] = {(): original}
    images = []
    for index, row in enumerate(design.rows):
        strengths = tuple(float(s) for s in row)
        current, done = original, 0
        for depth in range(len(strengths), 0, -1):  # the longest prefix already edited
            if strengths[:depth] in prefixes:
                current, done = prefixes[strengths[:depth]], depth
                break
        for depth in range(done, len(functions)):
            name, function = functions[depth]
            try:
                edited = function(current.copy(), strengths[depth])
            except Exception as error:
                raise RuntimeError(
                    f"property {name!r}: the edit function failed on design row {index} at "
                    f"strength {strengths[depth]:g}: {type(error).__name__}: {error}"
                ) from error
            current = _as_array(edited, name, original.shape)
            if depth + 1 < len(functions):
                prefixes[strengths[: depth + 1]] = current
        images.append(encode_image(current))
        if on_row is not None:
            on_row(index + 1, len(design.rows))
    return images


ResultT = TypeVar("ResultT")
DesignT = TypeVar("DesignT")


class InteractionCalls(Generic[ResultT, DesignT]):
    """The InteractionService calls of ``Client`` (values) and ``AsyncClient`` (awaitables);
    they use the client's channel, deadlines, metadata and error mapping."""

    _channel: Any

    def interactions(
        self,
        image: ImageLike,
        model: str,
        properties: InteractionProperties,
        *,
        design_size: int = 0,
        pair: Sequence[str] | None = None,
        bootstrap: int = 0,
        confidence: float = 0.0,
        target_score: str = "auto",
        target_class: int | None = None,
        seed: int = 0,
        model_version: str = "",
        model_output: str = "",
        request_id: str = "",
        preprocessing: Preprocessing | None = None,
        class_labels: Sequence[str] = (),
        on_progress: Callable[[InteractionsProgress], None] | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ResultT:
        """Which of ``properties`` ``model``'s prediction on ``image`` depends on alone, and
        which together: Sobol first- and total-order indices over the properties' strengths
        (each row's image is every property's edit in turn, in the order given), with
        bootstrap intervals at ``confidence``, and the interaction share (sum of total minus
        sum of first order). ``properties``: two or more ``Property`` objects or
        ``NAME=EDITOR:...`` texts (the gateway's editors), or a mapping ``{name: function}``
        of edit functions ``(image array, strength) -> image`` run here on the design
        ``interaction_design`` returns, sent as a provided design. ``design_size`` N (a power
        of two; N (P + 2) images, N more with ``pair``, two property names for their
        second-order index). ``target_score`` "auto" (the probability), "probability",
        "logit" or "log_odds" of ``target_class`` (None: the predicted class). 0: the
        server's defaults (N 32, 1000 resamples, 0.95). ``on_progress`` gets
        ``InteractionsProgress`` (with ``AsyncClient``, "render" progress comes from the
        thread the edit functions run on). Returns one ``InteractionsResult``
        (``AsyncClient``: an awaitable of it)."""
        self._check_open()  # type: ignore[attr-defined]
        request, functions = build_interactions_request(
            image,
            model,
            properties,
            design_size=design_size,
            pair=pair,
            bootstrap=bootstrap,
            confidence=confidence,
            target_score=target_score,
            target_class=target_class,
            seed=seed,
            model_version=model_version,
            model_output=model_output,
            request_id=request_id,
            preprocessing=preprocessing,
            class_labels=class_labels,
        )
        options = self._call_options(timeout, metadata)  # type: ignore[attr-defined]
        stub = interactions_pb2_grpc.InteractionServiceStub(self._channel)
        collector = InteractionsCollector(request_id, model, on_progress, own_edits=bool(functions))
        if not functions:
            return self._collect(stub.Interactions(request, **options), collector)  # type: ignore[attr-defined]
        design = self._unary(  # type: ignore[attr-defined]
            stub.InteractionDesign, _design_request(request), options, InteractionDesign.from_proto
        )

        def render(found: InteractionDesign) -> None:
            def on_row(done: int, total: int) -> None:
                if on_progress is not None:
                    on_progress(InteractionsProgress(request_id, "render", done, total))

            images = render_design(request.image, functions, found, on_row)
            request.provided_design.images.extend(images)

        if inspect.isawaitable(design):
            return self._own_edits_async(stub, design, render, request, options, collector)  # type: ignore[return-value]
        render(design)
        return self._collect(stub.Interactions(request, **options), collector)  # type: ignore[attr-defined]

    async def _own_edits_async(
        self,
        stub: Any,
        design: Any,
        render: Callable[[InteractionDesign], None],
        request: interactions_pb2.InteractionsRequest,
        options: dict[str, Any],
        collector: InteractionsCollector,
    ) -> InteractionsResult:
        """AsyncClient's own-edits call: the design, the edits on a worker thread (the loop
        keeps serving), then the stream."""
        await asyncio.to_thread(render, await design)
        return await self._collect(stub.Interactions(request, **options), collector)  # type: ignore[attr-defined]

    def interaction_design(
        self,
        properties: int,
        *,
        design_size: int = 0,
        pair: tuple[int, int] | None = None,
        seed: int = 0,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> DesignT:
        """The strengths of each design row for ``properties`` properties (at least 2),
        ``design_size`` N, the ``pair``'s indices (0-based) and ``seed``: what the caller's own
        edits render for an Interactions call with a provided design (``interactions`` with
        edit functions does it all). Returns one ``InteractionDesign`` (``AsyncClient``: an
        awaitable of it)."""
        self._check_open()  # type: ignore[attr-defined]
        if properties < 2:
            raise ValueError(f"properties must be at least 2, got {properties}")
        check_design_size(design_size)
        if pair is not None and (
            len(pair) != 2 or pair[0] == pair[1] or not all(0 <= i < properties for i in pair)
        ):
            raise ValueError(
                f"pair must be two different indices in 0..{properties - 1}, got {pair!r}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        request = interactions_pb2.InteractionDesignRequest(
            properties=properties,
            design_size=design_size,
            second_order_pair=list(pair or ()),
            seed=seed,
        )
        stub = interactions_pb2_grpc.InteractionServiceStub(self._channel)
        return self._unary(  # type: ignore[attr-defined]
            stub.InteractionDesign,
            request,
            self._call_options(timeout, metadata),  # type: ignore[attr-defined]
            InteractionDesign.from_proto,
        )
