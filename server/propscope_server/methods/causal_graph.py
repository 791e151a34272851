"""The causal explanatory graph (BuildGraph, arXiv 2305.08950 with PropGrad's test):
which hidden channels of an open model carry its decision for an image, and which
channel-to-channel paths, measured by gradual do-interventions inside the model.

Per image (target: the requested class, else the predicted one): a clean pass; a
pre-screen of wide layers (one full ablation per channel); each node's path
t = 0..1 toward its baseline, scored by E|dp| and a permutation test, BH across the
image's nodes; edges between kept nodes of consecutive chosen layers, the largest
direct effects first, scored on the path-specific curve (the downstream channel
clamped to its clean map). Over several images, the task-level graph with bootstrap
frequencies; optionally the repair: the significant channels an editor's property
moves most, with their baseline as the ablation value.

"Kept" is "relevant" everywhere (edge candidates, the task graph, the clients' DOT):
significant and a large enough effect. The permutation test measures how orderly a
curve is, and a gradual intervention draws an orderly curve however small its effect
(a saturated image's channels move p by < 1e-3 and come out significant), so
significance alone keeps noise. A request whose path is too short for its test to
reach alpha is refused (plan), not answered with an empty graph.

Everything the open-model contract offers travels as extra named inputs beside the
preprocessed image batch (docs: the design of issue 17, section 1)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np

from propscope_server import metrics
from propscope_server.backends.preprocessing import to_model_input
from propscope_server.config import Settings
from propscope_server.errors import (
    BackendError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from propscope_server.graph_domain import (
    BASELINE_CONFIG,
    BASELINE_REFERENCE,
    BASELINE_ZERO,
    BASELINES,
    MAX_BOOTSTRAP,
    MAX_EDGES,
    MAX_NODES_PER_LAYER,
    MAX_REFERENCE_IMAGES,
    MAX_REPAIR_SHARE,
    MIN_REFERENCE_IMAGES,
    MIN_STEPS,
    EdgeResult,
    GraphAccepted,
    GraphDone,
    GraphProgress,
    GraphSpec,
    Layer,
    NodeResult,
    Repair,
    RepairChannel,
    TaskEdge,
    TaskGraph,
    TaskNode,
)
from propscope_server.inference import Inference, ModelDescription
from propscope_server.methods import require
from propscope_server.methods.base import require_inputs
from propscope_server.open_contract import INTERVENE, OPTIONAL_INPUTS, OPTIONAL_OUTPUTS, PATCH
from propscope_server.orchestration.classifier import (
    DETECTED_SOURCE,
    PlannedClassifier,
    forward_rows,
    plan_classifier,
    probabilities,
    same_shape_runs,
)
from propscope_server.orchestration.explain import PlannedEditor, plan_editor
from propscope_server.orchestration.runner import Finished, with_progress
from propscope_server.scoring import causal_graph as scoring
from propscope_server.threads import in_thread

METHOD = "causal_graph"
# The open-model contract's names (open_contract.py) this method sends and reads.
INTERVENE_LAYER, INTERVENE_CHANNEL, INTERVENE_STRENGTH, INTERVENE_BASELINE = INTERVENE
PATCH_LAYER, PATCH_CHANNEL, PATCH_VALUE = PATCH
ACTIVATION_LAYER = "ACTIVATION_LAYER"
CHANNEL_MEANS = "CHANNEL_MEANS"
ACTIVATIONS = "ACTIVATIONS"
REQUIRED_INPUTS = (*INTERVENE, *PATCH, ACTIVATION_LAYER)
REQUIRED_OUTPUTS = (CHANNEL_MEANS, ACTIVATIONS)
METHOD_PURPOSE = "a causal graph (interventions on channels, activations)"
assert set(REQUIRED_INPUTS) <= set(OPTIONAL_INPUTS)
assert set(REQUIRED_OUTPUTS) <= set(OPTIONAL_OUTPUTS)


@dataclass(frozen=True)
class GraphImage:
    """One image after its clean pass."""

    model_input: np.ndarray  # [1, ...] as the model takes it
    target: int
    p0: float
    means: np.ndarray  # [sum C] clean CHANNEL_MEANS over every declared layer


@dataclass(frozen=True)
class GraphPlan:
    spec: GraphSpec
    classifier: PlannedClassifier
    layers: tuple[Layer, ...]  # chosen, network order
    indices: tuple[int, ...]  # each chosen layer's index in the model's declared layers
    starts: tuple[int, ...]  # each declared layer's first entry in CHANNEL_MEANS, then sum C
    total_channels: int  # sum C over every declared layer
    baselines: np.ndarray  # [sum C] b_c
    baseline_source: str
    images: tuple[GraphImage, ...]
    planned_passes: int
    passes_done: int  # in planning: output-kind detection, clean and reference passes
    warnings: tuple[str, ...]
    repair_editor: PlannedEditor | None  # the repair property's
    deadline: float | None
    started: float


@dataclass
class _Counter:
    done: int
    total: int
    emit: Callable[[object], None]

    def add(self, passes: int) -> None:
        self.done += passes
        self.emit(GraphProgress(self.done, self.total))


@dataclass(frozen=True)
class _ImageGraph:
    """What the task graph and the repair need of one image's graph."""

    target: int
    nodes: dict[int, tuple[bool, bool, float]]  # flat channel -> (significant, relevant, score)
    edges: dict[tuple[int, int], tuple[bool, bool, float]]  # (flat source, flat target) -> same
    warning: str | None = None  # scoring.saturation_warning: no node could be relevant


