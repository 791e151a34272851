"""Request building and per-call options shared by the sync and the aio client.

Nothing here touches a channel: these functions turn the caller's arguments into protobuf
messages and gRPC call keywords, and validate what the server could only report later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from propscope._attribution import (
    METRICS,
    baseline_to_proto,
    bound_to_proto,
    estimator_to_proto,
    map_to_proto,
    perturbation_to_proto,
    target_score_to_proto,
)
from propscope._graph import baseline_to_proto as graph_baseline_to_proto
from propscope._images import ImageLike, encode_image
from propscope._preprocessing import PathMode, Preprocessing, path_mode_to_proto
from propscope._properties import Property, parse_property
from propscope.v1 import attribution_pb2, explain_pb2, graph_pb2

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "Metadata",
    "Properties",
    "build_attribute_request",
    "build_evaluate_request",
    "build_explain_request",
    "build_graph_request",
    "build_model_ref",
    "build_list_models_request",
    "call_options",
    "channel_options",
    "normalize_properties",
]

Metadata = Sequence[tuple[str, str]]
# Property objects or parse_property strings, one or many, or a mapping of names to what follows
# "NAME=" in that syntax (or to Property objects of that name).
Properties = Property | str | Iterable[Property | str] | Mapping[str, Property | str]

# Results with return_path_images hold many PNGs: allow large responses. Requests are bounded by
# the server's own max_receive_message_length.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    # Each Client on a connection of its own: the gateway admits max_streams_per_connection
    # streams per connection, and gRPC would otherwise share one among a process's Clients.
    ("grpc.use_local_subchannel_pool", 1),
)


def channel_options(options: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The default channel options overridden by ``options`` (same keys win)."""
    merged = dict(DEFAULT_CHANNEL_OPTIONS)
    merged.update(options)
    return list(merged.items())


def call_options(
    *,
    default_timeout: float | None,
    default_metadata: Metadata,
    timeout: float | None,
    metadata: Metadata | None,
) -> dict[str, Any]:
    """``timeout`` and ``metadata`` keywords for a stub call: the call's timeout replaces the
    client's, the call's metadata is appended to the client's."""
    merged = [*default_metadata, *(metadata or ())]
    return {
        "timeout": timeout if timeout is not None else default_timeout,
        "metadata": merged or None,
    }


def normalize_properties(properties: Properties) -> list[Property]:
    """``Property`` objects from ``properties`` (``Properties``); at least one, unique names."""
    if isinstance(properties, Mapping):
        result = [_named_property(name, spec) for name, spec in properties.items()]
    else:
        if isinstance(properties, Property | str):
            properties = [properties]
        result = []
        for item in properties:
            found = property_of(item)
            if found is None:
                raise TypeError(
                    "properties must be Property objects, NAME=SPEC strings or a mapping "
                    f"{{NAME: SPEC}}, not {type(item).__name__}"
                )
            result.append(found)
    if not result:
        raise ValueError("at least one property is required")
    seen: set[str] = set()
    for prop in result:
        if prop.name in seen:
            raise ValueError(f"property name {prop.name!r} is given twice")
        seen.add(prop.name)
    return result


def property_of(item: Any) -> Property | None:
    """An item of a properties sequence: a ``Property`` as it is, a NAME=SPEC text parsed;
    None for anything else (the caller's error says what it accepts)."""
    if isinstance(item, Property):
        return item
    if isinstance(item, str):
        return parse_property(item)
    return None


def named_property(name: str, spec: Any) -> Property | None:
    """A properties mapping's entry: NAME to what follows ``NAME=`` in the property syntax, or
    to a ``Property`` of that name; None for anything else (the caller's error says what it
    accepts)."""
    if isinstance(spec, Property):
        if spec.name != name:
            raise ValueError(
                f"properties[{name!r}] is a Property named {spec.name!r}: the key and the name "
                "must agree"
            )
        return spec
    if isinstance(spec, str):
        return parse_property(f"{name}={spec}")
    return None


def _named_property(name: Any, spec: Any) -> Property:
    if not isinstance(name, str):
        raise TypeError(f"property names (the mapping's keys) must be str, got {name!r}")
    found = named_property(name, spec)
    if found is None:
        raise TypeError(
            f"properties[{name!r}] must be a str (EDITOR[:key=value,...], without the name) or "
            f"a Property, not {type(spec).__name__}"
        )
    return found


