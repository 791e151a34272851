"""The traced graph that bound propagation (bounds.py) runs on: a network traced once
with torch.fx into nodes of a few kinds (the input, affine operations: convolution,
linear, batch norm in eval mode, average pooling, means, reshapes, arithmetic with
constants, sums of two bounded branches; ReLU; max pooling), each declared layer mapped
to the node producing its output, and for anything else the refusal naming it.

Apart from the propagation so that what is supported, and why a network is refused,
reads in one place; the load-time checks (the graph computes the network's scores, a
sample's scores do not depend on the rest of its batch) live here too.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from propscope_server.open_contract import BOUND_FROM_INPUT, BOUND_UNSUPPORTED

SUPPORTED = (
    "Conv2d (any padding mode), Linear, BatchNorm1d/2d (eval, running statistics), ReLU, "
    "MaxPool2d, AvgPool2d, AdaptiveAvgPool2d (modules or functions), mean, sum, "
    "flatten/view/reshape, permute/transpose (batch first), add/sub/mul/div by constants, "
    "negation, add/sub of two branches, dropout (eval)"
)
FIX = "use a hybrid layer after it or expose the logits"
# The batch of the load-time trace check: a size no layer is likely to have, so an
# operation that mixes the samples of a batch shows in its output's shape.
TRACE_BATCH = 3

_SHAPE_FUNCTIONS = {getattr, operator.getitem}
_SHAPE_METHODS = {"size", "dim"}
_RESHAPES_METHODS = {"flatten", "view", "reshape"}
_IDENTITY_METHODS = {"contiguous", "float", "clone"}
_ARITHMETIC = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
}
# In-place variants too: the traced graph computes out of place, and the load-time check
# against the network's own scores catches an in-place edit another node would see.
_ARITHMETIC_METHODS = {
    **{name: name for name in ("add", "sub", "mul", "div")},
    **{f"{name}_": name for name in ("add", "sub", "mul", "div")},
}
_RELUS = {torch.relu, torch.relu_, F.relu, F.relu_}
# Dropouts are the identity in eval mode (the trace puts the network in it).
_LEAVES = (
    nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}


@dataclass
class Node:
    """One traced operation. `inputs` are the non-constant nodes it reads (bounded
    tensors, or shape values for reshapes), `forward` computes it from their values."""

    name: str
    kind: str  # input | affine | relu | maxpool | shape | unsupported
    inputs: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    forward: Callable[..., Any] | None = None
    magnitude: Callable[..., torch.Tensor] | None = None
    pool: nn.MaxPool2d | None = None
    refusal: str = ""
    scopes: tuple[str, ...] = ()  # the module paths it was traced inside


class Unsupported(ValueError):
    """A network, or a part of it, that bound propagation cannot handle."""


class BoundGraph:
    """A network traced into supported nodes. Construction never fails on an
    unsupported network: the refusal is kept and raised by `check` (only bound
    requests need it), so the model still serves everything else."""

    def __init__(
        self,
        network: nn.Module,
        sample_input: torch.Tensor,
        layers: Sequence[str] = (),
        output_name: str | None = None,
    ) -> None:
        self.layers = tuple(layers)
        self.refusal = ""
        self.nodes: dict[str, Node] = {}
        self.output = ""
        self.source = ""
        self.layer_nodes: list[str | None] = [None] * len(self.layers)
        self.layer_refusals = [""] * len(self.layers)
        try:
            _check_float32(network)
            self._trace(network.eval(), sample_input.float(), output_name)
            self._map_layers(network, sample_input)
        except Unsupported as error:
            self.refusal = str(error)
        except Exception as error:  # noqa: BLE001 (any trace failure only refuses bounds)
            self.refusal = (
                f"{BOUND_UNSUPPORTED}this network: torch.fx cannot trace it ({error}); "
                f"supported: {SUPPORTED}; {FIX}"
            )

    # --- tracing ---------------------------------------------------------------------

    def _trace(self, network: nn.Module, sample: torch.Tensor, output_name: str | None) -> None:
        graph = fx.Tracer().trace(network)
        root = fx.GraphModule(network, graph)
        batch = sample[:1].expand(TRACE_BATCH, *sample.shape[1:]).clone()
        generator = torch.Generator().manual_seed(0)
        batch = batch + torch.rand(batch.shape, generator=generator)
        constants: dict[str, Any] = {}
        values: dict[str, Any] = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                if self.source:
                    if node.args:  # a default value: a constant
                        constants[node.name] = node.args[0]
                        continue
                    raise Unsupported(
                        f"{BOUND_UNSUPPORTED}a forward with several inputs ({node.name!r}); "
                        "the image must be its only input"
                    )
                self.source = node.name
                self.nodes[node.name] = Node(node.name, "input", shape=tuple(batch.shape[1:]))
                values[node.name] = batch
            elif node.op == "get_attr":
                constants[node.name] = _attribute(root, str(node.target))
            elif node.op == "output":
                self.output = self._output_node(node, output_name)
            else:
                depends = [a.name for a in node.all_input_nodes if a.name not in constants]
                if not depends:
                    constants[node.name] = _generic(root, node, (), constants)()
                    continue
                item = self._classify(root, node, depends, constants)
                # The node's own operation: a reshape's closure needs the shape it finds.
                value = _generic(root, node, item.inputs, constants)(
                    *[values[name] for name in item.inputs]
                )
                if isinstance(value, torch.Tensor):
                    if item.kind == "shape":
                        item.kind = "unsupported"
                    if value.ndim == 0 or value.shape[0] != TRACE_BATCH:
                        item.kind = "unsupported"
                        item.refusal = (
                            f"{BOUND_UNSUPPORTED}{_describe(root, node)}: it mixes the samples "
                            f"of a batch (output {list(value.shape)} for a batch of {TRACE_BATCH}); "
                            f"{FIX}"
                        )
                    item.shape = tuple(value.shape[1:])
                elif item.kind != "shape":
                    item.kind = "unsupported"  # its refusal: _classify's, naming it
                values[node.name] = value
                self.nodes[node.name] = item
        if self.output not in self.nodes or self.nodes[self.output].kind == "shape":
            raise Unsupported(
                f"{BOUND_UNSUPPORTED}a network whose scores do not depend on its input"
            )
        if self.nodes[self.output].kind == "unsupported":
            raise Unsupported(self.nodes[self.output].refusal)
        if len(self.nodes[self.output].shape) != 1:
            raise Unsupported(
                f"{BOUND_UNSUPPORTED}scores of shape {list(self.nodes[self.output].shape)} per "
                "sample; the network must output [B, K]"
            )
        self._check_consumers()
        self._check_against(network, sample, output_name)

    def _output_node(self, node: fx.Node, output_name: str | None) -> str:
        result = node.args[0]
        if isinstance(result, Mapping):
            result = result.get(output_name)
        if not isinstance(result, fx.Node):
            raise Unsupported(
                f"{BOUND_UNSUPPORTED}this network's output structure; its forward must return "
                f"one tensor or a dict holding {output_name!r}"
            )
        return result.name

    def _check_consumers(self) -> None:
        """A shape value may only feed reshapes (which recompute it per batch)."""
        for item in self.nodes.values():
            if item.kind in ("affine", "relu", "maxpool"):
                shaped = [n for n in item.inputs if self.nodes[n].kind == "shape"]
                if shaped and not isinstance(item.magnitude, _ReshapeMagnitude):
                    item.kind = "unsupported"
                    item.refusal = (
                        f"{BOUND_UNSUPPORTED}node {item.name!r} computing with the input's "
                        f"shape; {FIX}"
                    )

    def _check_against(
        self, network: nn.Module, sample: torch.Tensor, output_name: str | None
    ) -> None:
        """The traced graph must compute the network's scores (an in-place trick the
        trace cannot see would otherwise go unnoticed)."""
        if any(n.kind == "unsupported" for n in self.nodes.values()):
            return  # refused anyway; the graph cannot be run as a whole
        probe = _probe(sample)
        with torch.no_grad():
            expected = network(probe)
            if isinstance(expected, Mapping):
                expected = expected[output_name]
            got = self.run(probe.float())[self.output]
            # Rows are bounded together in a batch: each sample's scores must not depend
            # on the others (an operation over dim 0 whose size matched TRACE_BATCH
            # passes the trace's shape check).
            pair = torch.cat([probe[:1], _probe(sample, seed=1)[:1]]).float()
            together = self.run(pair)[self.output]
            alone = torch.cat([self.run(pair[i : i + 1])[self.output] for i in range(2)])
        if together.shape != alone.shape or not torch.allclose(
            together, alone, rtol=1e-4, atol=1e-5
        ):
            raise Unsupported(
                f"{BOUND_UNSUPPORTED}this network: a sample's scores depend on the other "
                f"samples of its batch (an operation over the batch dimension); {FIX}"
            )
        if not torch.allclose(got, expected.float(), rtol=1e-4, atol=1e-5):
            raise Unsupported(
                f"{BOUND_UNSUPPORTED}this network: the traced graph's scores differ from the "
                f"network's by {float((got - expected).abs().max()):.3g} (an in-place or "
                f"data-dependent operation?); {FIX}"
            )

    def _map_layers(self, network: nn.Module, sample: torch.Tensor) -> None:
        """Each declared layer -> the node producing its module's output: the last node
        traced inside the module, checked against a forward hook on one probe input."""
        if not self.layers or self.refusal:
            return
        modules = dict(network.named_modules())
        seen: dict[str, torch.Tensor] = {}
        handles = []
        for path in self.layers:
            if path in modules:
                handles.append(
                    modules[path].register_forward_hook(
                        lambda m, a, out, path=path: seen.__setitem__(path, out.detach().clone())
                    )
                )
        probe = _probe(sample)
        try:
            with torch.no_grad():
                network(probe)
        finally:
            for handle in handles:
                handle.remove()
        values = None
        for index, path in enumerate(self.layers):
            candidates = [name for name, item in self.nodes.items() if path in item.scopes]
            name = candidates[-1] if candidates else None
            if name is not None and path in seen:
                if values is None:
                    with torch.no_grad():
                        values = self.run(probe.float())
                value = values.get(name)
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == seen[path].shape
                    and torch.allclose(value, seen[path].float(), rtol=1e-4, atol=1e-5)
                ):
                    self.layer_nodes[index] = name
                    continue
            self.layer_refusals[index] = (
                f"{BOUND_UNSUPPORTED}a hybrid from layer {path!r}: its output is not one node "
                "of the traced graph; declare a layer whose module's output is a tensor used "
                "once"
            )

    def _classify(
        self, root: fx.GraphModule, node: fx.Node, depends: list[str], constants: dict
    ) -> Node:
        bounded = [n for n in depends if self.nodes[n].kind != "shape"]
        item = Node(node.name, "unsupported", tuple(depends))
        item.scopes = tuple(path for path, _ in node.meta.get("nn_module_stack", {}).values())
        if node.op == "call_module":
            item.scopes = (*item.scopes, str(node.target))
        item.forward = _generic(root, node, tuple(depends), constants)
        item.refusal = _refusal(root, node)
        queries_shape = (
            (node.op == "call_method" and node.target in _SHAPE_METHODS)
            or (node.op == "call_function" and node.target in _SHAPE_FUNCTIONS and not bounded)
            or (node.op == "call_function" and node.target is getattr)
        )
        if not bounded or queries_shape:
            item.kind = "shape"
            return item
        if node.op == "call_module":
            module = root.get_submodule(str(node.target))
            _classify_module(item, module, node)
        elif _permutes(node):
            _permutation(item, node, len(self.nodes[bounded[0]].shape) + 1)
        elif node.op == "call_function":
            _classify_function(item, node, bounded, constants)
        elif node.op == "call_method":
            _classify_method(item, node, bounded, constants)
        if item.kind in ("affine", "relu", "maxpool") and len(bounded) != len(depends):
            if not isinstance(item.magnitude, _ReshapeMagnitude):
                item.kind = "unsupported"
        return item

    # --- evaluation ------------------------------------------------------------------

    def run(self, inputs: torch.Tensor) -> dict[str, Any]:
        """Every node's value for concrete inputs (the network's forward pass)."""
        values: dict[str, Any] = {self.source: inputs}
        for name, item in self.nodes.items():
            if item.kind != "input":
                assert item.forward is not None
                values[name] = item.forward(*[values[n] for n in item.inputs])
        return values

    def check(self, layer: int = BOUND_FROM_INPUT) -> None:
        """Raises the refusal of bounds from the input (layer -1) or from declared layer
        `layer`, naming what is not supported."""
        if self.refusal:
            raise Unsupported(self.refusal)
        source = self.source if layer < 0 else self.layer_nodes[layer]
        if source is None:
            raise Unsupported(self.layer_refusals[layer])
        for name in self.needed(source):
            if name != source and self.nodes[name].kind == "unsupported":
                raise Unsupported(self.nodes[name].refusal)

    def descendants(self, source: str) -> set[str]:
        found = {source}
        for name, item in self.nodes.items():
            if any(n in found for n in item.inputs):
                found.add(name)
        return found

    def _ancestors(self, targets: set[str]) -> set[str]:
        found = set(targets)
        for name in reversed(list(self.nodes)):
            if name in found:
                found.update(self.nodes[name].inputs)
        return found

    def needed(self, source: str) -> list[str]:
        """The nodes whose boxes a bound from `source` needs: those between the source
        and the scores, and the ancestors of any other node they read (the frontier,
        bounded by IBP from the input)."""
        between = self.descendants(source) & self._ancestors({self.output})
        frontier = {n for b in between - {source} for n in self.nodes[b].inputs if n not in between}
        needed = between | self._ancestors(frontier) if frontier else between
        return [name for name in self.nodes if name in needed]


# --- the supported operations ----------------------------------------------------------


def _classify_module(item: Node, module: nn.Module, node: fx.Node) -> None:
    (x_arg, *rest) = node.args if node.args else (None,)
    if rest or node.kwargs or len(item.inputs) != 1:
        return
    if isinstance(module, nn.Conv2d):
        # Any padding mode: reflect/replicate/circular pad by copying inputs (weights
        # 0/1), so |W| after the same padding bounds the radius.
        weight, bias = module.weight, module.bias
        item.kind = "affine"
        item.forward = lambda x: module._conv_forward(x, weight, bias)
        item.magnitude = lambda r: module._conv_forward(r, weight.abs(), None)
    elif isinstance(module, nn.Linear):
        item.kind = "affine"
        item.forward = lambda x: F.linear(x, module.weight, module.bias)
        item.magnitude = lambda r: F.linear(r, module.weight.abs())
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        _batch_norm(item, module, f"layer {str(node.target)!r} ({_type_name(module)})")
    elif isinstance(module, nn.ReLU):
        item.kind = "relu"
        item.forward = torch.relu
    elif isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            item.refusal = (
                f"{BOUND_UNSUPPORTED}layer {str(node.target)!r} (torch.nn.MaxPool2d) with "
                f"return_indices=True; {FIX}"
            )
            return
        item.kind = "maxpool"
        item.pool = module
        item.forward = lambda x: F.max_pool2d(
            x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode
        )
    elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        # One weight per window times a scalar (1 / divisor_override may be negative).
        item.kind = "affine"
        item.forward = module.forward
        item.magnitude = lambda r: module.forward(r).abs()
    elif isinstance(module, _LEAVES):
        item.kind = "affine"
        item.forward = module.forward
        item.magnitude = module.forward


def _batch_norm(item: Node, module: nn.Module, name: str) -> None:
    """Batch norm in eval mode with running statistics: a per-channel affine map (a
    negative scale flips the interval: the radius goes through |scale|)."""
    if module.training or module.running_var is None or module.running_mean is None:
        item.refusal = (
            f"{BOUND_UNSUPPORTED}{name} without running statistics (it normalises by the "
            f"batch's own statistics, mixing the samples); {FIX}"
        )
        return
    scale = (module.weight if module.affine else 1.0) / torch.sqrt(module.running_var + module.eps)
    shift = (module.bias if module.affine else 0.0) - module.running_mean * scale
    scale, shift = scale.detach(), shift.detach()

    def per_channel(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return value.view(1, -1, *([1] * (x.ndim - 2)))

    item.kind = "affine"
    item.forward = lambda x: x * per_channel(scale, x) + per_channel(shift, x)
    item.magnitude = lambda r: r * per_channel(scale.abs(), r)


def _classify_function(item: Node, node: fx.Node, bounded: list[str], constants: dict) -> None:
    target = node.target
    if target in _RELUS and len(bounded) == 1:
        item.kind = "relu"
        item.forward = lambda x, *rest: torch.relu(x)
    elif target is torch.flatten:
        _reshape(item)
    elif target in (torch.mean, torch.sum):
        item.kind = "affine"
        item.magnitude = item.forward
    elif target is operator.neg and len(item.inputs) == 1:
        item.kind = "affine"
        item.forward = operator.neg
        item.magnitude = lambda r: r
    elif target in _DROPOUTS and len(item.inputs) == 1:
        default = target is not F.alpha_dropout  # its `training` defaults to False
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else default)
        if training is False:
            item.kind = "affine"
            item.forward = lambda x: x
            item.magnitude = item.forward
    elif target in _ARITHMETIC:
        _arithmetic(item, node, _ARITHMETIC[target], node.args, bounded, constants)
    elif target in (F.avg_pool2d, F.adaptive_avg_pool2d) and len(item.inputs) == 1:
        forward = item.forward  # a weight per window times a scalar, as the modules'
        item.kind = "affine"
        item.magnitude = lambda r: forward(r).abs()
    elif target is F.max_pool2d and len(item.inputs) == 1:
        _functional_max_pool(item, node)


_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _functional_max_pool(item: Node, node: fx.Node) -> None:
    """F.max_pool2d as the module of the same arguments (with return_indices=True the
    trace records max_pool2d_with_indices instead, refused by name)."""
    options = {**dict(zip(_MAX_POOL_ARGS, node.args[1:], strict=False)), **node.kwargs}
    if set(options) - set(_MAX_POOL_ARGS):
        item.refusal = (
            f"{BOUND_UNSUPPORTED}F.max_pool2d at node {item.name!r} with {options}; {FIX}"
        )
        return
    if options.get("stride") in (None, []):
        options.pop("stride", None)
    pool = nn.MaxPool2d(**options)
    item.kind = "maxpool"
    item.pool = pool
    item.forward = pool.forward


def _classify_method(item: Node, node: fx.Node, bounded: list[str], constants: dict) -> None:
    method = str(node.target)
    if method in _RESHAPES_METHODS:
        _reshape(item)
    elif method in ("relu", "relu_") and len(item.inputs) == 1:
        item.kind = "relu"
        item.forward = torch.relu
    elif method in _IDENTITY_METHODS and len(node.args) == 1 and not node.kwargs:
        item.kind = "affine"
        item.forward = lambda x: x.float()
        item.magnitude = item.forward
    elif method in ("mean", "sum"):
        item.kind = "affine"
        item.magnitude = item.forward
    elif method in _ARITHMETIC_METHODS:
        _arithmetic(item, node, _ARITHMETIC_METHODS[method], node.args, bounded, constants)


def _permutes(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("permute", "transpose")
    return node.op == "call_function" and node.target in (torch.permute, torch.transpose)


def _permutation(item: Node, node: fx.Node, ndim: int) -> None:
    """permute/transpose that keep the batch dimension first: a reordering (weights
    0/1), so the radii move with the values."""
    dims: Any = list(node.args[1:]) or list(node.kwargs.values())
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    if len(item.inputs) != 1 or not dims or not all(isinstance(d, int) for d in dims):
        return
    name = getattr(node.target, "__name__", str(node.target))
    if name == "transpose":
        keeps_batch = all(d % ndim != 0 for d in dims)
    else:
        keeps_batch = dims[0] % ndim == 0
    if not keeps_batch:
        item.refusal = (
            f"{BOUND_UNSUPPORTED}{name}{tuple(dims)} at node {item.name!r}: it moves the "
            f"batch dimension; {FIX}"
        )
        return
    item.kind = "affine"
    item.magnitude = item.forward


def _reshape(item: Node) -> None:
    """flatten/view/reshape keeping the batch dimension: recomputed per batch from the
    traced per-sample shape, so the trace's batch size never sticks."""
    item.kind = "affine"

    def forward(x: torch.Tensor, *shape_values: Any) -> torch.Tensor:
        return x.reshape(x.shape[0], *item.shape)

    item.forward = forward
    item.magnitude = _ReshapeMagnitude(item)


