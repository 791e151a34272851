"""Bound propagation through an open model, in pure torch: how far any input of an
l_inf box can push another class's logit above the target's (EVA, docs/eva.md).

The network is traced once (bound_graph.py) into input, affine, ReLU and max pooling
nodes. Two bounds of the margins f_c - f_y over a box:

- IBP: interval arithmetic node by node (affine: centre and radius through |W|;
  ReLU and max pooling are monotone); the margin bound is u_c - l_y.
- CROWN-IBP: IBP's boxes as the intermediate bounds, then the margin rows e_c - e_y
  carried backwards as linear coefficients through the graph (adjoints of the affine
  operations by torch.func.vjp, their biases as A . f(0); summed where a node feeds
  several consumers; ReLU and max pooling by linear relaxations) and concretised at the
  input box. The answer is the elementwise min of IBP and CROWN, both sound.

A row asking for samples also gets a short PGD attack on its box (sign-gradient ascent
on the worst other class's margin from the centre and one random vertex, every iterate
projected into the box): the sampled margin is the max over the uniform points, the
attack's iterates and the centre, a lower bound on the true overlap that the attack
pushes up where uniform points miss a small adversarial region.

A hybrid starts from a declared layer: its box is the elementwise min and max of the
layer's output over those same points (uniform, attack, centre), then verified from
there (not a guarantee: the points may miss the true range).

Float32 throughout, with no outward rounding: the bounds are sound up to float error.

Why ours: auto_LiRPA (0.3 on PyPI) pins torch<1.13 and parses graphs through
torch.onnx internals, so it cannot run with the pinned torch 2.13.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from propscope_server.open_contract import BOUND_ATTACK_STARTS, BOUND_ATTACK_STEPS, BOUND_CROWN
from propscope_server.triton_models.classifiers.bound_graph import BoundGraph, Node

# Floats held by one chunk's coefficient tensors (a margin row carries the numel of
# a node's output); bounds the memory of a bound request whatever its size.
CHUNK_FLOATS = 1 << 24
# Points sampled per forward pass when a row's box is sampled.
SAMPLE_BATCH = 64
# The attack on a sampled row (open_contract: the centre and one random vertex, 20
# steps); its step as a fraction of each element's half-width (20 steps of a quarter
# cross the box 2.5 times, enough to reach a corner from the centre and come back).
ATTACK_STEP = 0.25


@dataclass
class _Rows:
    """The intermediate boxes of a chunk of rows, and which row each margin row is of."""

    lower: dict[str, torch.Tensor] = field(default_factory=dict)
    upper: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, Any] = field(default_factory=dict)


class Cancelled(RuntimeError):
    """The caller cancelled the bound request; nothing is returned."""


class _Seen:
    """What one row's points reached: the max margin per class and, for a hybrid, the
    elementwise range of the source layer's output (starting from the centre's)."""

    def __init__(self, output: str, layer: str | None, target: int, centre: dict) -> None:
        self.output, self.layer, self.target = output, layer, target
        self.best = _row_margins(centre[output], target)
        self.low = self.high = centre[layer] if layer is not None else None

    def __call__(self, values: dict[str, Any]) -> None:
        margins = _row_margins(values[self.output].detach(), self.target)
        self.best = torch.maximum(self.best, margins)
        if self.layer is not None:
            layer = values[self.layer].detach()
            self.low = torch.minimum(self.low, layer.amin(0, keepdim=True))
            self.high = torch.maximum(self.high, layer.amax(0, keepdim=True))


def _never() -> bool:
    return False


class BoundedNetwork(BoundGraph):
    """A traced network's bounds: IBP and CROWN-IBP from the input or from a hybrid's
    sampled layer box, and the sampled margin with its attack."""

    def margins(
        self,
        lower: torch.Tensor,
        upper: torch.Tensor,
        centre: torch.Tensor,
        target: Sequence[int],
        method: Sequence[int],
        layer: Sequence[int],
        samples: Sequence[int],
        seed: Sequence[int],
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row (a box [lower, upper] in the network's input space around `centre`,
        the target class, the method, the layer (-1 = from the input), samples and
        seed): the upper bounds of f_c - f_y for every class c ([B, K], entry y 0) and
        the max of f_c - f_y over the sampled points, the attack's iterates and the
        centre ([B, K]). `cancelled` is asked between rows and sample batches; when it
        says so, Cancelled is raised."""
        for row_layer in sorted(set(int(k) for k in layer)):
            self.check(row_layer)
        cancelled = cancelled or _never
        lower, upper, centre = lower.float(), upper.float(), centre.float()
        classes = self.nodes[self.output].shape[0]
        bounds = torch.zeros(lower.shape[0], classes)
        sampled = torch.zeros(lower.shape[0], classes)
        groups: dict[tuple[int, int], list[int]] = {}
        for row in range(lower.shape[0]):
            groups.setdefault((int(method[row]), int(layer[row])), []).append(row)
        for (row_method, row_layer), rows in groups.items():
            self.check(row_layer)
            source = self.source if row_layer < 0 else self.layer_nodes[row_layer]
            assert source is not None
            needed = self.needed(source)
            per_row = sum(math.prod(self.nodes[n].shape) for n in needed) * 2
            chunk = max(1, CHUNK_FLOATS // max(1, per_row))
            for start in range(0, len(rows), chunk):
                if cancelled():
                    raise Cancelled("the bound request was cancelled")
                index = torch.tensor(rows[start : start + chunk])
                ys = torch.tensor([int(target[r]) for r in index.tolist()])
                boxes, top = self._sample(
                    lower[index], upper[index], centre[index], ys, source,
                    [int(samples[r]) for r in index.tolist()],
                    [int(seed[r]) for r in index.tolist()],
                    cancelled,
                )  # fmt: skip
                sampled[index] = top
                with torch.no_grad():
                    rows_box = self._ibp(needed, source, (lower[index], upper[index]), boxes)
                margin = _margins_of_box(rows_box, self.output, ys)
                if row_method == BOUND_CROWN:
                    margin = torch.minimum(margin, self._crown(needed, source, rows_box, ys))
                # A box so wide that float32 overflows (inf - inf) bounds nothing: +inf.
                bounds[index] = torch.nan_to_num(margin, nan=math.inf)
        return bounds, sampled

    def _sample(
        self,
        lower: torch.Tensor,
        upper: torch.Tensor,
        centre: torch.Tensor,
        target: torch.Tensor,
        source: str,
        samples: Sequence[int],
        seed: Sequence[int],
        cancelled: Callable[[], bool] = _never,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The source's box per row (the input box, or the layer's range over the
        points) and the max margin over the points: the centre, the uniform samples and,
        on a row that samples, the attack's iterates (drawn after the samples from the
        row's generator, so a seed gives the same points)."""
        source_lower, source_upper, tops = [], [], []
        hybrid = source != self.source
        for row in range(lower.shape[0]):
            generator = torch.Generator().manual_seed(seed[row])
            with torch.no_grad():
                values = self.run(centre[row : row + 1])
            seen = _Seen(self.output, source if hybrid else None, int(target[row]), values)
            width = upper[row] - lower[row]
            for begin in range(0, samples[row], SAMPLE_BATCH):
                if cancelled():
                    raise Cancelled("the bound request was cancelled")
                count = min(SAMPLE_BATCH, samples[row] - begin)
                points = lower[row] + width * torch.rand((count, *width.shape), generator=generator)
                with torch.no_grad():
                    seen(self.run(points))
            if samples[row] >= 1:
                self._attack(
                    lower[row], upper[row], centre[row], int(target[row]), generator, seen, cancelled
                )  # fmt: skip
            tops.append(seen.best)
            if hybrid:
                source_lower.append(seen.low)
                source_upper.append(seen.high)
        top = torch.stack(tops)
        if hybrid:
            return (torch.cat(source_lower), torch.cat(source_upper)), top
        return (lower, upper), top

    def _attack(
        self,
        lower: torch.Tensor,
        upper: torch.Tensor,
        centre: torch.Tensor,
        target: int,
        generator: torch.Generator,
        seen: _Seen,
        cancelled: Callable[[], bool],
    ) -> None:
        """PGD on one row's box: from the centre and random vertices, BOUND_ATTACK_STEPS
        sign-gradient steps up the worst other class's margin max_{c != y} f_c - f_y,
        each projected into the box; `seen` gets every iterate's values (continuous
        points: a uint8 input's box is the continuous one the bound covers)."""
        shape = (BOUND_ATTACK_STARTS - 1, *centre.shape)
        vertices = torch.where(torch.rand(shape, generator=generator) < 0.5, lower, upper)
        points = torch.cat([centre.clamp(lower, upper)[None], vertices]).detach()
        step = ATTACK_STEP * (upper - lower) / 2
        for iteration in range(BOUND_ATTACK_STEPS + 1):
            if cancelled():
                raise Cancelled("the bound request was cancelled")
            last = iteration == BOUND_ATTACK_STEPS
            with torch.enable_grad():
                points = points.clone().requires_grad_(not last)
                values = self.run(points)
                seen(values)
                if last:
                    break
                scores = values[self.output]
                margins = scores - scores[:, target : target + 1]
                margins[:, target] = -math.inf
                (gradient,) = torch.autograd.grad(margins.amax(1).sum(), points)
            points = torch.minimum(torch.maximum(points + step * gradient.sign(), lower), upper)
            points = points.detach()

    def _ibp(
        self,
        needed: Sequence[str],
        source: str,
        inputs: tuple[torch.Tensor, torch.Tensor],
        box: tuple[torch.Tensor, torch.Tensor],
    ) -> _Rows:
        """Every needed node's box: the input's, the source's (the same, or a hybrid's
        sampled range), the others by interval arithmetic."""
        rows = _Rows()
        for name in needed:
            item = self.nodes[name]
            if name == source:
                rows.lower[name], rows.upper[name] = box
            elif item.kind == "input":
                rows.lower[name], rows.upper[name] = inputs
            elif item.kind == "shape":
                rows.shapes[name] = item.forward(
                    *[self._value(rows, n, "lower") for n in item.inputs]
                )
            elif item.kind == "affine":
                bounded = [n for n in item.inputs if self.nodes[n].kind != "shape"]
                mids = [(rows.lower[n] + rows.upper[n]) / 2 for n in bounded]
                radii = [(rows.upper[n] - rows.lower[n]) / 2 for n in bounded]
                centre = item.forward(*self._with_shapes(rows, item, mids))
                assert item.magnitude is not None
                radius = item.magnitude(*radii)
                rows.lower[name], rows.upper[name] = centre - radius, centre + radius
            else:  # relu, maxpool: monotone
                (only,) = item.inputs
                rows.lower[name] = item.forward(rows.lower[only])
                rows.upper[name] = item.forward(rows.upper[only])
        return rows

    def _value(self, rows: _Rows, name: str, which: str) -> Any:
        if self.nodes[name].kind == "shape":
            return rows.shapes[name]
        return getattr(rows, which)[name]

    def _with_shapes(self, rows: _Rows, item: Node, bounded: list[torch.Tensor]) -> list[Any]:
        values = iter(bounded)
        return [
            rows.shapes[n] if self.nodes[n].kind == "shape" else next(values) for n in item.inputs
        ]

    def _crown(
        self, needed: Sequence[str], source: str, rows: _Rows, target: torch.Tensor
    ) -> torch.Tensor:
        """Upper bounds of the margins by the backward linear relaxation ([B, K])."""
        classes = self.nodes[self.output].shape[0]
        count = target.shape[0]
        pairs = [(r, c) for r in range(count) for c in range(classes) if c != int(target[r])]
        widest = max(math.prod(self.nodes[n].shape) for n in needed)
        chunk = max(1, CHUNK_FLOATS // (4 * widest))
        result = torch.zeros(count, classes)
        descendants = self.descendants(source)
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            of_row = torch.tensor([r for r, _ in part])
            spec = torch.zeros(len(part), classes)
            spec[torch.arange(len(part)), torch.tensor([c for _, c in part])] = 1.0
            spec[torch.arange(len(part)), target[of_row]] -= 1.0
            bound = self._backward(needed, source, descendants, rows, of_row, spec)
            for (r, c), value in zip(part, bound.tolist(), strict=True):
                result[r, c] = value
        return result

    def _backward(
        self,
        needed: Sequence[str],
        source: str,
        descendants: set[str],
        rows: _Rows,
        of_row: torch.Tensor,
        spec: torch.Tensor,
    ) -> torch.Tensor:
        coefficients: dict[str, torch.Tensor] = {self.output: spec}
        constant = torch.zeros(spec.shape[0])

        def add(name: str, value: torch.Tensor) -> None:
            if name in coefficients:
                coefficients[name] = coefficients[name] + value
            else:
                coefficients[name] = value

        for name in reversed(needed):
            if name not in coefficients:
                continue
            a = coefficients.pop(name)
            item = self.nodes[name]
            if name == source or name not in descendants:
                upper, lower = rows.upper[name][of_row], rows.lower[name][of_row]
                concrete = a.clamp(min=0) * upper + a.clamp(max=0) * lower
                constant = constant + concrete.flatten(1).sum(1)
            elif item.kind == "affine":
                inputs, bias = self._adjoint(rows, item, a)
                constant = constant + bias
                for input_name, value in inputs:
                    add(input_name, value)
            elif item.kind == "relu":
                (only,) = item.inputs
                a_in, bias = _relu_backward(a, rows.lower[only][of_row], rows.upper[only][of_row])
                constant = constant + bias
                add(only, a_in)
            elif item.kind == "maxpool":
                (only,) = item.inputs
                assert item.pool is not None
                a_in, bias = _maxpool_backward(
                    a, rows.lower[only][of_row], rows.upper[only][of_row], item.pool
                )
                constant = constant + bias
                add(only, a_in)
        return constant

    def _adjoint(
        self, rows: _Rows, item: Node, a: torch.Tensor
    ) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
        """The coefficients on an affine node's bounded inputs (its linear part's
        adjoint applied to `a`) and the constant A . f(0)."""
        bounded = [n for n in item.inputs if self.nodes[n].kind != "shape"]
        zeros = [torch.zeros(a.shape[0], *self.nodes[n].shape) for n in bounded]
        with torch.enable_grad():
            output, pull = torch.func.vjp(
                lambda *xs: item.forward(*self._with_shapes(rows, item, list(xs))), *zeros
            )
        gradients = pull(a.reshape(output.shape))
        bias = (a.reshape(output.shape) * output.detach()).flatten(1).sum(1)
        return list(zip(bounded, (g.detach() for g in gradients), strict=True)), bias.detach()


def _relu_backward(
    a: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN's ReLU relaxation: the chord above on an unstable unit, below a slope of 1
    where u >= -l else 0 (the adaptive choice); exact on stable units."""
    active, inactive = lower >= 0, upper <= 0
    unstable = ~(active | inactive)
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    up_slope = torch.where(active, 1.0, torch.where(unstable, upper / width, 0.0))
    up_bias = torch.where(unstable, -up_slope * lower, 0.0)
    low_slope = torch.where(active | (unstable & (upper >= -lower)), 1.0, 0.0)
    positive, negative = a.clamp(min=0), a.clamp(max=0)
    bias = (positive * up_bias).flatten(1).sum(1)
    return positive * up_slope + negative * low_slope, bias


def _pool_windows(
    x: torch.Tensor, pool: nn.MaxPool2d, output: tuple[int, int], fill: float
) -> torch.Tensor:
    """[N, C, H, W] -> every pooling window's values [N, C, k*k, L] (padding = fill)."""
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    padding, dilation = _pair(pool.padding), _pair(pool.dilation)
    n, c, h, w = x.shape
    extra = [
        max(0, (o - 1) * s + d * (k - 1) + 1 - (size + 2 * p))
        for o, s, d, k, size, p in zip(
            output, stride, dilation, kernel, (h, w), padding, strict=True
        )
    ]
    padded = F.pad(
        x.reshape(n * c, 1, h, w),
        (padding[1], padding[1] + extra[1], padding[0], padding[0] + extra[0]),
        value=fill,
    )
    windows = F.unfold(padded, kernel, dilation=dilation, stride=stride)
    return windows.reshape(n, c, kernel[0] * kernel[1], -1)


def _maxpool_backward(
    a: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, pool: nn.MaxPool2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling's relaxation per window: below, the input with the largest lower
    bound; above, that same input when its lower bound reaches every other input's
    upper bound (then the max is exactly it), else the constant largest upper bound."""
    n, c, h, w = lower.shape
    output = (a.shape[2], a.shape[3])
    low = _pool_windows(lower, pool, output, -math.inf)
    high = _pool_windows(upper, pool, output, -math.inf)
    positions = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    places = _pool_windows(positions, pool, output, -1.0)[0, 0].long()  # [k*k, L]
    # Chosen among the window's real inputs even where their lower bounds overflowed
    # to -inf or NaN (a padding position has no input to carry the coefficient to).
    floor = torch.finfo(low.dtype).min
    score = torch.where(places >= 0, low.nan_to_num(nan=floor, neginf=floor), -math.inf)
    chosen = score.argmax(2)  # [N, C, L]
    best_lower = low.gather(2, chosen.unsqueeze(2)).squeeze(2)
    others = high.scatter(2, chosen.unsqueeze(2), -math.inf).amax(2)
    highest = high.amax(2)
    exact = best_lower >= others
    where = places[chosen, torch.arange(chosen.shape[-1])]  # [N, C, L] input positions
    flat = a.reshape(a.shape[0], c, -1)
    positive, negative = flat.clamp(min=0), flat.clamp(max=0)
    coefficient = negative + positive * exact
    bias = (positive * (~exact) * highest).flatten(1).sum(1)
    a_in = torch.zeros(a.shape[0], c, h * w).scatter_add_(2, where, coefficient)
    return a_in.reshape(a.shape[0], c, h, w), bias


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _margins_of_box(rows: _Rows, output: str, target: torch.Tensor) -> torch.Tensor:
    """IBP's margin bounds u_c - l_y ([B, K], entry y 0)."""
    upper, lower = rows.upper[output], rows.lower[output]
    index = torch.arange(target.shape[0])
    margin = upper - lower[index, target].unsqueeze(1)
    margin[index, target] = 0.0
    return margin


def _row_margins(scores: torch.Tensor, target: int) -> torch.Tensor:
    """max over a batch of f_c - f_y ([K], entry y 0)."""
    return (scores - scores[:, target : target + 1]).amax(0)