def build_explain_request(
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
) -> explain_pb2.ExplainRequest:
    """The ``ExplainRequest`` for ``Client.explain``'s arguments: 0 means the server default,
    except for ``min_probability_change``, where None does (0 makes relevant = significant);
    ``preprocessing`` None, ``class_labels`` empty and ``path_mode`` None leave them to the
    model and the server."""
    if not model:
        raise ValueError("model must be a non-empty Triton model name")
    property_messages = [prop.to_proto() for prop in normalize_properties(properties)]
    for name, value in (
        ("steps", steps),
        ("samples", samples),
        ("seed", seed),
        ("permutations", permutations),
        ("max_steps", max_steps),
        ("path_image_max_side_px", path_image_max_side_px),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if min_probability_change is not None and not 0.0 <= min_probability_change <= 1.0:
        raise ValueError(f"min_probability_change must be in [0, 1], got {min_probability_change}")
    if path_mode == "fixed" and max_steps:
        raise ValueError("max_steps only applies to adaptive paths, not to path_mode 'fixed'")
    if max_steps and steps and max_steps < steps:
        raise ValueError(f"max_steps ({max_steps}) must be at least steps ({steps})")
    model_ref = build_model_ref(
        model,
        target_class=target_class,
        model_version=model_version,
        model_output=model_output,
        preprocessing=preprocessing,
        class_labels=class_labels,
    )
    return explain_pb2.ExplainRequest(
        request_id=request_id,
        image=encode_image(image),
        model=model_ref,
        properties=property_messages,
        steps=steps,
        samples=samples,
        seed=seed,
        permutations=permutations,
        alpha=alpha,
        min_probability_change=min_probability_change,
        return_path_images=return_path_images,
        path_mode=path_mode_to_proto(path_mode),
        max_steps=max_steps,
        path_image_max_side_px=path_image_max_side_px,
    )


def build_model_ref(
    model: str,
    *,
    target_class: int | None = None,
    model_version: str = "",
    model_output: str = "",
    preprocessing: Preprocessing | None = None,
    class_labels: Sequence[str] = (),
) -> explain_pb2.ModelRef:
    """The ``ModelRef`` every RPC shares: ``target_class`` None follows the predicted class."""
    if not model:
        raise ValueError("model must be a non-empty Triton model name")
    if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
        raise TypeError(
            f"preprocessing must be a Preprocessing, not {type(preprocessing).__name__}"
        )
    if isinstance(class_labels, str) or not all(isinstance(c, str) for c in class_labels):
        raise TypeError("class_labels must be a sequence of str (one name per class index)")
    model_ref = explain_pb2.ModelRef(
        name=model,
        version=model_version,
        output=model_output,
        class_labels=list(class_labels),
        preprocessing=preprocessing.to_proto() if preprocessing is not None else None,
    )
    if target_class is None:
        model_ref.predicted_class = True
    elif target_class < 0:
        raise ValueError(f"target_class must be >= 0, got {target_class}")
    else:
        model_ref.target_class = target_class
    return model_ref


def _non_negative(**values: int | float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0: the server's default), got {value}")


def _fraction(name: str, value: float | None, *, closed_right: bool) -> None:
    """None (the server's default) or a number in (0, 1) / (0, 1]."""
    if value is None:
        return
    if not (0 < value < 1 or (closed_right and value == 1)):
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise ValueError(f"{name} must be in {interval} (None: the server's default), got {value}")


def method_options(
    method: str,
    *,
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
) -> dict[str, Any]:
    """``{"sobol": SobolOptions}``, ``{"rise": RiseOptions}`` or ``{"eva": EvaOptions}``: the
    ``method`` oneof's keyword for AttributeRequest and StabilityOptions. Options of the other
    methods must stay unset."""
    _non_negative(grid_size=grid_size, nb_design=nb_design, nb_samples=nb_samples, samples=samples)
    if method != "eva" and (epsilon is not None or bound is not None or hybrid_layer or samples):
        raise ValueError(
            "epsilon, bound, hybrid_layer and samples are EVA options; choose method eva "
            "(--method eva) or leave them out"
        )
    if method == "eva":
        if nb_design or per_channel or scrambled or estimator != "jansen":
            raise ValueError(
                "nb_design, estimator, per_channel and scrambled are Sobol options; EVA takes "
                "grid_size, epsilon, bound, hybrid_layer and samples"
            )
        if nb_samples or preservation_probability is not None:
            raise ValueError(
                "nb_samples and preservation_probability are RISE options; EVA's sampled "
                "points are samples (--samples)"
            )
        return {"eva": _eva_options(grid_size, epsilon, bound, hybrid_layer, samples)}
    if method == "sobol":
        if nb_samples or preservation_probability is not None:
            raise ValueError(
                "nb_samples (--samples) and preservation_probability are RISE options; "
                "choose method rise (--method rise) or leave them out"
            )
        if nb_design and nb_design & (nb_design - 1):
            raise ValueError(
                f"nb_design (--nb-design) must be a power of two (2..1024, e.g. 32), got "
                f"{nb_design}"
            )
        return {
            "sobol": attribution_pb2.SobolOptions(
                grid_size=grid_size,
                nb_design=nb_design,
                estimator=estimator_to_proto(estimator),
                per_channel=per_channel,
                scrambled=scrambled,
            )
        }
    if method == "rise":
        if nb_design or per_channel or scrambled or estimator != "jansen":
            raise ValueError(
                "nb_design, estimator, per_channel and scrambled are Sobol options; choose "
                "method sobol (--method sobol) or leave them out"
            )
        _fraction("preservation_probability", preservation_probability, closed_right=False)
        return {
            "rise": attribution_pb2.RiseOptions(
                grid_size=grid_size,
                nb_samples=nb_samples,
                preservation_probability=preservation_probability,
            )
        }
    raise ValueError(f"method must be sobol, rise or eva, got {method!r}")


def _eva_options(
    grid_size: int, epsilon: float | None, bound: str | None, hybrid_layer: str, samples: int
) -> attribution_pb2.EvaOptions:
    """EVA's options, checked against the ranges attribution.proto fixes."""
    if grid_size and not 2 <= grid_size <= 32:
        raise ValueError(
            f"grid_size (--grid-size) must be in 2..32 (0: the server's default, 8), got {grid_size}"
        )
    if epsilon is not None and not 0 < epsilon <= 1:  # NaN fails too
        raise ValueError(
            "epsilon (--epsilon) must be in (0, 1], a fraction of the pixel range (e.g. 8/255 = 0.0314; "
            f"None: the server's default, 8/255), got {epsilon}"
        )
    if samples > 65536:
        raise ValueError(
            f"samples (--samples) must be in 1..65536 (0: the server's default, 256), got {samples}"
        )
    if not isinstance(hybrid_layer, str):
        raise TypeError(
            f"hybrid_layer must be a declared layer's name (str, ModelInfo.layers), not "
            f"{type(hybrid_layer).__name__}"
        )
    return attribution_pb2.EvaOptions(
        grid_size=grid_size,
        epsilon=epsilon,
        bound=bound_to_proto(bound),
        hybrid_layer=hybrid_layer,
        samples=samples,
    )


def build_attribute_request(
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
) -> attribution_pb2.AttributeRequest:
    """The ``AttributeRequest`` for ``Client.attribute``'s arguments (0: the server's default)."""
    if method == "eva":
        _eva_request_checks(target_score, perturbation, baseline, blur_sigma)
    model_ref = build_model_ref(
        model,
        target_class=target_class,
        model_version=model_version,
        model_output=model_output,
        preprocessing=preprocessing,
        class_labels=class_labels,
    )
    _non_negative(seed=seed)
    options = method_options(
        method,
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
    )
    return attribution_pb2.AttributeRequest(
        request_id=request_id,
        image=encode_image(image),
        model=model_ref,
        target_score=target_score_to_proto(target_score),
        perturbation=perturbation_to_proto(perturbation, baseline, blur_sigma),
        seed=seed,
        **options,
    )


def _eva_request_checks(
    target_score: str, perturbation: str, baseline: str, blur_sigma: float
) -> None:
    """EVA bounds logit margins over an epsilon ball: it has no other target score and masks
    no pixels, so a perturbation setting would be silently ignored."""
    if target_score not in ("auto", "logit"):
        raise ValueError(
            f"target_score (--target-score) must be auto or logit for EVA (it bounds logit margins), got "
            f"{target_score!r}"
        )
    if (perturbation, baseline, blur_sigma) != ("inpainting", "input_zero", 0.0):
        raise ValueError(
            "perturbation, baseline and blur_sigma set how Sobol and RISE mask pixels; EVA "
            "perturbs every pixel within epsilon: leave them out"
        )


def build_evaluate_request(
    image: ImageLike,
    model: str,
    explanation: Any = None,
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
) -> attribution_pb2.EvaluateAttributionRequest:
    """The ``EvaluateAttributionRequest`` for ``Client.evaluate_attribution``'s arguments.

    ``explanation``: a 2-D array (or anything with a 2-D ``map``, e.g. an ``Attribution``),
    required unless ``metrics`` is only stability. ``steps``, ``max_percentage_perturbed`` and
    ``baseline`` set Deletion and Insertion (``baseline`` MuFidelity's too); ``grid_size``,
    ``subset_percent`` and ``nb_samples`` MuFidelity; ``radius``, ``stability_samples``,
    ``stability_method`` with its ``stability_options`` (``method_options`` keywords) and the
    ``perturbation`` keywords set stability's recomputed maps.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    chosen = list(dict.fromkeys(metrics))
    unknown = [name for name in chosen if name not in METRICS]
    if unknown or not chosen:
        raise ValueError(f"metrics must be some of {', '.join(METRICS)}, got {list(metrics)}")
    model_ref = build_model_ref(
        model,
        target_class=target_class,
        model_version=model_version,
        model_output=model_output,
        preprocessing=preprocessing,
        class_labels=class_labels,
    )
    _non_negative(
        steps=steps,
        grid_size=grid_size,
        nb_samples=nb_samples,
        stability_samples=stability_samples,
        seed=seed,
    )
    _fraction("max_percentage_perturbed", max_percentage_perturbed, closed_right=True)
    _fraction("subset_percent", subset_percent, closed_right=False)
    _fraction("radius", radius, closed_right=True)
    if explanation is not None and hasattr(explanation, "map"):
        explanation = explanation.map
    if explanation is None and chosen != ["stability"]:
        raise ValueError(f"explanation (the map to score) is required for {', '.join(chosen)}")
    request = attribution_pb2.EvaluateAttributionRequest(
        request_id=request_id,
        image=encode_image(image),
        model=model_ref,
        explanation=map_to_proto(explanation) if explanation is not None else None,
        target_score=target_score_to_proto(target_score),
        seed=seed,
    )
    curve = attribution_pb2.DeletionOptions(
        steps=steps,
        max_percentage_perturbed=max_percentage_perturbed,
        baseline=baseline_to_proto(baseline),
    )
    if "deletion" in chosen:
        request.deletion.CopyFrom(curve)
    if "insertion" in chosen:
        request.insertion.CopyFrom(curve)
    if "mu_fidelity" in chosen:
        request.mu_fidelity.CopyFrom(
            attribution_pb2.MuFidelityOptions(
                grid_size=grid_size,
                subset_percent=subset_percent,
                nb_samples=nb_samples,
                baseline=baseline_to_proto(baseline),
            )
        )
    if "stability" in chosen:
        request.stability.CopyFrom(
            attribution_pb2.StabilityOptions(
                radius=radius,
                nb_samples=stability_samples,
                perturbation=perturbation_to_proto(perturbation, perturbation_baseline, blur_sigma),
                **method_options(stability_method, **dict(stability_options or {})),
            )
        )
    return request


def build_list_models_request() -> explain_pb2.ListModelsRequest:
    return explain_pb2.ListModelsRequest()


def build_graph_request(
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
) -> graph_pb2.BuildGraphRequest:
    """The ``BuildGraphRequest`` for ``Client.graph``'s arguments (0 and None: the server's
    default). ``images``: one image or a sequence of them."""
    model_ref = build_model_ref(
        model,
        target_class=target_class,
        model_version=model_version,
        model_output=model_output,
        preprocessing=preprocessing,
        class_labels=class_labels,
    )
    _non_negative(
        steps=steps,
        permutations=permutations,
        nodes_per_layer=nodes_per_layer,
        max_edges=max_edges,
        bootstrap=bootstrap,
        seed=seed,
    )
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) (0: the server's default), got {alpha}")
    if min_probability_change is not None and not 0 <= min_probability_change <= 1:
        raise ValueError(
            f"min_probability_change must be in [0, 1] (None: the server's default), "
            f"got {min_probability_change}"
        )
    _fraction("min_share", min_share, closed_right=True)
    if repair_max_share is not None and not 0 < repair_max_share <= 0.5:
        raise ValueError(
            f"repair_max_share must be in (0, 0.5] (None: the server's default), "
            f"got {repair_max_share}"
        )
    if isinstance(layers, str):
        raise TypeError("layers must be a sequence of layer names, e.g. ['features.1']")
    several = isinstance(images, Sequence) and not isinstance(images, str | bytes)
    encoded = [encode_image(image) for image in (images if several else [images])]  # type: ignore[union-attr]
    if not encoded:
        raise ValueError("at least one image is required")
    repair = None
    if repair_property is not None:
        repair = (
            parse_property(repair_property) if isinstance(repair_property, str) else repair_property
        ).to_proto()
    return graph_pb2.BuildGraphRequest(
        request_id=request_id,
        images=encoded,
        model=model_ref,
        layers=list(layers),
        steps=steps,
        baseline=graph_baseline_to_proto(baseline),
        reference_images=[encode_image(image) for image in reference_images],
        alpha=alpha,
        permutations=permutations,
        min_probability_change=min_probability_change,
        nodes_per_layer=nodes_per_layer,
        max_edges=max_edges,
        min_share=min_share,
        bootstrap=bootstrap,
        seed=seed,
        repair_property=repair,
        repair_max_share=repair_max_share,
    )
