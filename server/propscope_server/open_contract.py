"""The open (white-box) classifier contract's names, in one place for both sides: the
models inside Triton (triton_models/classifiers/open_model.py) and the gateway that reads
their configs (backends/triton.py) and drives them (methods/causal_graph.py). Standard
library only: Triton's python backend and the gateway both import it, neither needs the
other's dependencies (docs/own-models.md, "Open models")."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LAYERS_PARAMETER = "propscope.layers"
CHANNEL_MEANS_PARAMETER = "propscope.channel_means"
# What a model exposes beyond forward passes, comma-separated:
# "activations,interventions,gradients,bounds".
CAPABILITIES_PARAMETER = "propscope.capabilities"
# The capabilities served by the open model (forward passes need none); `bounds` is
# bound propagation through the network (triton_models/classifiers/bounds.py).
OPEN_CAPABILITIES = ("activations", "interventions", "gradients", "bounds")

# name -> (Triton datatype, dims without the batch dimension)
OPTIONAL_INPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "INTERVENE_LAYER": ("TYPE_INT32", (1,)),
    "INTERVENE_CHANNEL": ("TYPE_INT32", (1,)),
    "INTERVENE_STRENGTH": ("TYPE_FP32", (1,)),
    "INTERVENE_BASELINE": ("TYPE_FP32", (1,)),
    "PATCH_LAYER": ("TYPE_INT32", (1,)),
    "PATCH_CHANNEL": ("TYPE_INT32", (1,)),
    "PATCH_VALUE": ("TYPE_FP32", (-1,)),
    "ACTIVATION_LAYER": ("TYPE_INT32", (1,)),
    "GRADIENT_CLASS": ("TYPE_INT32", (1,)),
    "REPLACE_LAYER": ("TYPE_INT32", (1,)),
    "REPLACE_ACTIVATION": ("TYPE_FP32", (-1,)),
    "GRADIENT_LAYER": ("TYPE_INT32", (1,)),
    "GRADIENT_DIRECTION": ("TYPE_FP32", (-1,)),
    "BOUND_RADIUS": ("TYPE_FP32", (-1,)),
    "BOUND_CLASS": ("TYPE_INT32", (1,)),
    "BOUND_METHOD": ("TYPE_INT32", (1,)),
    "BOUND_LAYER": ("TYPE_INT32", (1,)),
    "BOUND_SAMPLES": ("TYPE_INT32", (1,)),
    "BOUND_SEED": ("TYPE_INT32", (1,)),
}
# Inputs sent together (all of a group or none).
INTERVENE = ("INTERVENE_LAYER", "INTERVENE_CHANNEL", "INTERVENE_STRENGTH", "INTERVENE_BASELINE")
PATCH = ("PATCH_LAYER", "PATCH_CHANNEL", "PATCH_VALUE")
# A layer's whole output replaced per sample (C*H*W values, row-major C, H, W).
REPLACE = ("REPLACE_LAYER", "REPLACE_ACTIVATION")
# A direction in a layer's channels (C values) whose spatial mean is differentiated
# instead of the GRADIENT_CLASS output.
DIRECTION = ("GRADIENT_LAYER", "GRADIENT_DIRECTION")
# Bound propagation per sample: the l_inf radius of every image input element (in the
# input's own layout and units; 0 = held fixed), the target class y, the method
# (BOUND_METHODS), the layer (-1 = verified from the input, k >= 0 = hybrid from
# declared layer k), the points sampled in the box and their seed.
BOUND = (
    "BOUND_RADIUS",
    "BOUND_CLASS",
    "BOUND_METHOD",
    "BOUND_LAYER",
    "BOUND_SAMPLES",
    "BOUND_SEED",
)
# BOUND_METHOD's values.
BOUND_IBP = 0
BOUND_CROWN = 1
BOUND_METHODS = {BOUND_IBP: "ibp", BOUND_CROWN: "crown"}
BOUND_CODES = {name: code for code, name in BOUND_METHODS.items()}
# BOUND_LAYER's value for bounds verified from the input (k >= 0: hybrid from layer k).
BOUND_FROM_INPUT = -1
# BOUND_SAMPLES' range; >= 1 when BOUND_LAYER >= 0 (the hybrid's empirical box).
MAX_BOUND_SAMPLES = 65536
# A row with BOUND_SAMPLES >= 1 also runs a PGD attack on its box (SAMPLED_MARGIN a
# stronger lower bound): its starts (the centre, a random vertex) and steps, and the
# forward passes it adds to the row's samples (every start's iterates, the last too).
BOUND_ATTACK_STARTS = 2
BOUND_ATTACK_STEPS = 20
BOUND_ATTACK_PASSES = BOUND_ATTACK_STARTS * (BOUND_ATTACK_STEPS + 1)
# What a refusal of bound propagation starts with (the gateway maps it to
# FAILED_PRECONDITION on the method).
BOUND_UNSUPPORTED = "bound propagation does not support "
# Optional outputs, after the class scores; INPUT_GRADIENT's dims are the image input's.
# Never class scores: the gateway refuses one named as the classifier's output.
OPTIONAL_OUTPUTS = (
    "CHANNEL_MEANS",
    "ACTIVATIONS",
    "INPUT_GRADIENT",
    "CHANNEL_GRADIENTS",
    "GRAD_X_ACTIVATION",
    "BOUND_MARGIN",
    "SAMPLED_MARGIN",
)
# Per sample K values each (entry y is 0): an upper bound of f_c - f_y over the box,
# and the max of f_c - f_y over the sampled points, the attack's iterates and the centre.
BOUND_OUTPUTS = ("BOUND_MARGIN", "SAMPLED_MARGIN")
GRADIENT_OUTPUTS = ("INPUT_GRADIENT", "CHANNEL_GRADIENTS", "GRAD_X_ACTIVATION")


@dataclass(frozen=True)
class Layer:
    """A hidden layer an open model declares (propscope.layers): its module path and
    channel count. Its position in the declaration is its index."""

    name: str
    channels: int


def parse_layers(text: str | None) -> tuple[Layer, ...]:
    """`propscope.layers` (a JSON object, module path -> channel count, in network
    order) -> layers; empty when the parameter is absent. ValueError naming the
    parameter and the expected format."""
    if not text or not text.strip():
        return ()
    try:
        declared = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"parameter {LAYERS_PARAMETER} is not JSON: {error}") from None
    if not isinstance(declared, dict) or not declared:
        raise ValueError(
            f"parameter {LAYERS_PARAMETER} must be a non-empty JSON object of module path -> "
            'channel count, e.g. {"features.0": 16}'
        )
    layers = []
    for name, channels in declared.items():
        if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
            raise ValueError(
                f"parameter {LAYERS_PARAMETER}: layer {name!r} has {channels!r} channels; "
                "give a positive integer"
            )
        layers.append(Layer(name, channels))
    return tuple(layers)


def declared_capabilities(text: str | None) -> frozenset[str]:
    """The capability names of a `propscope.capabilities` value, lower-case."""
    return frozenset(filter(None, (part.strip().lower() for part in (text or "").split(","))))


def declared_open(parameters: Mapping[str, Any]) -> bool:
    """Whether a Triton JSON config's parameters declare an open model: layers, or a
    capability that needs the open model's hooks."""

    def value(key: str) -> str:
        return str(parameters.get(key, {}).get("string_value", "") or "")

    capabilities = declared_capabilities(value(CAPABILITIES_PARAMETER))
    return bool(value(LAYERS_PARAMETER)) or bool(capabilities & set(OPEN_CAPABILITIES))
