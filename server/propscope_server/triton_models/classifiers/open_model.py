"""The open (white-box) classifier contract, in pure torch: one implementation behind
both Triton adapters (triton_model.py for the synthetic CNNs, own_triton_model.py for a
team's state_dict + module).

A config declares its layers (`propscope.layers`, module path -> channels, in network
order) and the optional tensors of docs/own-models.md ("Open models"). `OpenModel`
checks the layers by one dry forward pass, then serves forward passes that may
replace a layer's whole output, intervene on a channel, patch a channel's map, and return
channel means, one layer's activations and gradients (of a class output or of a direction
in a layer's channels), and bounds of the logit margins over a box around the input
(bounds.py), per sample. Without optional inputs and outputs (and no
permanent ablation) the forward pass is the plain module's, bit for bit. Triton's
tensors come in and go out as numpy; nothing here imports Triton.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from propscope_server.open_contract import (
    BOUND,
    BOUND_METHODS,
    BOUND_OUTPUTS,
    BOUND_UNSUPPORTED,
    CAPABILITIES_PARAMETER,
    DIRECTION,
    GRADIENT_OUTPUTS,
    INTERVENE,
    LAYERS_PARAMETER,
    MAX_BOUND_SAMPLES,
    OPTIONAL_INPUTS,
    OPTIONAL_OUTPUTS,
    PATCH,
    REPLACE,
    Layer,
    declared_capabilities,
    parse_layers,
)
from propscope_server.triton_models.classifiers.bounds import BoundedNetwork

NEED_LAYERS = {"activations", "interventions"}
ABLATION_FILE = "propscope_ablation.json"
# Input sizes other than the load-time dry input's whose bound traces are kept.
BOUNDED_SIZES_KEPT = 4
# Optional outputs that need an optional input.
NEEDS_INPUT = {
    "ACTIVATIONS": "ACTIVATION_LAYER",
    **dict.fromkeys(GRADIENT_OUTPUTS, "GRADIENT_CLASS"),
    **dict.fromkeys(BOUND_OUTPUTS, "BOUND_RADIUS"),
}
# The per-sample radius [B, n] -> the box (lower, upper) in the network's input space;
# the adapters give one where their input needs preprocessing.
BoxFunction = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Ablation:
    """One channel set to a constant in every forward pass of a model version."""

    layer: str
    channel: int
    value: float


def declared_layers(parameters: Mapping[str, Any]) -> tuple[Layer, ...]:
    """The layers a Triton JSON config's parameters declare; refused when a declared
    capability needs layers (activations, interventions) and none are named."""
    text = parameters.get(LAYERS_PARAMETER, {}).get("string_value")
    layers = parse_layers(text)
    capabilities = parameters.get(CAPABILITIES_PARAMETER, {}).get("string_value")
    needing = sorted(declared_capabilities(capabilities) & NEED_LAYERS)
    if needing and not layers:
        raise ValueError(
            f"{CAPABILITIES_PARAMETER} declares {', '.join(needing)} but no {LAYERS_PARAMETER}; "
            'declare the layers, e.g. {"features.0": 16}'
        )
    return layers


def check_declared_tensors(
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    layers: Sequence[Layer],
    image_dims: Sequence[int],
) -> None:
    """The config's tensors after the image input and the scores output must be those
    of the contract, with its datatypes and dims (ΣC of `layers` for the per-channel
    outputs, the image input's dims for INPUT_GRADIENT); optional inputs marked optional."""
    total = sum(layer.channels for layer in layers)
    for entry in inputs:
        name = entry.get("name")
        if name not in OPTIONAL_INPUTS:
            raise ValueError(
                f"input {name!r} is not an open-model input; declare only the image input "
                f"first, then any of {', '.join(OPTIONAL_INPUTS)}"
            )
        datatype, dims = OPTIONAL_INPUTS[name]
        _check_entry(entry, datatype, dims)
        if not entry.get("optional", False):
            raise ValueError(f"input {name!r} must be declared optional: true")
    for entry in outputs:
        name = entry.get("name")
        if name not in OPTIONAL_OUTPUTS:
            raise ValueError(
                f"output {name!r} is not an open-model output; declare the scores output "
                f"first, then any of {', '.join(OPTIONAL_OUTPUTS)}"
            )
        if name == "INPUT_GRADIENT":
            _check_entry(entry, "TYPE_FP32", tuple(int(d) for d in image_dims))
        elif name in ("ACTIVATIONS", *BOUND_OUTPUTS):
            _check_entry(entry, "TYPE_FP32", (-1,))
        else:
            _check_entry(entry, "TYPE_FP32", (total,), f"(the channels of {LAYERS_PARAMETER})")
    uses_layers = [
        str(e.get("name"))
        for e in (*inputs, *outputs)
        if e.get("name") not in ("GRADIENT_CLASS", "INPUT_GRADIENT", *BOUND, *BOUND_OUTPUTS)
    ]
    if uses_layers and not layers:
        raise ValueError(f"{', '.join(uses_layers)} need {LAYERS_PARAMETER}; declare the layers")


def _check_entry(
    entry: Mapping[str, Any], datatype: str, dims: tuple[int, ...], why: str = ""
) -> None:
    name = entry.get("name")
    if entry.get("data_type") != datatype:
        raise ValueError(f"{name!r} must have data_type {datatype}, not {entry.get('data_type')}")
    declared = tuple(int(d) for d in entry.get("dims", []))
    if declared != dims:
        reason = f" {why}" if why else ""
        raise ValueError(f"{name!r} must have dims {list(dims)}{reason}, not {list(declared)}")


def requested_outputs(
    requested: Sequence[str], declared: Collection[str], sent: Collection[str]
) -> list[str]:
    """The optional outputs to compute for a request. Triton asks for every output when
    a request names none: then the outputs whose input was not sent (ACTIVATIONS without
    ACTIVATION_LAYER, gradients without GRADIENT_CLASS) are left out, not refused."""
    wanted = [name for name in requested if name in declared]
    if declared and set(wanted) == set(declared):
        wanted = [n for n in wanted if n not in NEEDS_INPUT or NEEDS_INPUT[n] in sent]
    return wanted


def read_ablation(version_folder: Path, layers: Sequence[Layer]) -> tuple[Ablation, ...]:
    """The version folder's permanent ablation (model repair), checked against the
    declared layers; empty when the folder has no ablation file."""
    path = version_folder / ABLATION_FILE
    if not path.is_file():
        return ()
    try:
        document = json.loads(path.read_text())
        entries = document["channels"]
        ablations = tuple(
            Ablation(str(e["layer"]), int(e["channel"]), float(e["value"])) for e in entries
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path}: not an ablation file ({error!r}); expected "
            '{"channels": [{"layer": ..., "channel": ..., "value": ...}], "source": ...}'
        ) from None
    channels = {layer.name: layer.channels for layer in layers}
    for ablation in ablations:
        if ablation.layer not in channels:
            raise ValueError(
                f"{path}: layer {ablation.layer!r} is not declared in {LAYERS_PARAMETER} "
                f"({', '.join(channels)})"
            )
        if not 0 <= ablation.channel < channels[ablation.layer]:
            raise ValueError(
                f"{path}: channel {ablation.channel} of {ablation.layer!r} is out of range "
                f"0..{channels[ablation.layer] - 1}"
            )
        if not math.isfinite(ablation.value):
            raise ValueError(
                f"{path}: value of {ablation.layer!r}[{ablation.channel}] is not finite"
            )
    return ablations