def _check_spec(spec: GraphSpec, settings: Settings) -> None:
    """Every refusal of the request's own values, naming the field."""
    limits = settings.limits

    def bounded(value: float, low: float, high: float, field: str, why: str = "") -> None:
        if not low <= value <= high:
            raise InvalidArgument(
                f"{field} is {value}; it must be in [{low}, {high}]{why}", field=field
            )

    if not spec.images:
        raise InvalidArgument("images is empty; give at least one image", field="images")
    if len(spec.images) > limits.max_graph_images:
        raise InvalidArgument(
            f"images has {len(spec.images)} images; the limit max_graph_images is "
            f"{limits.max_graph_images} per request",
            field="images",
        )
    bounded(spec.steps, MIN_STEPS, limits.max_steps, "steps", " (the limit max_steps)")
    if spec.baseline not in BASELINES:
        raise InvalidArgument(
            f"baseline {spec.baseline!r} is not one of {', '.join(BASELINES)}", field="baseline"
        )
    if not 0.0 < spec.alpha < 1.0:
        raise InvalidArgument(f"alpha is {spec.alpha}; it must be in (0, 1)", field="alpha")
    bounded(
        spec.permutations,
        limits.min_permutations,
        limits.max_permutations,
        "permutations",
        " (the limits min_permutations, max_permutations)",
    )
    bounded(spec.min_probability_change, 0.0, 1.0, "min_probability_change")
    bounded(spec.nodes_per_layer, 1, MAX_NODES_PER_LAYER, "nodes_per_layer")
    bounded(spec.max_edges, 1, MAX_EDGES, "max_edges")
    if not 0.0 < spec.min_share <= 1.0:
        raise InvalidArgument(
            f"min_share is {spec.min_share}; it must be in (0, 1]", field="min_share"
        )
    bounded(spec.bootstrap, 1, MAX_BOOTSTRAP, "bootstrap")
    if not 0.0 < spec.repair_max_share <= MAX_REPAIR_SHARE:
        raise InvalidArgument(
            f"repair_max_share is {spec.repair_max_share}; it must be in (0, {MAX_REPAIR_SHARE}]",
            field="repair_max_share",
        )
    references = len(spec.reference_images)
    if references and spec.baseline != "mean":
        raise InvalidArgument(
            f"reference_images apply to the mean baseline only; with baseline {spec.baseline} "
            f"leave them out (got {references})",
            field="reference_images",
        )
    if references and not MIN_REFERENCE_IMAGES <= references <= MAX_REFERENCE_IMAGES:
        raise InvalidArgument(
            f"reference_images has {references} images; a mean baseline needs "
            f"{MIN_REFERENCE_IMAGES} to {MAX_REFERENCE_IMAGES}",
            field="reference_images",
        )
    prop = spec.repair_property
    if prop is not None and (prop.editor is None or prop.region is not None):
        raise InvalidArgument(
            f"repair_property {prop.name!r}: the repair follows an editor's path over every "
            "image; give an editor (no provided path, no region)",
            field="repair_property.editor",
        )


