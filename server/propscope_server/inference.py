"""The inference protocol the core works against: model discovery, named inputs to
named outputs, and the editor contract. `backends/triton.py` implements it over
Triton; unit tests implement it with fakes. Nothing here imports a transport."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from propscope_server.config import PreprocessingConfig
from propscope_server.editor_contract import EditorSchema, ReportProgress, unreported
from propscope_server.open_contract import Layer as Layer  # ModelDescription.layers


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    # Declared `optional: true` in the config: a request may leave it out (an open
    # model's intervention inputs); the classifier's image is its one required input.
    optional: bool = False


@dataclass(frozen=True)
class ModelDescription:
    name: str
    version: str
    versions: tuple[str, ...]
    role: str  # "editor" when its config says so; every other model is a "classifier"
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int
    description: str = ""
    # Answers a request with a stream of responses (an editor's progress, then its path).
    decoupled: bool = False
    parameters: Mapping[str, str] = field(default_factory=dict)
    editor_schema: EditorSchema | None = None
    # What the model's owners declare in its config.pbtxt (propscope.mean, ...).
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    class_labels: tuple[str, ...] = ()
    # An open model's declared layers, in network order (propscope.layers), and the
    # channels' reference means per layer (propscope.channel_means; may be empty).
    layers: tuple[Layer, ...] = ()
    channel_means: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # Why the declarations above could not be read, naming the parameter; "" when fine.
    config_problem: str = ""

    @property
    def required_inputs(self) -> tuple[Tensor, ...]:
        """The inputs every request must carry: a classifier's image is its only one (an
        open model's intervention inputs are optional)."""
        return tuple(t for t in self.inputs if not t.optional)


@dataclass(frozen=True)
class RepositoryEntry:
    name: str
    version: str
    state: str
    reason: str = ""
    # The gateway loads it on its first request (setting load_on_demand).
    loads_on_demand: bool = False


class Inference(Protocol):
    """What every explanation method may ask of the model server. Every call is
    bounded by `deadline` (a time.monotonic() value, None: the backend's default) and
    raises domain errors (errors.py)."""

    async def describe(
        self, name: str, version: str = "", deadline: float | None = None
    ) -> ModelDescription: ...

    async def require_ready(self, model: ModelDescription, deadline: float | None) -> None: ...

    async def infer(
        self,
        model: ModelDescription,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float | None,
    ) -> dict[str, np.ndarray]:
        """Batched inputs by name (first dimension = batch, any size) -> the named
        outputs, batch first."""
        ...

    async def edit(
        self,
        editor: ModelDescription,
        image: np.ndarray,
        strengths: np.ndarray,
        parameters: str,
        seeds: list[int],
        deadline: float | None,
        progress: ReportProgress = unreported,
    ) -> np.ndarray:
        """The editor contract (editor_contract.py): paths [S, N, H, W, 3] uint8. A
        decoupled editor's progress reports reach `progress` as they come."""
        ...