@dataclass
class _Call:
    """What one forward pass asks of the hooks, per sample (index tensors [B])."""

    replace: tuple[torch.Tensor, torch.Tensor] | None = None  # layer, values [B, C*H*W]
    direction: tuple[np.ndarray, np.ndarray] | None = None  # layer, d [B, C]
    intervene: tuple[torch.Tensor, ...] | None = None  # layer, channel, t, b
    patch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # layer, channel, value
    means: bool = False
    bound: dict[str, np.ndarray] | None = None  # the BOUND inputs, checked, [B] or [B, n]
    activation_layer: int | None = None
    gradients: bool = False
    seen_means: dict[int, torch.Tensor] = field(default_factory=dict)
    seen_activations: torch.Tensor | None = None
    seen_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)


class OpenModel:
    """An nn.Module with its declared layers opened by forward hooks.

    Hooks are registered once and do nothing unless a call asks for something (or the
    version carries a permanent ablation), so a plain call is the module's own forward
    pass. All samples of a batch go through one forward pass, each with its own
    intervention and patch.
    """

    def __init__(
        self,
        network: nn.Module,
        layers: Sequence[Layer],
        dry_input: torch.Tensor,
        ablation: Sequence[Ablation] = (),
        output_name: str | None = None,
        name: str = "model",
    ) -> None:
        self.network = network.eval()
        self.layers = tuple(layers)
        self.ablation = tuple(ablation)
        self.output_name = output_name
        self.name = name
        self._call: _Call | None = None
        # Traced before the hooks exist; never fails the load (bound requests get the
        # refusal), and none with a permanent ablation the trace would not see.
        self.bounded = self._traced_for_bounds(dry_input)
        self._bounded_sizes: dict[tuple[int, ...], BoundedNetwork] = {}
        if self.ablation:
            self.bounded.refusal = (
                f"{BOUND_UNSUPPORTED}a version with a permanent ablation ({ABLATION_FILE}); "
                "bound the version without it"
            )
        modules = dict(network.named_modules())
        for index, layer in enumerate(self.layers):
            if layer.name not in modules or not layer.name:
                known = [n for n in modules if n][:12]
                raise ValueError(
                    f"{name}: {LAYERS_PARAMETER} names layer {layer.name!r}, which the network "
                    f"lacks; its modules include {', '.join(known)}"
                )
            modules[layer.name].register_forward_hook(self._hook(index))
        self._dry_run(dry_input)

    def ablation_summary(self) -> str:
        """One log line for the version's permanent ablation (the adapters log it at load)."""
        channels = ", ".join(f"{a.layer}[{a.channel}] = {a.value:g}" for a in self.ablation)
        return f"permanent ablation of {len(self.ablation)} channel(s): {channels}"

    def _dry_run(self, dry_input: torch.Tensor) -> None:
        """One forward pass on `dry_input`: every declared layer must run once and output
        [B, C] or [B, C, H, W] with its declared C (the hooks check the shape)."""
        call = _Call()
        self._call = call
        try:
            with torch.inference_mode():
                self._forward(dry_input)
                for index, layer in enumerate(self.layers):
                    count = call.counts.get(index, 0)
                    if count != 1:
                        raise ValueError(
                            f"{self.name}: layer {layer.name!r} ran {count} times in a forward "
                            "pass; declare modules that run exactly once"
                        )
        finally:
            self._call = None

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        result = self.network(inputs)
        if isinstance(result, Mapping):
            if self.output_name not in result:
                raise ValueError(
                    f"the model returned outputs {sorted(result)}, not {self.output_name!r}"
                )
            result = result[self.output_name]
        if not isinstance(result, torch.Tensor):
            raise ValueError(
                f"the model returned {type(result).__name__}; its forward must return one "
                f"tensor or a dict holding {self.output_name!r}"
            )
        return result

    def _hook(self, index: int) -> Callable[..., torch.Tensor | None]:
        layer = self.layers[index]
        ablations = [a for a in self.ablation if a.layer == layer.name]

        def hook(module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
            call = self._call
            if call is None and not ablations:
                return None
            if not isinstance(output, torch.Tensor) or output.ndim not in (2, 4):
                shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output)
                raise ValueError(
                    f"{self.name}: layer {layer.name!r} outputs {shape}; a declared layer must "
                    "output one tensor [B, C] or [B, C, H, W]"
                )
            if output.shape[1] != layer.channels:
                raise ValueError(
                    f"{self.name}: layer {layer.name!r} outputs {output.shape[1]} channels, "
                    f"{LAYERS_PARAMETER} declares {layer.channels}"
                )
            # In order: the caller's replacement stands in for the module's output, then
            # the version's ablation, the intervention and the patch edit it.
            changed = output if call is None else self._replace(call, index, output)
            if ablations:
                changed = changed.clone()
                for ablation in ablations:
                    changed[:, ablation.channel] = ablation.value
            if call is None:
                return changed
            call.counts[index] = call.counts.get(index, 0) + 1
            changed = self._intervene(call, index, changed)
            changed = self._patch(call, index, changed)
            if call.means:
                call.seen_means[index] = _spatial_mean(changed)
            if call.activation_layer == index:
                call.seen_activations = changed.reshape(changed.shape[0], -1).detach().clone()
            if call.gradients:
                # Later layers get a copy, so an in-place operation of theirs cannot
                # change the tensor the gradients are taken with respect to.
                call.seen_outputs[index] = changed
                return changed.clone()
            return changed if changed is not output else None

        return hook

    def _replace(self, call: _Call, index: int, output: torch.Tensor) -> torch.Tensor:
        if call.replace is None:
            return output
        layer, values = call.replace
        rows = torch.nonzero(layer == index).flatten()
        if rows.numel() == 0:
            return output
        shape = tuple(output.shape[1:])
        size = math.prod(shape)
        if values.shape[1] != size:
            raise ValueError(
                f"REPLACE_ACTIVATION has {values.shape[1]} values per sample; layer "
                f"{self.layers[index].name!r} needs {size} (its C*H*W = "
                f"{' x '.join(map(str, shape))} for this input, row-major)"
            )
        # A copy assigned in place: the rows not replaced keep their gradient path.
        output = output.clone()
        output[rows] = values[rows].reshape(-1, *shape).to(output.dtype)
        return output

    @staticmethod
    def _intervene(call: _Call, index: int, output: torch.Tensor) -> torch.Tensor:
        if call.intervene is None:
            return output
        layer, channel, strength, baseline = call.intervene
        rows = torch.nonzero(layer == index).flatten()
        if rows.numel() == 0:
            return output
        output = output.clone()
        channels = channel[rows]
        t = strength[rows].view(-1, *([1] * (output.ndim - 2)))
        b = baseline[rows].view(-1, *([1] * (output.ndim - 2)))
        output[rows, channels] = (1 - t) * output[rows, channels] + t * b
        return output

    def _patch(self, call: _Call, index: int, output: torch.Tensor) -> torch.Tensor:
        if call.patch is None:
            return output
        layer, channel, value = call.patch
        rows = torch.nonzero(layer == index).flatten()
        if rows.numel() == 0:
            return output
        spatial = tuple(output.shape[2:])
        size = math.prod(spatial)
        if value.shape[1] not in (1, size):
            raise ValueError(
                f"PATCH_VALUE has {value.shape[1]} values per sample; layer "
                f"{self.layers[index].name!r} needs {size} (its H*W map, row-major) or 1"
            )
        output = output.clone()
        values = value[rows]
        values = values.expand(-1, size) if values.shape[1] == 1 else values
        output[rows, channel[rows]] = values.reshape(-1, *spatial).to(output.dtype)
        return output

    def __call__(
        self,
        inputs: torch.Tensor,
        optional: Mapping[str, np.ndarray | None] | None = None,
        requested: Collection[str] = (),
        box: BoxFunction | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> dict[str, np.ndarray]:
        """One batch: `inputs` is the network's input (already preprocessed), `optional`
        the optional input arrays by name (absent or None = not sent), `requested` the
        optional outputs asked for, `box` the map of BOUND_RADIUS to the network's input
        box (default: inputs +- radius, clipped to [0, 255] for a uint8 input),
        `cancelled` asked between a bound request's rows and sample batches (the
        caller's request cancelled: bounds.Cancelled). Returns "scores" and each
        requested output."""
        present = {k: v for k, v in (optional or {}).items() if v is not None}
        wanted = [name for name in requested if name in OPTIONAL_OUTPUTS]
        if not present and not wanted and not self.ablation:
            with torch.inference_mode():
                scores = self._forward(inputs)
            return {"scores": scores.detach().numpy()}
        call = self._prepare(present, wanted, inputs.shape[0])
        self._call = call
        try:
            if call.gradients:
                results = self._with_gradients(call, inputs, present, wanted)
            else:
                with torch.inference_mode():
                    scores = self._forward(inputs)
                results = {"scores": scores.detach().numpy(), **self._recorded(call, wanted)}
        finally:
            self._call = None
        if call.bound is not None and any(name in wanted for name in BOUND_OUTPUTS):
            results.update(
                self._bounds(call.bound, inputs, box, results["scores"].shape[1], wanted, cancelled)
            )
        return results

    def _bounds(
        self,
        bound: Mapping[str, np.ndarray],
        inputs: torch.Tensor,
        box: BoxFunction | None,
        classes: int,
        wanted: Sequence[str],
        cancelled: Callable[[], bool] | None = None,
    ) -> dict[str, np.ndarray]:
        """BOUND_MARGIN and SAMPLED_MARGIN of each sample (bounds.py), outside
        inference mode: the backward pass takes adjoints by autograd."""
        radius = bound["BOUND_RADIUS"]
        size = math.prod(inputs.shape[1:])
        if radius.shape[1] != size:
            raise ValueError(
                f"BOUND_RADIUS has {radius.shape[1]} values per sample; the image input has "
                f"{size} (one per element, in the input's own layout)"
            )
        target = bound["BOUND_CLASS"]
        bad = (target < 0) | (target >= classes)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(
                f"BOUND_CLASS[{row}] is {target[row]}; the model outputs {classes} classes "
                f"(0..{classes - 1})"
            )
        bounded = self._bounded_at(inputs)
        for layer in sorted(set(bound["BOUND_LAYER"].tolist())):
            bounded.check(int(layer))
        if box is None:
            lower, upper = box_around(inputs.detach().float(), radius, inputs.dtype == torch.uint8)
        else:
            lower, upper = box(radius)
        margins, sampled = bounded.margins(
            lower,
            upper,
            inputs.detach().float(),
            target.tolist(),
            bound["BOUND_METHOD"].tolist(),
            bound["BOUND_LAYER"].tolist(),
            bound["BOUND_SAMPLES"].tolist(),
            bound["BOUND_SEED"].tolist(),
            cancelled,
        )
        outputs = {"BOUND_MARGIN": margins, "SAMPLED_MARGIN": sampled}
        return {
            name: outputs[name].numpy().astype(np.float32, copy=False)
            for name in BOUND_OUTPUTS
            if name in wanted
        }

    def _bounded_at(self, inputs: torch.Tensor) -> BoundedNetwork:
        """The network traced at this input's size: the load-time trace's reshapes and
        CROWN's adjoints hold the dry input's shapes, so a model with -1 dims is traced
        again per size (the last few kept)."""
        shape = tuple(inputs.shape[1:])
        if self.bounded.refusal or self.bounded.nodes[self.bounded.source].shape == shape:
            return self.bounded
        if shape not in self._bounded_sizes:
            if len(self._bounded_sizes) >= BOUNDED_SIZES_KEPT:
                self._bounded_sizes.pop(next(iter(self._bounded_sizes)))
            self._bounded_sizes[shape] = self._traced_for_bounds(inputs[:1].detach())
        return self._bounded_sizes[shape]

    def _traced_for_bounds(self, sample: torch.Tensor) -> BoundedNetwork:
        return BoundedNetwork(
            self.network, sample, [layer.name for layer in self.layers], self.output_name
        )

    def _with_gradients(
        self,
        call: _Call,
        inputs: torch.Tensor,
        present: Mapping[str, np.ndarray],
        wanted: Sequence[str],
    ) -> dict[str, np.ndarray]:
        if not inputs.is_floating_point():
            raise ValueError(
                f"gradients need a floating-point model input, not {inputs.dtype}; declare "
                "an FP32 input"
            )
        classes = _column(present, "GRADIENT_CLASS", inputs.shape[0]).astype(np.int64)
        directed = call.direction[0] if call.direction is not None else np.full_like(classes, -1)
        with torch.enable_grad():
            # Always a leaf that requires grad: a module with frozen parameters (common in
            # exported inference models) would otherwise build no graph to differentiate.
            leaf = inputs.detach().clone().requires_grad_(True)
            scores = self._forward(leaf.clone())
            by_class = directed < 0
            bad = by_class & ((classes < 0) | (classes >= scores.shape[1]))
            if bad.any():
                raise ValueError(
                    f"GRADIENT_CLASS {classes.tolist()} out of range; the model outputs "
                    f"{scores.shape[1]} classes (0..{scores.shape[1] - 1}); -1 only where "
                    "GRADIENT_LAYER is >= 0"
                )
            rows = torch.from_numpy(np.flatnonzero(by_class))
            # Samples are independent, so the gradient of the sum is each sample's own.
            objective = scores[rows, torch.from_numpy(classes[by_class])].sum()
            objective = objective + self._directed(call, directed)
            targets = [call.seen_outputs[i] for i in range(len(self.layers))]
            if "INPUT_GRADIENT" in wanted:
                targets.append(leaf)
            gradients = torch.autograd.grad(objective, targets, allow_unused=True)
        results = {"scores": scores.detach().numpy(), **self._recorded(call, wanted)}
        layer_gradients = [
            torch.zeros_like(t) if g is None else g
            for t, g in zip(targets[: len(self.layers)], gradients, strict=False)
        ]
        if "CHANNEL_GRADIENTS" in wanted:
            results["CHANNEL_GRADIENTS"] = _concat(
                [_spatial_sum(g) for g in layer_gradients], inputs.shape[0]
            )
        if "GRAD_X_ACTIVATION" in wanted:
            results["GRAD_X_ACTIVATION"] = _concat(
                [
                    _spatial_sum(g * a.detach())
                    for g, a in zip(layer_gradients, targets, strict=False)
                ],
                inputs.shape[0],
            )
        if "INPUT_GRADIENT" in wanted:
            gradient = gradients[-1]
            gradient = torch.zeros_like(leaf) if gradient is None else gradient
            results["INPUT_GRADIENT"] = gradient.detach().numpy().astype(np.float32, copy=False)
        return results

    @staticmethod
    def _directed(call: _Call, directed: np.ndarray) -> torch.Tensor:
        """Σ over the directed samples of the spatial mean of Σ_c d_c a_c at their layer."""
        total = torch.zeros(())
        if call.direction is None:
            return total
        directions = torch.from_numpy(call.direction[1])
        for index in np.unique(directed[directed >= 0]).tolist():
            rows = torch.from_numpy(np.flatnonzero(directed == index))
            activation = call.seen_outputs[index][rows]
            d = directions[rows].to(activation.dtype)
            projected = (activation * d.view(*d.shape, *([1] * (activation.ndim - 2)))).sum(1)
            total = total + (projected.mean(dim=(1, 2)) if projected.ndim == 3 else projected).sum()
        return total

    def _recorded(self, call: _Call, wanted: Sequence[str]) -> dict[str, np.ndarray]:
        results: dict[str, np.ndarray] = {}
        if "CHANNEL_MEANS" in wanted:
            batch = next(iter(call.seen_means.values())).shape[0] if call.seen_means else 0
            results["CHANNEL_MEANS"] = _concat(
                [call.seen_means[i] for i in range(len(self.layers))], batch
            )
        if "ACTIVATIONS" in wanted:
            assert call.seen_activations is not None
            results["ACTIVATIONS"] = call.seen_activations.numpy().astype(np.float32, copy=False)
        return results

    def _prepare(
        self, present: Mapping[str, np.ndarray], wanted: Sequence[str], batch: int
    ) -> _Call:
        """Checks the optional inputs against the declared layers and each other, and
        turns them into the hooks' per-sample tensors. Errors name the input."""
        call = _Call(means="CHANNEL_MEANS" in wanted)
        n = len(self.layers)
        layer_range = f"0..{n - 1} (-1 = none)" if n else "none declared (-1 = none)"
        for group in (INTERVENE, PATCH, REPLACE, DIRECTION, BOUND):
            given = [name for name in group if name in present]
            if given and len(given) != len(group):
                missing = [name for name in group if name not in present]
                raise ValueError(
                    f"{', '.join(given)} sent without {', '.join(missing)}; send all of "
                    f"{', '.join(group)} or none"
                )
        if "INTERVENE_LAYER" in present:
            layer = _column(present, "INTERVENE_LAYER", batch).astype(np.int64)
            channel = _column(present, "INTERVENE_CHANNEL", batch).astype(np.int64)
            strength = _column(present, "INTERVENE_STRENGTH", batch).astype(np.float32)
            baseline = _column(present, "INTERVENE_BASELINE", batch).astype(np.float32)
            active = self._check_layer_channel("INTERVENE", layer, channel, layer_range)
            bad = active & ~(np.isfinite(strength) & (strength >= 0) & (strength <= 1))
            if bad.any():
                raise ValueError(
                    f"INTERVENE_STRENGTH[{int(np.argmax(bad))}] is "
                    f"{strength[np.argmax(bad)]}; give t in [0, 1]"
                )
            bad = active & ~np.isfinite(baseline)
            if bad.any():
                raise ValueError(f"INTERVENE_BASELINE[{int(np.argmax(bad))}] is not finite")
            call.intervene = tuple(
                torch.from_numpy(a) for a in (layer, channel, strength, baseline)
            )
        if "PATCH_LAYER" in present:
            layer = _column(present, "PATCH_LAYER", batch).astype(np.int64)
            channel = _column(present, "PATCH_CHANNEL", batch).astype(np.int64)
            value = np.asarray(present["PATCH_VALUE"], dtype=np.float32)
            if value.ndim != 2 or value.shape[0] != batch or value.shape[1] < 1:
                raise ValueError(
                    f"PATCH_VALUE must be [B, H*W] or [B, 1] for a batch of {batch}, "
                    f"got {list(value.shape)}"
                )
            active = self._check_layer_channel("PATCH", layer, channel, layer_range)
            # Its length against the layer's H*W is checked in the pass (_patch), where
            # the map's size for this input is known.
            if not np.isfinite(value[active]).all():
                raise ValueError("PATCH_VALUE holds NaN or infinite values")
            call.patch = (
                torch.from_numpy(layer),
                torch.from_numpy(channel),
                torch.from_numpy(value),
            )
        if "REPLACE_LAYER" in present:
            layer = _column(present, "REPLACE_LAYER", batch).astype(np.int64)
            values = self._per_sample(present, "REPLACE_ACTIVATION", batch, "C*H*W")
            active = self._check_layer("REPLACE_LAYER", layer, layer_range)
            # Its length against the layer's C*H*W is checked in the pass (_replace),
            # where the map's size for this input is known.
            if not np.isfinite(values[active]).all():
                raise ValueError("REPLACE_ACTIVATION holds NaN or infinite values")
            call.replace = (torch.from_numpy(layer), torch.from_numpy(values))
        if "GRADIENT_LAYER" in present:
            layer = _column(present, "GRADIENT_LAYER", batch).astype(np.int64)
            direction = self._per_sample(present, "GRADIENT_DIRECTION", batch, "C")
            active = self._check_layer("GRADIENT_LAYER", layer, layer_range)
            for row in np.flatnonzero(active):
                declared = self.layers[layer[row]]
                if direction.shape[1] != declared.channels:
                    raise ValueError(
                        f"GRADIENT_DIRECTION has {direction.shape[1]} values per sample; "
                        f"GRADIENT_LAYER[{row}] is {layer[row]}, layer {declared.name!r}, "
                        f"which needs {declared.channels} (one per channel)"
                    )
            if not np.isfinite(direction[active]).all():
                raise ValueError("GRADIENT_DIRECTION holds NaN or infinite values")
            call.direction = (layer, direction)
        if "ACTIVATIONS" in wanted:
            if "ACTIVATION_LAYER" not in present:
                raise ValueError(
                    "ACTIVATIONS requested without ACTIVATION_LAYER; send the layer index"
                )
            chosen = _column(present, "ACTIVATION_LAYER", batch).astype(np.int64)
            if np.any(chosen != chosen[0]):
                raise ValueError(
                    f"ACTIVATION_LAYER differs between samples ({sorted(set(chosen.tolist()))}); "
                    "send one layer per request"
                )
            if batch and not 0 <= chosen[0] < n:
                raise ValueError(f"ACTIVATION_LAYER is {chosen[0]}; layer indices are 0..{n - 1}")
            call.activation_layer = int(chosen[0]) if batch else None
        bound_outputs = [name for name in wanted if name in BOUND_OUTPUTS]
        if bound_outputs and "BOUND_RADIUS" not in present:
            raise ValueError(
                f"{', '.join(bound_outputs)} requested without the BOUND inputs; send "
                f"{', '.join(BOUND)}"
            )
        if "BOUND_RADIUS" in present:
            call.bound = self._check_bound(present, batch)
        gradient_outputs = [name for name in wanted if name in GRADIENT_OUTPUTS]
        if gradient_outputs:
            if "GRADIENT_CLASS" not in present:
                raise ValueError(
                    f"{', '.join(gradient_outputs)} requested without GRADIENT_CLASS; send the "
                    "class index to differentiate (-1 for a sample whose GRADIENT_LAYER sends "
                    "a direction)"
                )
            call.gradients = True
        return call

    def _check_bound(self, present: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """The BOUND group checked (the class against the scores later, the radius's
        length against the input in the pass); bounds are of the plain network, so no
        edit of a layer may come with them."""
        edits = [
            name for name in ("INTERVENE_LAYER", "PATCH_LAYER", "REPLACE_LAYER") if name in present
        ]
        if edits:
            raise ValueError(
                f"the BOUND inputs come with {', '.join(edits)}; bounds are of the unedited "
                "network, send them in a request of their own"
            )
        radius = self._per_sample(present, "BOUND_RADIUS", batch, "n")
        if not (np.isfinite(radius).all() and (radius >= 0).all()):
            raise ValueError("BOUND_RADIUS holds negative, NaN or infinite values; give r >= 0")
        checked = {"BOUND_RADIUS": radius}
        for name in BOUND[1:]:
            checked[name] = _column(present, name, batch).astype(np.int64)
        method = checked["BOUND_METHOD"]
        bad = ~np.isin(method, list(BOUND_METHODS))
        if bad.any():
            row = int(np.argmax(bad))
            choices = ", ".join(f"{k} = {v}" for k, v in BOUND_METHODS.items())
            raise ValueError(f"BOUND_METHOD[{row}] is {method[row]}; give {choices}")
        n = len(self.layers)
        layer_range = (
            f"0..{n - 1} (-1 = from the input)" if n else "none declared (-1 = from the input)"
        )
        hybrid = self._check_layer("BOUND_LAYER", checked["BOUND_LAYER"], layer_range)
        samples = checked["BOUND_SAMPLES"]
        bad = (samples < 0) | (samples > MAX_BOUND_SAMPLES) | (hybrid & (samples < 1))
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(
                f"BOUND_SAMPLES[{row}] is {samples[row]}; give 0..{MAX_BOUND_SAMPLES}, and at "
                "least 1 where BOUND_LAYER >= 0 (the hybrid's layer box is sampled)"
            )
        return checked

    @staticmethod
    def _per_sample(
        present: Mapping[str, np.ndarray], name: str, batch: int, length: str
    ) -> np.ndarray:
        """An optional [B, L] input of FP32 values (L = `length`, checked by the caller)."""
        values = np.asarray(present[name], dtype=np.float32)
        if values.ndim != 2 or values.shape[0] != batch or values.shape[1] < 1:
            raise ValueError(
                f"{name} must be [B, {length}] for a batch of {batch}, got {list(values.shape)}"
            )
        return values

    def _check_layer(self, name: str, layer: np.ndarray, layer_range: str) -> np.ndarray:
        """Which samples name a layer (the others send -1); ValueError naming the input."""
        bad = (layer < -1) | (layer >= len(self.layers))
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{name}[{row}] is {layer[row]}; layer indices are {layer_range}")
        return layer >= 0

    def _check_layer_channel(
        self, group: str, layer: np.ndarray, channel: np.ndarray, layer_range: str
    ) -> np.ndarray:
        active = self._check_layer(f"{group}_LAYER", layer, layer_range)
        widths = np.array([lyr.channels for lyr in self.layers] + [0], dtype=np.int64)[layer]
        bad = active & ((channel < 0) | (channel >= widths))
        if bad.any():
            row = int(np.argmax(bad))
            name = self.layers[layer[row]].name
            raise ValueError(
                f"{group}_CHANNEL[{row}] is {channel[row]}; layer {name!r} has channels "
                f"0..{widths[row] - 1}"
            )
        return active


def _column(present: Mapping[str, np.ndarray], name: str, batch: int) -> np.ndarray:
    """An optional [B, 1] input as a vector of B values."""
    array = np.asarray(present[name])
    if array.ndim != 2 or array.shape != (batch, 1):
        raise ValueError(f"{name} must be [B, 1] for a batch of {batch}, got {list(array.shape)}")
    return array[:, 0]


def box_around(
    centre: torch.Tensor, radius: np.ndarray, pixels: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """centre +- radius in the centre's own layout; pixel values clipped to [0, 255],
    the values a uint8 input can take (the bound covers no other)."""
    r = torch.from_numpy(radius).reshape(centre.shape)
    lower, upper = centre - r, centre + r
    if pixels:
        lower, upper = lower.clamp(0, 255), upper.clamp(0, 255)
    return lower, upper


def _spatial_mean(output: torch.Tensor) -> torch.Tensor:
    return (output.mean(dim=(2, 3)) if output.ndim == 4 else output).detach().float()


def _spatial_sum(output: torch.Tensor) -> torch.Tensor:
    return (output.sum(dim=(2, 3)) if output.ndim == 4 else output).detach().float()


def _concat(parts: Sequence[torch.Tensor], batch: int) -> np.ndarray:
    if not parts:
        return np.zeros((batch, 0), np.float32)
    return torch.cat(list(parts), dim=1).numpy().astype(np.float32, copy=False)