def _check_reachable(spec: GraphSpec, max_steps: int) -> str:
    """Refuse a path length whose test cannot reach alpha: every node and edge would come
    out not significant whatever the model does (5 points: p >= 0.067 even for the most
    ordered curve), a graph that silently finds nothing. When only a straight line cannot
    reach it, the warning to state: most channels' curves are near-linear, so they come
    out not significant for the path length alone (synth_hue at steps 5: every node
    p = 0.05, q = 0.068)."""
    best = scoring.best_p_value(spec.steps, spec.permutations)
    if best < spec.alpha:
        line_best = scoring.best_p_value(spec.steps, spec.permutations, line=True)
        if line_best < spec.alpha:
            return ""
        line = scoring.fewest_reachable_steps(spec.permutations, spec.alpha, max_steps, line=True)
        more = f"; steps >= {line} let a straight line reach it" if line else ""
        return (
            f"steps is {spec.steps}: a straight-line curve of {spec.steps + 1} points gets at "
            f"best p = {line_best:.3g}, not below alpha {spec.alpha:g}, so channels whose "
            f"probability moves near-linearly come out not significant for the path's "
            f"length alone{more}"
        )
    fewest = scoring.fewest_reachable_steps(spec.permutations, spec.alpha, max_steps)
    line = scoring.fewest_reachable_steps(spec.permutations, spec.alpha, max_steps, line=True)
    if fewest is None:
        fix = f"no steps up to the limit max_steps ({max_steps}) can; raise permutations or alpha"
    elif line is not None and line > fewest:
        fix = f"use steps >= {fewest} (>= {line} for a straight-line curve to reach it)"
    else:
        fix = f"use steps >= {fewest}"
    raise InvalidArgument(
        f"steps is {spec.steps}: a path of {spec.steps + 1} points gives at best p = {best:.3g} "
        f"with {spec.permutations} permutations (the most ordered curve), not below alpha "
        f"{spec.alpha:g}, so no node or edge could be significant; {fix}",
        field="steps",
    )


def _choose_layers(spec: GraphSpec, model: ModelDescription) -> tuple[int, ...]:
    """Indices of the chosen layers in network order; unknown names listing the known."""
    if not model.layers:
        raise FailedPrecondition(
            f"model {model.name!r} declares no layers (propscope.layers in its config.pbtxt); "
            "a causal graph needs the hidden layers it may intervene on",
            field="layers",
        )
    names = [layer.name for layer in model.layers]
    if not spec.layers:
        return tuple(range(len(names)))
    unknown = [name for name in spec.layers if name not in names]
    if unknown:
        raise InvalidArgument(
            f"layers: model {model.name!r} has no layer {', '.join(map(repr, unknown))}; "
            f"it declares {', '.join(names)}",
            field="layers",
        )
    if len(set(spec.layers)) != len(spec.layers):
        raise InvalidArgument("layers names a layer twice", field="layers")
    return tuple(sorted(names.index(name) for name in spec.layers))


