"""Request building and per-call options shared by the sync client (and a later aio client).

Nothing here touches a channel: these functions turn the caller's arguments into protobuf
messages and gRPC call keywords, and validate what the server could only report later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from propscope._images import ImageLike, encode_image
from propscope._preprocessing import PathMode, Preprocessing, path_mode_to_proto
from propscope._properties import Property, parse_property
from propscope.v1 import explain_pb2

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "Metadata",
    "build_explain_request",
    "build_list_models_request",
    "call_options",
    "channel_options",
    "normalize_properties",
]

Metadata = Sequence[tuple[str, str]]

# Results with return_path_images hold many PNGs: allow large responses. Requests are bounded by
# the server's own max_receive_message_length.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
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


def normalize_properties(properties: Property | str | Iterable[Property | str]) -> list[Property]:
    """``Property`` objects from objects or ``parse_property`` strings; at least one, unique
    names."""
    if isinstance(properties, Property | str):
        properties = [properties]
    result: list[Property] = []
    for item in properties:
        if isinstance(item, Property):
            result.append(item)
        elif isinstance(item, str):
            result.append(parse_property(item))
        else:
            raise TypeError(f"properties must be Property or str, not {type(item).__name__}")
    if not result:
        raise ValueError("at least one property is required")
    seen: set[str] = set()
    for prop in result:
        if prop.name in seen:
            raise ValueError(f"property name {prop.name!r} is given twice")
        seen.add(prop.name)
    return result


def build_explain_request(
    image: ImageLike,
    model: str,
    properties: Property | str | Iterable[Property | str],
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
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if min_probability_change is not None and not 0.0 <= min_probability_change <= 1.0:
        raise ValueError(f"min_probability_change must be in [0, 1], got {min_probability_change}")
    if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
        raise TypeError(
            f"preprocessing must be a Preprocessing, not {type(preprocessing).__name__}"
        )
    if isinstance(class_labels, str) or not all(isinstance(c, str) for c in class_labels):
        raise TypeError("class_labels must be a sequence of str (one name per class index)")
    if path_mode == "fixed" and max_steps:
        raise ValueError("max_steps only applies to adaptive paths, not to path_mode 'fixed'")
    if max_steps and steps and max_steps < steps:
        raise ValueError(f"max_steps ({max_steps}) must be at least steps ({steps})")
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
    )


def build_list_models_request() -> explain_pb2.ListModelsRequest:
    return explain_pb2.ListModelsRequest()
