"""MACO feature visualisation in the SDK (``Client.visualize``): the request builder, the
stream's collector and its result, a ``Visualization`` (picture, transparency map, the
model's scores on the picture)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from propscope._errors import PropscopeError
from propscope._images import ImageLike, encode_image
from propscope._preprocessing import Preprocessing
from propscope._requests import build_model_ref
from propscope.v1 import visualization_pb2

__all__ = [
    "Visualization",
    "VisualizeProgress",
    "VisualizationCollector",
    "build_visualize_request",
]


@dataclass(frozen=True)
class VisualizeProgress:
    request_id: str
    steps_done: int
    steps_total: int
    objective: float  # the mean over the last step's crops


@dataclass(frozen=True)
class Visualization:
    """A MACO picture of one objective: ``picture`` (PIL RGB image), ``alpha`` (the
    transparency map, float [H, W] in [0, 1]: where the objective's gradient
    accumulated), the objective on the whole picture at the end and at the start, and the
    model's probabilities on the picture. ``save(path)`` writes the picture, its map and
    the picture with the map as its alpha channel."""

    request_id: str
    model: str
    model_version: str
    objective_description: str
    picture: Image.Image = field(repr=False)
    alpha: np.ndarray = field(repr=False)
    alpha_png: bytes = field(repr=False)
    picture_png: bytes = field(repr=False)
    objective: float
    start_objective: float
    class_probabilities: tuple[float, ...]
    predicted_class: int
    steps: int
    crops: int
    noise: float
    box_start: float
    box_end: float
    learning_rate: float
    placement: str
    size_px: int
    spectrum_source: str
    passes: int
    total_ms: float
    warnings: tuple[str, ...]

    def probability(self, class_index: int) -> float:
        return self.class_probabilities[class_index]

    def transparent_picture(self) -> Image.Image:
        """The picture with the transparency map as its alpha channel (MACO's figures)."""
        rgba = self.picture.convert("RGBA")
        rgba.putalpha(Image.open(io.BytesIO(self.alpha_png)).convert("L"))
        return rgba

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Writes ``path`` (the picture, PNG), ``<stem>.alpha.png`` (the map) and
        ``<stem>.rgba.png`` (the picture with the map as alpha) -> the paths written."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        written = [
            target,
            target.with_name(f"{target.stem}.alpha.png"),
            target.with_name(f"{target.stem}.rgba.png"),
        ]
        written[0].write_bytes(self.picture_png)
        written[1].write_bytes(self.alpha_png)
        self.transparent_picture().save(written[2], format="PNG")
        return written

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-ready (the pictures stay out: ``save`` writes them)."""
        return {
            "request_id": self.request_id,
            "model": self.model,
            "model_version": self.model_version,
            "objective_description": self.objective_description,
            "objective": self.objective,
            "start_objective": self.start_objective,
            "class_probabilities": list(self.class_probabilities),
            "predicted_class": self.predicted_class,
            "steps": self.steps,
            "crops": self.crops,
            "noise": self.noise,
            "box_start": self.box_start,
            "box_end": self.box_end,
            "learning_rate": self.learning_rate,
            "placement": self.placement,
            "size_px": self.size_px,
            "spectrum_source": self.spectrum_source,
            "passes": self.passes,
            "total_ms": self.total_ms,
            "warnings": list(self.warnings),
        }


def build_visualize_request(
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
) -> visualization_pb2.VisualizeRequest:
    """The ``VisualizeRequest`` for ``Client.visualize``'s arguments: exactly one objective
    (``class_index``; ``layer`` and ``channel``; ``bank_id`` and ``concept``)."""
    chosen = [
        name
        for name, given in (
            ("class_index", class_index is not None),
            ("layer/channel", bool(layer) or channel is not None),
            ("bank_id/concept", bool(bank_id) or concept is not None),
        )
        if given
    ]
    if len(chosen) != 1:
        raise ValueError(
            "give exactly one objective: class_index, layer and channel, or bank_id and "
            f"concept (got {', '.join(chosen) or 'none'})"
        )
    for name, value in (
        ("steps", steps),
        ("crops", crops),
        ("seed", seed),
        ("size_px", size_px),
        ("class_index", class_index or 0),
        ("channel", channel or 0),
        ("concept", concept or 0),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    request = visualization_pb2.VisualizeRequest(
        request_id=request_id,
        model=build_model_ref(
            model,
            target_class=None,
            model_version=model_version,
            preprocessing=preprocessing,
            class_labels=class_labels,
        ),
        steps=steps,
        crops=crops,
        seed=seed,
        size_px=size_px,
        placement=placement,
        spectrum_images=[encode_image(image) for image in spectrum_images],
    )
    if class_index is not None:
        request.class_index = class_index
    elif layer or channel is not None:
        if not layer or channel is None:
            raise ValueError("a channel objective needs both layer and channel")
        request.channel.CopyFrom(visualization_pb2.ChannelObjective(layer=layer, channel=channel))
    else:
        if not bank_id or concept is None:
            raise ValueError("a concept objective needs both bank_id and concept")
        request.concept.CopyFrom(
            visualization_pb2.ConceptObjective(bank_id=bank_id, concept=concept)
        )
    for name, value in (
        ("noise", noise),
        ("box_start", box_start),
        ("box_end", box_end),
        ("learning_rate", learning_rate),
    ):
        if value is not None:
            setattr(request, name, value)
    return request


class VisualizationCollector:
    """Folds a Visualize stream into one ``Visualization``; progress goes to
    ``on_progress``."""

    def __init__(
        self, request_id: str, on_progress: Callable[[VisualizeProgress], None] | None = None
    ) -> None:
        self._request_id = request_id
        self._on_progress = on_progress
        self._accepted: visualization_pb2.VisualizeAccepted | None = None
        self._done: visualization_pb2.VisualizeDone | None = None

    def add(self, message: visualization_pb2.VisualizeEvent) -> None:
        self._request_id = message.request_id or self._request_id
        kind = message.WhichOneof("event")
        if kind == "accepted":
            self._accepted = message.accepted
        elif kind == "progress" and self._on_progress is not None:
            p = message.progress
            self._on_progress(
                VisualizeProgress(self._request_id, p.steps_done, p.steps_total, p.objective)
            )
        elif kind == "done":
            self._done = message.done

    def result(self) -> Visualization:
        accepted, done = self._accepted, self._done
        if accepted is None or done is None:
            raise PropscopeError(
                grpc.StatusCode.INTERNAL,
                "the Visualize stream ended without the plan and its end (VisualizeAccepted "
                "and VisualizeDone; a server fault)",
            )
        alpha = np.asarray(done.alpha, dtype=np.float32).reshape(done.height_px, done.width_px)
        picture = Image.open(io.BytesIO(done.picture_png))
        picture.load()
        return Visualization(
            request_id=self._request_id,
            model=accepted.model,
            model_version=accepted.model_version,
            objective_description=accepted.objective,
            picture=picture.convert("RGB"),
            alpha=alpha,
            alpha_png=done.alpha_png,
            picture_png=done.picture_png,
            objective=done.objective,
            start_objective=done.start_objective,
            class_probabilities=tuple(done.class_probabilities),
            predicted_class=done.predicted_class,
            steps=accepted.steps,
            crops=accepted.crops,
            noise=accepted.noise,
            box_start=accepted.box_start,
            box_end=accepted.box_end,
            learning_rate=accepted.learning_rate,
            placement=accepted.placement,
            size_px=accepted.size_px,
            spectrum_source=accepted.spectrum_source,
            passes=done.passes,
            total_ms=done.total_ms,
            # The plan's warnings come in both events: each once.
            warnings=tuple(dict.fromkeys((*accepted.warnings, *done.warnings))),
        )