class _ReshapeMagnitude:
    """A reshape's magnitude; its type marks the one operation that may read shape
    values (it ignores them)."""

    def __init__(self, item: Node) -> None:
        self.item = item

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        return r.reshape(r.shape[0], *self.item.shape)


def _arithmetic(
    item: Node, node: fx.Node, operation: str, args: tuple, bounded: list[str], constants: dict
) -> None:
    """add/sub of two bounded branches or of a constant; mul/div by a constant."""
    if node.kwargs or len(args) != 2 or len(item.inputs) != len(bounded):
        return
    left, right = (isinstance(a, fx.Node) and a.name in bounded for a in args)

    def constant(a: Any) -> Any:
        return constants[a.name] if isinstance(a, fx.Node) else a

    if left and right:
        if operation not in ("add", "sub"):
            return
        item.kind = "affine"
        same = args[0].name == args[1].name
        sign = -1.0 if operation == "sub" else 1.0
        if same:
            item.forward = lambda x: x + sign * x
            item.magnitude = lambda r: r * abs(1 + sign)
        else:
            item.forward = lambda x, y: x + sign * y
            item.magnitude = lambda r, s: r + s
        return
    c = constant(args[1] if left else args[0])
    if isinstance(c, torch.Tensor):
        c = c.detach()
    elif not isinstance(c, (int, float)):
        return
    if operation == "add":
        item.forward = lambda x: x + c
        item.magnitude = lambda r: r + 0 * c
    elif operation == "sub":
        item.forward = (lambda x: x - c) if left else (lambda x: c - x)
        item.magnitude = lambda r: r + 0 * c
    elif operation == "mul":
        magnitude = abs(c)
        item.forward = lambda x: x * c
        item.magnitude = lambda r: r * magnitude
    elif operation == "div" and left:
        magnitude = abs(c)
        item.forward = lambda x: x / c
        item.magnitude = lambda r: r / magnitude
    else:
        return
    item.kind = "affine"