class CausalGraph:
    """The BuildGraph RPC's method: GraphAccepted, GraphProgress, per image its
    NodeResults then EdgeResults, TaskGraph (several images), Repair (when asked),
    GraphDone."""

    def __init__(self, inference: Inference, settings: Settings) -> None:
        self._inference = inference
        self._settings = settings

    async def plan(self, spec: GraphSpec, deadline: float | None) -> GraphPlan:
        started = time.perf_counter()
        _check_spec(spec, self._settings)
        short_path = await in_thread(_check_reachable, spec, self._settings.limits.max_steps)
        described = await self._inference.describe(
            spec.classifier.name, spec.classifier.version, deadline
        )
        if described.role != "editor" and not described.config_problem:
            # Before plan_classifier, whose output-kind detection may run a forward pass:
            # a black-box model or an unknown layer is refused with nothing computed (an
            # editor or a config problem is plan_classifier's own refusal).
            require(METHOD, described)
            require_inputs(described, (*REQUIRED_INPUTS, *REQUIRED_OUTPUTS), METHOD_PURPOSE)
            _choose_layers(spec, described)
        ref = dataclasses.replace(spec.classifier, target_class=spec.target)
        classifier = await plan_classifier(
            self._inference, ref, spec.images[0], self._settings, deadline
        )
        model = classifier.model
        indices = _choose_layers(spec, model)
        starts = np.cumsum([0] + [layer.channels for layer in model.layers])
        layers = tuple(model.layers[i] for i in indices)
        total_channels = int(starts[-1])
        warnings = [*classifier.warnings, *filter(None, [short_path])]
        source = BASELINE_ZERO
        if spec.baseline == "mean":
            if spec.reference_images:
                source = BASELINE_REFERENCE
            elif all(layer.name in model.channel_means for layer in layers):
                source = BASELINE_CONFIG
            else:
                raise InvalidArgument(
                    f"baseline mean: model {model.name!r} declares no channel means "
                    "(propscope.channel_means) for "
                    + ", ".join(x.name for x in layers if x.name not in model.channel_means)
                    + f"; give {MIN_REFERENCE_IMAGES} to {MAX_REFERENCE_IMAGES} "
                    "reference_images or choose baseline zero",
                    field="reference_images",
                )
        repair_editor = None
        if spec.repair_property is not None:
            repair_editor = await plan_editor(
                self._inference, spec.repair_property, "repair_property.editor", deadline
            )
        references = len(spec.reference_images) if source == BASELINE_REFERENCE else 0
        # The pass that detected an undeclared output kind ran on Triton: counted, so
        # that GraphDone.passes equals Triton's inference count.
        detected = int(DETECTED_SOURCE in classifier.preprocessing_sources)
        planned = detected + scoring.planned_passes(
            len(spec.images),
            [layer.channels for layer in layers],
            spec.nodes_per_layer,
            spec.steps,
            spec.max_edges,
            references,
            repair_editor is not None,
        )
        limit = self._settings.limits.max_graph_passes
        if planned > limit:
            raise ResourceExhausted(
                f"the graph needs up to {planned} forward passes; the limit max_graph_passes "
                f"is {limit} per request; lower the cost with fewer images or layers, fewer "
                "steps, a smaller nodes_per_layer (pre-screens wide layers) or max_edges"
            )
        baselines = np.zeros(total_channels)
        if source == BASELINE_CONFIG:
            for layer, index in zip(layers, indices, strict=True):
                baselines[starts[index] : starts[index + 1]] = model.channel_means[layer.name]
        if references:
            reference_means = (
                await self._clean(classifier, spec.reference_images, deadline, total_channels)
            )[2]
            baselines = reference_means.mean(axis=0)
        inputs, raw, clean_means = await self._clean(
            classifier, spec.images, deadline, total_channels
        )
        targets = raw.argmax(axis=1) if spec.target is None else np.full(len(raw), spec.target)
        p0 = probabilities(classifier, raw)[np.arange(len(raw)), targets]
        images = [
            GraphImage(inputs[i], int(targets[i]), float(p0[i]), clean_means[i])
            for i in range(len(inputs))
        ]
        return GraphPlan(
            spec=spec,
            classifier=classifier,
            layers=layers,
            indices=indices,
            starts=tuple(int(start) for start in starts),
            total_channels=total_channels,
            baselines=baselines,
            baseline_source=source,
            images=tuple(images),
            planned_passes=planned,
            passes_done=detected + references + len(images),
            warnings=tuple(warnings),
            repair_editor=repair_editor,
            deadline=deadline,
            started=started,
        )

    async def _clean(
        self,
        classifier: PlannedClassifier,
        images: tuple[np.ndarray, ...],
        deadline: float | None,
        total_channels: int,
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """The clean passes of `images`, batched where their model inputs share a shape
        -> (model inputs [1, ...] each, raw outputs [n, classes], CHANNEL_MEANS
        [n, sum C])."""
        inputs = [
            await in_thread(
                to_model_input, image[None], classifier.layout, classifier.preprocessing
            )
            for image in images
        ]
        raws, means = [], []
        for start, stop in same_shape_runs(inputs):
            raw, channel_means = await self._forward(
                classifier, np.concatenate(inputs[start:stop]), {}, stop - start, deadline
            )
            raws.append(raw)
            means.append(channel_means)
        means_array = np.concatenate(means)
        if means_array.shape[1] != total_channels:
            raise BackendError(
                f"model {classifier.model.name!r} returned {means_array.shape[1]} channel "
                f"means; its propscope.layers declare {total_channels}"
            )
        return inputs, np.concatenate(raws), means_array

    async def _forward(
        self,
        classifier: PlannedClassifier,
        model_input: np.ndarray,
        extra: dict[str, np.ndarray],
        rows: int,
        deadline: float | None,
        counter: _Counter | None = None,
        outputs: tuple[str, ...] = (CHANNEL_MEANS,),
    ) -> tuple[np.ndarray, ...]:
        """forward_rows with graph_concurrency batches in flight, counted by `counter`."""
        return await forward_rows(
            self._inference,
            classifier,
            model_input,
            extra,
            rows,
            outputs,
            deadline,
            counter.add if counter is not None else None,
            self._settings.graph_concurrency,
        )

    async def run(self, plan: GraphPlan) -> AsyncIterator[object]:
        spec = plan.spec
        model = plan.classifier.model
        yield GraphAccepted(
            model=model.name,
            model_version=model.version,
            layers=plan.layers,
            steps=spec.steps,
            images=len(plan.images),
            targets=tuple(image.target for image in plan.images),
            target_labels=tuple(plan.classifier.label(image.target) for image in plan.images),
            baseline_source=plan.baseline_source,
            planned_passes=plan.planned_passes,
            warnings=plan.warnings,
        )

        async def work(emit: Callable[[object], None]) -> GraphDone:
            counter = _Counter(plan.passes_done, plan.planned_passes, emit)
            graphs = []
            for index in range(len(plan.images)):
                graphs.append(await self._image(plan, index, counter))
            task = _task_graph(plan, graphs) if len(graphs) > 1 else None
            if task is not None:
                emit(task)
            if plan.repair_editor is not None:
                emit(await self._repair(plan, graphs, task, counter))
            metrics.FORWARD_PASSES.labels(method=METHOD).inc(counter.done)
            return GraphDone(
                total_s=time.perf_counter() - plan.started,
                passes=counter.done,
                warnings=tuple(graph.warning for graph in graphs if graph.warning),
            )

        async with aclosing(with_progress(work)) as events:
            async for event in events:
                yield event.value if isinstance(event, Finished) else event

    async def _interventions(
        self,
        plan: GraphPlan,
        image: GraphImage,
        layer: int,
        channels: np.ndarray,
        strengths: np.ndarray,
        counter: _Counter,
        patch: tuple[int, np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One pass per row: channel `channels[r]` of declared layer `layer` moved by
        `strengths[r]` toward its baseline (and, with `patch` = (downstream layer,
        channels, values [rows, n]), that channel set to its values) -> (target
        probability [rows], CHANNEL_MEANS [rows, sum C])."""
        rows = len(channels)
        baselines = plan.baselines[plan.starts[layer] + channels]
        extra = {
            INTERVENE_LAYER: np.full((rows, 1), layer, np.int32),
            INTERVENE_CHANNEL: channels.astype(np.int32).reshape(rows, 1),
            INTERVENE_STRENGTH: strengths.astype(np.float32).reshape(rows, 1),
            INTERVENE_BASELINE: baselines.astype(np.float32).reshape(rows, 1),
        }
        if patch is not None:
            patch_layer, patch_channels, values = patch
            extra[PATCH_LAYER] = np.full((rows, 1), patch_layer, np.int32)
            extra[PATCH_CHANNEL] = patch_channels.astype(np.int32).reshape(rows, 1)
            extra[PATCH_VALUE] = values.astype(np.float32)
        raw, means = await self._forward(
            plan.classifier, image.model_input, extra, rows, plan.deadline, counter
        )
        return probabilities(plan.classifier, raw)[:, image.target], means

    async def _image(self, plan: GraphPlan, index: int, counter: _Counter) -> _ImageGraph:
        """One image's nodes and edges, emitted as they are decided."""
        spec, image = plan.spec, plan.images[index]
        steps = spec.steps
        emit = counter.emit
        t = np.arange(steps + 1) / steps
        # Per tested node (flat channel): its curve [S + 1] and CHANNEL_MEANS at t = 1.
        curves: dict[int, np.ndarray] = {}
        means_at_one: dict[int, np.ndarray] = {}
        prescreened: dict[int, float] = {}
        for layer, declared in zip(plan.indices, plan.layers, strict=True):
            start = plan.starts[layer]
            count = declared.channels
            nodes = np.arange(count)
            full_ablation: dict[int, tuple[float, np.ndarray]] = {}
            if count > spec.nodes_per_layer:
                p_one, means = await self._interventions(
                    plan, image, layer, nodes, np.ones(count), counter
                )
                for channel in nodes:
                    prescreened[start + channel] = float(p_one[channel] - image.p0)
                    full_ablation[int(channel)] = (float(p_one[channel]), means[channel])
                nodes = scoring.prescreen(p_one - image.p0, spec.nodes_per_layer)
            last = steps if not full_ablation else steps - 1
            rows_channels = np.repeat(nodes, last)
            rows_strengths = np.tile(t[1 : last + 1], len(nodes))
            p_path, means = await self._interventions(
                plan, image, layer, rows_channels, rows_strengths, counter
            )
            p_path = p_path.reshape(len(nodes), last)
            means = means.reshape(len(nodes), last, -1)
            for row, channel in enumerate(nodes):
                flat = start + int(channel)
                if full_ablation:
                    p_one, means_one = full_ablation[int(channel)]
                    curves[flat] = np.concatenate([[image.p0], p_path[row], [p_one]])
                    means_at_one[flat] = means_one
                else:
                    curves[flat] = np.concatenate([[image.p0], p_path[row]])
                    means_at_one[flat] = means[row, -1]
        tested = sorted(curves)
        rng = np.random.default_rng([spec.seed, index, 0])
        scores, p_values = scoring.score_curves(
            np.array([curves[f] for f in tested]), spec.permutations, rng
        )
        q = scoring.q_values(p_values)
        nodes_out: dict[int, tuple[bool, bool, float]] = {}
        relevant_nodes: set[int] = set()
        by_flat = {flat: k for k, flat in enumerate(tested)}
        for layer, declared in zip(plan.indices, plan.layers, strict=True):
            start = plan.starts[layer]
            for channel in range(declared.channels):
                flat = start + channel
                k = by_flat.get(flat)
                if k is None:
                    emit(
                        NodeResult(
                            image=index,
                            layer=declared.name,
                            channel=channel,
                            screened_out=True,
                            prescreen_change=abs(prescreened[flat]),
                            score=0.0,
                            p_value=1.0,
                            q_value=1.0,
                            probability_change=prescreened[flat],
                            significant=False,
                            relevant=False,
                        )
                    )
                    continue
                curve = curves[flat]
                change = float(curve[-1] - curve[0])
                significant = bool(q[k] < spec.alpha)
                relevant = significant and abs(change) >= spec.min_probability_change
                if relevant:
                    relevant_nodes.add(flat)
                nodes_out[flat] = (significant, relevant, float(scores[k]))
                emit(
                    NodeResult(
                        image=index,
                        layer=declared.name,
                        channel=channel,
                        screened_out=False,
                        prescreen_change=abs(prescreened.get(flat, 0.0)),
                        score=float(scores[k]),
                        p_value=float(p_values[k]),
                        q_value=float(q[k]),
                        probability_change=change,
                        significant=significant,
                        relevant=relevant,
                        curve=tuple(float(v) for v in curve),
                    )
                )
        edges = await self._edges(plan, index, curves, means_at_one, relevant_nodes, counter)
        largest = max(
            [abs(curves[f][-1] - curves[f][0]) for f in tested]
            + [abs(c) for c in prescreened.values()]
        )
        warning = scoring.saturation_warning(
            index,
            image.p0,
            float(largest),
            spec.min_probability_change,
            sum(significant for significant, _, _ in nodes_out.values()),
            len(tested),
        )
        return _ImageGraph(image.target, nodes_out, edges, warning)

    async def _edges(
        self,
        plan: GraphPlan,
        index: int,
        curves: dict[int, np.ndarray],
        means_at_one: dict[int, np.ndarray],
        kept: set[int],
        counter: _Counter,
    ) -> dict[tuple[int, int], tuple[bool, bool, float]]:
        """Edges between kept (relevant) nodes of consecutive chosen layers, the largest
        |direct effect| first, scored on d(t) = p_total(t) - p_clamped(t); relevant when
        significant and |d(1)| >= PATH_EFFECT_SHARE * min_probability_change. A node too
        small to matter gets no edges: on a saturated image (p0 > 0.999) every channel's
        curve is orderly but moves p by < 1e-3, and its edges would spend S passes each
        on nothing."""
        spec, image = plan.spec, plan.images[index]
        steps = spec.steps
        # Candidates: (upstream layer, upstream flat, downstream layer, downstream flat).
        candidates: list[tuple[int, int, int, int]] = []
        for up, down in zip(plan.indices, plan.indices[1:], strict=False):
            ups = [f for f in sorted(kept) if _layer_of(plan, f) == up]
            downs = [f for f in sorted(kept) if _layer_of(plan, f) == down]
            candidates += [(up, u, down, v) for u in ups for v in downs]
        direct = np.array([means_at_one[u][v] - image.means[v] for _, u, _, v in candidates])
        chosen = [candidates[k] for k in scoring.choose_edges(direct, spec.max_edges)]
        direct_of = {(c[1], c[3]): float(d) for c, d in zip(candidates, direct, strict=True)}
        t = np.arange(1, steps + 1) / steps
        clamped: dict[tuple[int, int], np.ndarray] = {}
        for down in sorted({edge[2] for edge in chosen}):
            edges = [edge for edge in chosen if edge[2] == down]
            _, maps = await self._forward(
                plan.classifier,
                image.model_input,
                {ACTIVATION_LAYER: np.full((1, 1), down, np.int32)},
                1,
                plan.deadline,
                counter,
                outputs=(ACTIVATIONS,),
            )
            channels = plan.classifier.model.layers[down].channels
            maps = maps[0].reshape(channels, -1)  # [C, H * W] the clean maps
            starts = plan.starts
            for up in sorted({edge[0] for edge in edges}):
                group = [edge for edge in edges if edge[0] == up]
                sources = np.repeat([u - starts[up] for _, u, _, _ in group], steps)
                targets = np.repeat([v - starts[down] for _, _, _, v in group], steps)
                p_clamped, _ = await self._interventions(
                    plan,
                    image,
                    up,
                    np.asarray(sources),
                    np.tile(t, len(group)),
                    counter,
                    patch=(down, np.asarray(targets), maps[targets]),
                )
                p_clamped = p_clamped.reshape(len(group), steps)
                for row, (_, u, _, v) in enumerate(group):
                    clamped[(u, v)] = np.concatenate([[image.p0], p_clamped[row]])
        if not chosen:
            return {}
        d = np.array([curves[u] - clamped[(u, v)] for _, u, _, v in chosen])
        rng = np.random.default_rng([spec.seed, index, 1])
        scores, p_values = scoring.score_curves(d, spec.permutations, rng)
        q = scoring.q_values(p_values)
        layers = plan.classifier.model.layers
        floor = scoring.PATH_EFFECT_SHARE * spec.min_probability_change
        out: dict[tuple[int, int], tuple[bool, bool, float]] = {}
        for k, (up, u, down, v) in enumerate(chosen):
            significant_edge = bool(q[k] < spec.alpha)
            relevant_edge = significant_edge and abs(d[k, -1]) >= floor
            out[(u, v)] = (significant_edge, relevant_edge, float(scores[k]))
            counter.emit(
                EdgeResult(
                    image=index,
                    source_layer=layers[up].name,
                    source_channel=u - plan.starts[up],
                    target_layer=layers[down].name,
                    target_channel=v - plan.starts[down],
                    direct_effect=direct_of[(u, v)],
                    path_effect=float(d[k, -1]),
                    score=float(scores[k]),
                    p_value=float(p_values[k]),
                    q_value=float(q[k]),
                    significant=significant_edge,
                    relevant=relevant_edge,
                    curve=tuple(float(x) for x in d[k]),
                    clamped_curve=tuple(float(x) for x in clamped[(u, v)]),
                )
            )
        return out

    async def _repair(
        self,
        plan: GraphPlan,
        graphs: list[_ImageGraph],
        task: TaskGraph | None,
        counter: _Counter,
    ) -> Repair:
        """The channels the repair property moves most among the graph's significant
        ones (on >= min_share of the task graph's images), each with its baseline as the
        ablation value. Significant, not relevant: a channel too small to move p alone
        can carry the property jointly with the others the repair ablates."""
        spec = plan.spec
        editor = plan.repair_editor
        assert editor is not None and spec.repair_property is not None
        layers = plan.classifier.model.layers
        candidates = np.zeros(plan.total_channels, dtype=bool)
        score_of = np.zeros(plan.total_channels)
        used = [graphs[i] for i in (task.images if task is not None else (0,))]
        for flat in sorted({flat for graph in used for flat in graph.nodes}):
            tested = [graph.nodes[flat] for graph in used if flat in graph.nodes]
            share = sum(significant for significant, _, _ in tested) / len(used)
            candidates[flat] = share >= spec.min_share - 1e-12
            score_of[flat] = float(np.mean([score for _, _, score in tested]))
        strengths = np.arange(1, spec.steps + 1, dtype=np.float32) / spec.steps
        path_means = []
        for original in spec.images:
            path = await self._inference.edit(
                editor.description,
                original,
                strengths,
                editor.parameters,
                [spec.seed],
                plan.deadline,
            )
            batch = await in_thread(
                to_model_input, path[0], plan.classifier.layout, plan.classifier.preprocessing
            )
            _, means = await self._forward(
                plan.classifier, batch, {}, len(batch), plan.deadline, counter
            )
            path_means.append(means)
        clean = np.stack([image.means for image in plan.images])
        movement = scoring.movements(np.stack(path_means), clean, plan.starts)
        warnings: tuple[str, ...] = ()
        chosen: np.ndarray = np.zeros(0, dtype=int)
        if candidates.any():
            chosen = scoring.repair_choice(
                movement, candidates, spec.repair_max_share, plan.total_channels
            )
        else:
            warnings = ("no channel is significant in the graph: there is nothing to ablate",)
        channels = []
        for flat in chosen:
            layer = _layer_of(plan, int(flat))
            channels.append(
                RepairChannel(
                    layer=layers[layer].name,
                    channel=int(flat) - plan.starts[layer],
                    value=float(plan.baselines[flat]),
                    movement=float(movement[flat]),
                    score=float(score_of[flat]),
                )
            )
        return Repair(
            property=spec.repair_property.name, channels=tuple(channels), warnings=warnings
        )


def _layer_of(plan: GraphPlan, flat: int) -> int:
    """The declared layer holding entry `flat` of the concatenated channel vector."""
    return int(np.searchsorted(plan.starts, flat, side="right")) - 1


def _task_graph(plan: GraphPlan, graphs: list[_ImageGraph]) -> TaskGraph:
    """The nodes and edges kept (relevant: significant and a large enough effect) on >=
    min_share of the images of the graph's class, with seeded bootstrap frequencies."""
    spec = plan.spec
    targets = [graph.target for graph in graphs]
    target = spec.target if spec.target is not None else scoring.majority_class(targets)
    used = [i for i, t in enumerate(targets) if t == target]
    excluded = tuple(i for i, t in enumerate(targets) if t != target)
    rng = np.random.default_rng([spec.seed, 2])
    layers = plan.classifier.model.layers

    def located(flat: int) -> tuple[str, int]:
        layer = _layer_of(plan, flat)
        return layers[layer].name, flat - plan.starts[layer]

    results = []
    for kind in ("nodes", "edges"):
        keys = sorted({key for i in used for key in getattr(graphs[i], kind)})
        relevant = np.zeros((len(used), len(keys)), dtype=bool)
        scores = np.full((len(used), len(keys)), np.nan)
        for row, i in enumerate(used):
            items = getattr(graphs[i], kind)
            for col, key in enumerate(keys):
                if key in items:
                    _, relevant[row, col], scores[row, col] = items[key]
        share, frequency, mean_score = scoring.task_shares(
            relevant, scores, spec.min_share, spec.bootstrap, rng
        )
        kept = [k for k in range(len(keys)) if share[k] >= spec.min_share - 1e-12]
        results.append([(keys[k], share[k], frequency[k], mean_score[k]) for k in kept])
    nodes = tuple(
        TaskNode(*located(key), float(share), float(freq), float(score))
        for key, share, freq, score in results[0]
    )
    edges = tuple(
        TaskEdge(*located(key[0]), *located(key[1]), float(share), float(freq), float(score))
        for key, share, freq, score in results[1]
    )
    return TaskGraph(
        target_class=target,
        target_label=plan.classifier.label(target),
        images=tuple(used),
        nodes=nodes,
        edges=edges,
        min_share=spec.min_share,
        excluded_images=excluded,
    )
