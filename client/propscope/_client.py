"""The clients: one definition of every call (``ClientBase``), and the synchronous ``Client``.

``ClientBase`` checks the arguments, builds the request and starts the call; a subclass only says
how a started call is read: ``Client`` blocks on grpc's sync stubs, ``AsyncClient``
(``_async_client.py``) awaits grpc.aio's. Both feed the same collectors (``_results.py``) and map
errors the same way (``PropscopeError.from_rpc_error``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import numpy.typing as npt

from propscope._attribution import Attribution, Evaluation
from propscope._concepts import ConceptBank, ConceptCalls, ConceptMaps
from propscope._consistency import ConsistencyCalls, ConsistencyResult
from propscope._errors import PropscopeError
from propscope._events import Event, ModelInfo, event_from_proto
from propscope._graph import GraphCollector, GraphEdge, GraphNode, GraphProgress, GraphResult
from propscope._images import ImageLike
from propscope._interactions import InteractionCalls, InteractionDesign, InteractionsResult
from propscope._preprocessing import PathMode, Preprocessing
from propscope._properties import Property
from propscope._requests import (
    Metadata,
    Properties,
    build_attribute_request,
    build_evaluate_request,
    build_explain_request,
    build_graph_request,
    build_list_models_request,
    call_options,
    channel_options,
)
from propscope._results import (
    AttributeCollector,
    EvaluateCollector,
    ExplainCollector,
    ExplainResult,
    MetricCallback,
    ProgressCallback,
)
from propscope._target import balancing_options, loopback_only, parse_target
from propscope._visualization import (
    Visualization,
    VisualizationCollector,
    VisualizeProgress,
    build_visualize_request,
)
from propscope.v1 import (
    attribution_pb2_grpc,
    explain_pb2,
    explain_pb2_grpc,
    graph_pb2_grpc,
    visualization_pb2_grpc,
)

__all__ = ["Client", "ClientBase", "ExplainStream", "ProgressCallback", "known_event"]

logger = logging.getLogger(__name__)

# What each call returns: the value itself (Client) or an awaitable of it (AsyncClient).
ExplainT = TypeVar("ExplainT")
AttributionT = TypeVar("AttributionT")
EvaluationT = TypeVar("EvaluationT")
ModelsT = TypeVar("ModelsT")
GraphT = TypeVar("GraphT")
VisualizationT = TypeVar("VisualizationT")
Collector = AttributeCollector | EvaluateCollector | GraphCollector | VisualizationCollector


class ClientBase(Generic[ExplainT, AttributionT, EvaluationT, ModelsT, GraphT, VisualizationT]):
    """A connection to a propscope gateway: every call, for ``Client`` and ``AsyncClient``.

    ``target`` is ``host:port``, or several gateways: ``dns:///name:port`` (every address of
    the name, e.g. a headless Service), a comma-separated list of IP addresses
    ``10.0.0.1:50051,10.0.0.2:50051`` or gRPC's ``ipv4:``/``ipv6:`` lists; calls (not
    connections) then round-robin over them. Without ``credentials`` the channel is insecure. ``token`` is
    the gateway's bearer token (sent as ``authorization: Bearer <token>``). ``metadata`` is
    sent with every call (a call's own ``metadata`` is appended), ``timeout`` (seconds) is the
    default deadline of every call (for ``explain``, of the whole stream). ``options`` are extra
    gRPC channel options. Every failed call raises ``PropscopeError``; bad arguments raise
    ``ValueError``, ``TypeError`` or ``OSError`` when the method is called, before anything is
    sent (with ``AsyncClient`` too: before the first ``await``).
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        metadata: Metadata = (),
        timeout: float | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        resolved = parse_target(target)
        self.target = target
        self._metadata = tuple(metadata)
        if token:
            self._metadata += (("authorization", f"Bearer {token}"),)
            if credentials is None and not loopback_only(resolved):
                logger.warning("sending a bearer token to %s over a plaintext channel", target)
        self._timeout = timeout
        self._channel = self._open_channel(
            resolved.address,
            credentials,
            channel_options([*balancing_options(resolved), *options]),
        )
        self._stub = explain_pb2_grpc.ExplainServiceStub(self._channel)
        self._attribution = attribution_pb2_grpc.AttributionServiceStub(self._channel)
        self._graph = graph_pb2_grpc.CausalGraphServiceStub(self._channel)
        self._visualization = visualization_pb2_grpc.VisualizationServiceStub(self._channel)
        self._closed = False

    def explain(
        self,
        image: ImageLike,
        model: str,
        properties: Properties,
        *,
        steps: int = 0,
        samples: int = 0,
        seed: int = 0,
        permutations: int = 0,
        alpha: float = 0.0,
        min_probability_change: float | None = None,
        return_path_images: bool = False,
        target_class: int | None = None,
        model_version: str = "",
        model_output: str = "",
        request_id: str = "",
        preprocessing: Preprocessing | None = None,
        class_labels: Sequence[str] = (),
        path_mode: PathMode | None = None,
        max_steps: int = 0,
        path_image_max_side_px: int = 0,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ExplainT:
        """Explains ``model``'s prediction on ``image`` for each of ``properties``.

        ``image``: encoded PNG/JPEG bytes, a path, an RGB uint8 HxWx3 array or a PIL image.
        ``properties``: ``Property`` objects or ``parse_property`` strings, or a mapping of
        names to what follows ``NAME=`` in that syntax (or to ``Property`` objects of that name),
        e.g. ``{"hue": "procedural:operation=hue"}``. 0 for ``steps``,
        ``samples``, ``permutations`` and ``alpha`` means the server's default;
        ``target_class=None`` follows the class the model predicts for the original image;
        ``min_probability_change=None`` takes the server's default effect size for ``relevant``.
        ``preprocessing`` overrides, field by field, what the model declares (mean, std, output
        kind, resize mode); ``class_labels`` names the classes by index (default: the model's).
        ``path_mode`` is "adaptive" (the server's default: a path the test cannot decide is
        lengthened up to ``max_steps``, 0 meaning the server's limit) or "fixed".
        ``return_path_images`` returns every path's images as PNG, shrunk to at most
        ``path_image_max_side_px`` on their longer side when it is not 0 (thumbnails are far
        cheaper for a large image).

        The arguments are checked and the call started before this returns; the returned
        stream (``ExplainStream``; ``AsyncExplainStream`` for ``async for``) yields
        ``Accepted``, then ``Progress`` and ``PropertyResult`` events, and ``Done`` last, and
        raises ``PropscopeError`` when the call fails, also midway. Its ``result()`` reads the
        stream to its end and returns one ``ExplainResult`` (the plan, every property's result,
        the timings). Closing the stream early (``break``, ``close()``) cancels the call.
        """
        self._check_open()
        request = build_explain_request(
            image,
            model,
            properties,
            steps=steps,
            samples=samples,
            seed=seed,
            permutations=permutations,
            alpha=alpha,
            min_probability_change=min_probability_change,
            return_path_images=return_path_images,
            target_class=target_class,
            model_version=model_version,
            model_output=model_output,
            request_id=request_id,
            preprocessing=preprocessing,
            class_labels=class_labels,
            path_mode=path_mode,
            max_steps=max_steps,
            path_image_max_side_px=path_image_max_side_px,
        )
        logger.debug(
            "Explain %s: model %s, %d properties, request_id %r",
            self.target,
            model,
            len(request.properties),
            request_id,
        )
        call = self._stub.Explain(request, **self._call_options(timeout, metadata))
        return self._explain_stream(call)

    def attribute(
        self,
        image: ImageLike,
        model: str,
        *,
        method: str = "sobol",
        grid_size: int = 0,
        nb_design: int = 0,
        estimator: str = "jansen",
        per_channel: bool = False,
        scrambled: bool = False,
        nb_samples: int = 0,
        preservation_probability: float | None = None,
        epsilon: float | None = None,
        bound: str | None = None,
        hybrid_layer: str = "",
        samples: int = 0,
        target_class: int | None = None,
        target_score: str = "auto",
        perturbation: str = "inpainting",
        baseline: str = "input_zero",
        blur_sigma: float = 0.0,
        seed: int = 0,
        model_version: str = "",
        model_output: str = "",
        request_id: str = "",
        preprocessing: Preprocessing | None = None,
        class_labels: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AttributionT:
        """Where ``model`` looks on ``image``: one attribution map, computed black-box.

        ``method`` "sobol" (``grid_size`` g, ``nb_design`` N a power of two, ``estimator``
        jansen|homma|janon|glen_isaacs|saltelli, ``per_channel``, ``scrambled``: an Owen-scrambled
        design seeded by ``seed``; N (g² + 2) forward passes) or
        "rise" (``grid_size``, ``nb_samples`` masks, ``preservation_probability``) or
        "eva" (an open model with the ``bounds`` capability; ``grid_size``, ``epsilon`` the
        l-inf radius as a fraction of the pixel range, ``bound`` crown|ibp, ``hybrid_layer`` a
        declared layer to verify from, not guaranteed, ``samples`` points sampled in the ball;
        the result's ``eva`` holds the bounds, docs/eva.md); 0 and None
        mean the server's defaults. ``target_score`` "auto" (the logit of a logits model,
        else the log-odds; the result says which), "probability", "logit" or "log_odds" of
        ``target_class`` (None: the predicted class). Masked pixels are replaced by
        ``perturbation`` (inpainting|blur|amplitude) toward ``baseline``
        (input_zero|black|mean_colour|blur, ``blur_sigma`` pixels). ``on_progress`` is called
        with an ``AttributionProgress`` as forward passes complete. Returns the ``Attribution``
        once the map is done (``AsyncClient``: an awaitable of it).
        """
        self._check_open()
        request = build_attribute_request(
            image,
            model,
            method=method,
            grid_size=grid_size,
            nb_design=nb_design,
            estimator=estimator,
            per_channel=per_channel,
            scrambled=scrambled,
            nb_samples=nb_samples,
            preservation_probability=preservation_probability,
            epsilon=epsilon,
            bound=bound,
            hybrid_layer=hybrid_layer,
            samples=samples,
            target_class=target_class,
            target_score=target_score,
            perturbation=perturbation,
            baseline=baseline,
            blur_sigma=blur_sigma,
            seed=seed,
            model_version=model_version,
            model_output=model_output,
            request_id=request_id,
            preprocessing=preprocessing,
            class_labels=class_labels,
        )
        logger.debug("Attribute %s: model %s, method %s", self.target, model, method)
        call = self._attribution.Attribute(request, **self._call_options(timeout, metadata))
        return self._collect(call, AttributeCollector(request_id, on_progress))

    def evaluate_attribution(
        self,
        image: ImageLike,
        model: str,
        explanation: npt.ArrayLike | Attribution | None = None,
        *,
        metrics: Sequence[str] = ("deletion", "insertion", "mu_fidelity"),
        steps: int = 0,
        max_percentage_perturbed: float | None = None,
        baseline: str = "input_zero",
        grid_size: int = 0,
        subset_percent: float | None = None,
        nb_samples: int = 0,
        radius: float | None = None,
        stability_samples: int = 0,
        stability_method: str = "sobol",
        stability_options: Mapping[str, Any] | None = None,
        perturbation: str = "inpainting",
        perturbation_baseline: str = "input_zero",
        blur_sigma: float = 0.0,
        target_class: int | None = None,
        target_score: str = "auto",
        seed: int = 0,
        model_version: str = "",
        model_output: str = "",
        request_id: str = "",
        preprocessing: Preprocessing | None = None,
        class_labels: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
        on_metric: MetricCallback | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> EvaluationT:
        """How faithful an attribution map of ``model`` on ``image`` is.

        ``explanation``: the map, a 2-D array at the image's size (e.g. from Captum), or an
        ``Attribution``; required unless ``metrics`` is only "stability" (which recomputes maps
        with ``stability_method`` and ``stability_options``, e.g. ``{"grid_size": 8}``).
        ``metrics``: some of deletion, insertion, mu_fidelity, stability. Deletion and
        Insertion take ``steps``, ``max_percentage_perturbed`` and ``baseline``; MuFidelity
        ``grid_size``, ``subset_percent``, ``nb_samples`` and ``baseline``; stability
        ``radius`` and ``stability_samples`` (0 and None: the server's defaults).
        ``on_metric`` is called with each ``MetricResult`` as it arrives. Returns one
        ``Evaluation`` (``AsyncClient``: an awaitable of it).
        """
        self._check_open()
        request = build_evaluate_request(
            image,
            model,
            explanation,
            metrics=metrics,
            steps=steps,
            max_percentage_perturbed=max_percentage_perturbed,
            baseline=baseline,
            grid_size=grid_size,
            subset_percent=subset_percent,
            nb_samples=nb_samples,
            radius=radius,
            stability_samples=stability_samples,
            stability_method=stability_method,
            stability_options=stability_options,
            perturbation=perturbation,
            perturbation_baseline=perturbation_baseline,
            blur_sigma=blur_sigma,
            target_class=target_class,
            target_score=target_score,
            seed=seed,
            model_version=model_version,
            model_output=model_output,
            request_id=request_id,
            preprocessing=preprocessing,
            class_labels=class_labels,
        )
        logger.debug("EvaluateAttribution %s: model %s, %s", self.target, model, metrics)
        call = self._attribution.EvaluateAttribution(
            request, **self._call_options(timeout, metadata)
        )
        return self._collect(call, EvaluateCollector(request_id, on_progress, on_metric))

    def graph(
        self,
        images: ImageLike | Sequence[ImageLike],
        model: str,
        *,
        layers: Sequence[str] = (),
        target_class: int | None = None,
        steps: int = 0,
        baseline: str = "mean",
        reference_images: Sequence[ImageLike] = (),
        alpha: float = 0.0,
        permutations: int = 0,
        min_probability_change: float | None = None,
        nodes_per_layer: int = 0,
        max_edges: int = 0,
        min_share: float | None = None,
        bootstrap: int = 0,
        seed: int = 0,
        repair_property: Property | str | None = None,
        repair_max_share: float | None = None,
        model_version: str = "",
        model_output: str = "",
        request_id: str = "",
        preprocessing: Preprocessing | None = None,
        class_labels: Sequence[str] = (),
        on_progress: Callable[[GraphProgress], None] | None = None,
        on_item: Callable[[GraphNode | GraphEdge], None] | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> GraphT:
        """The causal explanatory graph of ``model``'s hidden channels on ``images`` (one image
        or several; arXiv 2305.08950): each channel of ``layers`` (module paths the model
        declares, ``ModelInfo.layers``; empty: all) moved gradually toward its ``baseline``
        ("mean": the model's channel means, else those of ``reference_images``, 8..256 of them;
        "zero") in ``steps`` steps, tested like Explain's properties (``alpha``,
        ``permutations``), then the edges between relevant (kept) channels of consecutive layers.
        ``target_class`` None explains each image's predicted class. With several images the
        result has the task graph (nodes and edges relevant on at least ``min_share`` of the
        class's images, with ``bootstrap`` frequencies). ``repair_property`` (a ``Property`` or
        ``NAME=EDITOR:key=value`` text) asks for the channels to ablate so that the model stops
        relying on it (at most ``repair_max_share`` of the channels). 0 and None: the server's
        defaults. ``on_progress`` gets ``GraphProgress``, ``on_item`` each node and edge as it
        comes. Returns one ``GraphResult`` (``AsyncClient``: an awaitable of it); a black-box
        model is refused (``PropscopeError`` FAILED_PRECONDITION).
        """
        self._check_open()
        request = build_graph_request(
            images,
            model,
            layers=layers,
            target_class=target_class,
            steps=steps,
            baseline=baseline,
            reference_images=reference_images,
            alpha=alpha,
            permutations=permutations,
            min_probability_change=min_probability_change,
            nodes_per_layer=nodes_per_layer,
            max_edges=max_edges,
            min_share=min_share,
            bootstrap=bootstrap,
            seed=seed,
            repair_property=repair_property,
            repair_max_share=repair_max_share,
            model_version=model_version,
            model_output=model_output,
            request_id=request_id,
            preprocessing=preprocessing,
            class_labels=class_labels,
        )
        logger.debug(
            "BuildGraph %s: model %s, %d images, layers %s",
            self.target,
            model,
            len(request.images),
            list(layers),
        )
        call = self._graph.BuildGraph(request, **self._call_options(timeout, metadata))
        return self._collect(call, GraphCollector(request_id, on_progress, on_item))

    def visualize(
        self,
        model: str,
        *,
        class_index: int | None = None,
        layer: str = "",
        channel: int | None = None,
        bank_id: str = "",
        concept: int | None = None,
        steps: int = 0,
        crops: int = 0,
        noise: float | None = None,
        box_start: float | None = None,
        box_end: float | None = None,
        learning_rate: float | None = None,
        placement: str = "",
        seed: int = 0,
        spectrum_images: Sequence[ImageLike] = (),
        size_px: int = 0,
        model_version: str = "",
        request_id: str = "",
        preprocessing: Preprocessing | None = None,
        class_labels: Sequence[str] = (),
        on_progress: Callable[[VisualizeProgress], None] | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> VisualizationT:
        """A MACO feature visualisation (NeurIPS 2023) of ``model`` (an open model with the
        gradients capability): the picture that maximises one objective, ``class_index`` (a
        class's logit), ``layer`` and ``channel`` (a hidden channel's mean activation) or
        ``bank_id`` and ``concept`` (a CRAFT concept of a bank ``fit_concepts`` stored). Only
        the phase of the picture's Fourier transform is optimised (its magnitude is the mean
        spectrum of ``spectrum_images``, else a natural-image 1/f spectrum), over ``steps``
        steps of ``crops`` random crops each (box side from ``box_start`` to ``box_end``,
        ``noise``; ``placement`` "uniform" (default) or the paper's "centred"), with Nadam
        (``learning_rate``); the same ``seed`` gives the same picture.
        0 and None: the server's defaults (the paper's: 256 steps, 32 crops, noise 0.08, box
        0.5 -> 0.05). ``size_px``: the picture's side (0: the model input's). ``on_progress``
        gets ``VisualizeProgress`` every few steps. Returns one ``Visualization``
        (``AsyncClient``: an awaitable of it); a black-box model is refused
        (``PropscopeError`` FAILED_PRECONDITION naming the gradients capability).
        """
        self._check_open()
        request = build_visualize_request(
            model,
            class_index=class_index,
            layer=layer,
            channel=channel,
            bank_id=bank_id,
            concept=concept,
            steps=steps,
            crops=crops,
            noise=noise,
            box_start=box_start,
            box_end=box_end,
            learning_rate=learning_rate,
            placement=placement,
            seed=seed,
            spectrum_images=spectrum_images,
            size_px=size_px,
            model_version=model_version,
            request_id=request_id,
            preprocessing=preprocessing,
            class_labels=class_labels,
        )
        logger.debug(
            "Visualize %s: model %s, %s", self.target, model, request.WhichOneof("objective")
        )
        call = self._visualization.Visualize(request, **self._call_options(timeout, metadata))
        return self._collect(call, VisualizationCollector(request_id, on_progress))

    def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> ModelsT:
        """The classifiers and editors the gateway's Triton server serves (``ModelInfo``s)."""
        self._check_open()
        return self._unary(
            self._stub.ListModels,
            build_list_models_request(),
            self._call_options(timeout, metadata),
            _models,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    # How a channel is opened and a started call read: what Client and AsyncClient define.

    def _open_channel(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> Any:
        raise NotImplementedError

    def _explain_stream(self, call: Any) -> ExplainT:
        raise NotImplementedError

    def _collect(self, call: Any, collector: Collector) -> Any:
        raise NotImplementedError

    def _unary(
        self, method: Any, request: Any, options: dict[str, Any], convert: Callable[[Any], Any]
    ) -> Any:
        raise NotImplementedError

    def _call_options(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        return call_options(
            default_timeout=self._timeout,
            default_metadata=self._metadata,
            timeout=timeout,
            metadata=metadata,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the client is closed")


class ExplainStream(Iterator[Event]):
    """The events of a started Explain call, read as they come, or all at once by ``result()``.
    Leaving it early (``break``, ``close()``, garbage collection) cancels the call."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._events = _events(call)
        self._collector = ExplainCollector()
        self._closed = False

    def __next__(self) -> Event:
        try:
            event = next(self._events)
        except PropscopeError as error:
            self._collector.fail(error)
            raise
        self._collector.add(event)
        return event

    def result(self) -> ExplainResult:
        """Reads the stream to its end into one result (events already read count too);
        ``PropscopeError`` when the call fails, also when it failed while iterated."""
        if self._closed:
            raise ValueError("the stream was closed before its end")
        for _ in self:
            pass
        return self._collector.result()

    def close(self) -> None:
        """Cancels the call if it is still running (also before the first event is read); a
        thread reading the stream meanwhile gets ``PropscopeError`` CANCELLED."""
        self._closed = True
        self._call.cancel()
        with suppress(ValueError):  # "generator already executing": the cancel ends that read
            self._events.close()


class Client(
    ClientBase[ExplainStream, Attribution, Evaluation, list[ModelInfo], GraphResult, Visualization],
    ConceptCalls[ConceptBank, ConceptMaps],
    ConsistencyCalls[ConsistencyResult],
    InteractionCalls[InteractionsResult, InteractionDesign],
):
    """A blocking connection to a propscope gateway (arguments and calls: ``ClientBase``); use
    as a context manager or call ``close()``.

    >>> with Client("localhost:50051") as client:
    ...     found = client.explain("cat.png", "resnet50", {"hue": "procedural:operation=hue"})
    ...     print(found.result()["hue"].p_value)
    """

    def close(self) -> None:
        """Closes the channel, cancelling calls in flight; closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _open_channel(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def _explain_stream(self, call: Any) -> ExplainStream:
        return ExplainStream(call)

    def _collect(self, call: Any, collector: Collector) -> Any:
        for message in _messages(call):
            collector.add(message)
        return collector.result()

    def _unary(
        self, method: Any, request: Any, options: dict[str, Any], convert: Callable[[Any], Any]
    ) -> Any:
        try:
            response = method(request, **options)
        except grpc.RpcError as error:
            raise PropscopeError.from_rpc_error(error) from error
        return convert(response)


def known_event(message: explain_pb2.ExplainEvent) -> Event | None:
    """The typed event of a message, or None for an event kind this SDK does not know (one added
    to the contract after it was built): skipped, not an error."""
    try:
        return event_from_proto(message)
    except ValueError:
        logger.debug("skipping an event this SDK does not know: %s", message)
        return None


def _models(response: explain_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo.from_proto(model) for model in response.models]


def _messages(call: Any) -> Iterator[Any]:
    """The messages of a started stream; ``PropscopeError`` when it fails, cancelled when
    left early (an exception in a progress callback included)."""
    try:
        yield from call
    except grpc.RpcError as error:
        raise PropscopeError.from_rpc_error(error) from error
    finally:
        call.cancel()


def _events(call: Any) -> Iterator[Event]:
    """The typed events of a started Explain call; cancels the call when closed early."""
    for message in _messages(call):
        event = known_event(message)
        if event is not None:
            yield event