def _check_float32(network: nn.Module) -> None:
    """Bounds are computed in float32: a network holding other floats is refused."""
    for name, value in [*network.named_parameters(), *network.named_buffers()]:
        if value.is_floating_point() and value.dtype != torch.float32:
            raise Unsupported(
                f"{BOUND_UNSUPPORTED}{value.dtype} weights ({name!r}); bounds are computed in "
                "float32: serve the network in float32"
            )


def _generic(
    root: fx.GraphModule, node: fx.Node, names: tuple[str, ...], constants: dict
) -> Callable[..., Any]:
    """The node's own operation on the values of `names` and the constants (a module
    by its forward, so no hook runs)."""

    def run(*values: Any) -> Any:
        given = dict(zip(names, values, strict=True))

        def value(n: fx.Node) -> Any:
            return given[n.name] if n.name in given else constants[n.name]

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_module":
            return root.get_submodule(str(node.target)).forward(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        self_value, *rest = args
        return getattr(self_value, str(node.target))(*rest, **kwargs)

    return run


def _attribute(root: nn.Module, path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part)
    return value.detach() if isinstance(value, torch.Tensor) else value


def _type_name(value: Any) -> str:
    cls = value if isinstance(value, type) else type(value)
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(root: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        return f"layer {str(node.target)!r} ({_type_name(module)})"
    scopes = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    where = f" in {scopes[-1]!r}" if scopes else " in the network's forward"
    if node.op == "call_method":
        return f"method {str(node.target)!r}{where} (torch.Tensor.{node.target})"
    name = getattr(node.target, "__name__", str(node.target))
    module = getattr(node.target, "__module__", None) or "builtins"
    return f"function {name!r}{where} ({module}.{name})"


def _refusal(root: fx.GraphModule, node: fx.Node) -> str:
    return f"{BOUND_UNSUPPORTED}{_describe(root, node)}; supported: {SUPPORTED}; {FIX}"


def _probe(sample: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A seeded input of the sample's shape and dtype for the load-time checks."""
    generator = torch.Generator().manual_seed(seed)
    if sample.dtype == torch.uint8:
        return torch.randint(0, 256, sample.shape, generator=generator, dtype=torch.uint8)
    return torch.randn(sample.shape, generator=generator).to(sample.dtype)
