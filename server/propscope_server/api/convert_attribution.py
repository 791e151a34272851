"""AttributionService protobuf <-> domain: request validation (every refusal names
the field and the fix), defaults, and the events' messages."""

from __future__ import annotations

import math
import uuid

import numpy as np

from propscope.v1 import attribution_pb2 as apb
from propscope_server import domain
from propscope_server.api.convert import (
    bounded,
    check_name,
    classifier_ref,
    decode_image,
    preprocessing_message,
)
from propscope_server.config import Limits
from propscope_server.errors import InvalidArgument, ResourceExhausted
from propscope_server.methods.attribution import check_grid
from propscope_server.methods.evaluation import metric_passes
from propscope_server.open_contract import MAX_BOUND_SAMPLES
from propscope_server.scoring.sobol import ESTIMATORS

ESTIMATOR_NAMES = {
    apb.SOBOL_ESTIMATOR_UNSPECIFIED: "jansen",
    apb.SOBOL_ESTIMATOR_JANSEN: "jansen",
    apb.SOBOL_ESTIMATOR_HOMMA: "homma",
    apb.SOBOL_ESTIMATOR_JANON: "janon",
    apb.SOBOL_ESTIMATOR_GLEN_ISAACS: "glen_isaacs",
    apb.SOBOL_ESTIMATOR_SALTELLI: "saltelli",
}
KIND_NAMES = {
    apb.Perturbation.KIND_UNSPECIFIED: "inpainting",
    apb.Perturbation.KIND_INPAINTING: "inpainting",
    apb.Perturbation.KIND_BLUR: "blur",
    apb.Perturbation.KIND_AMPLITUDE: "amplitude",
}
BASELINE_NAMES = {
    apb.Perturbation.BASELINE_UNSPECIFIED: "input_zero",
    apb.Perturbation.BASELINE_INPUT_ZERO: "input_zero",
    apb.Perturbation.BASELINE_BLACK: "black",
    apb.Perturbation.BASELINE_MEAN_COLOUR: "mean_colour",
    apb.Perturbation.BASELINE_BLUR: "blur",
}
TARGET_SCORE_NAMES = {
    apb.TARGET_SCORE_UNSPECIFIED: "auto",
    apb.TARGET_SCORE_PROBABILITY: "probability",
    apb.TARGET_SCORE_LOGIT: "logit",
    apb.TARGET_SCORE_LOG_ODDS: "log_odds",
}
# EVA's defaults: EvaSpec's fields, the one definition.
EVA_DEFAULTS = domain.EvaSpec()
BOUND_NAMES = {
    apb.BOUND_METHOD_UNSPECIFIED: EVA_DEFAULTS.bound,
    apb.BOUND_METHOD_IBP: "ibp",
    apb.BOUND_METHOD_CROWN: "crown",
}
EVA_DECISIONS = {
    "certified": apb.EVA_DECISION_CERTIFIED,
    "not_robust": apb.EVA_DECISION_NOT_ROBUST,
    "undecided": apb.EVA_DECISION_UNDECIDED,
}
MAX_SOBOL_GRID = 32
MAX_EVA_GRID = 32
MAX_NB_DESIGN = 1024
MAX_RISE_GRID = 64
MAX_RISE_SAMPLES = 100_000


def _enum(value: int, names: dict[int, str], field: str) -> str:
    if value not in names:
        raise InvalidArgument(f"{field} {value} is not a known value", field=field)
    return names[value]


def sobol_spec(options: apb.SobolOptions, field: str) -> domain.SobolSpec:
    grid = bounded(options.grid_size, 8, 2, MAX_SOBOL_GRID, f"{field}.grid_size", "grid_size")
    nb_design = options.nb_design or 32
    if not 2 <= nb_design <= MAX_NB_DESIGN or nb_design & (nb_design - 1):
        raise InvalidArgument(
            f"{field}.nb_design must be a power of two in 2..{MAX_NB_DESIGN} (Sobol sequences "
            f"are balanced at powers of two), or 0 for the default 32; got {nb_design}",
            field=f"{field}.nb_design",
        )
    estimator = _enum(options.estimator, ESTIMATOR_NAMES, f"{field}.estimator")
    assert estimator in ESTIMATORS
    return domain.SobolSpec(grid, nb_design, estimator, options.per_channel, options.scrambled)


def rise_spec(options: apb.RiseOptions, field: str) -> domain.RiseSpec:
    grid = bounded(options.grid_size, 7, 2, MAX_RISE_GRID, f"{field}.grid_size", "grid_size")
    samples = bounded(
        options.nb_samples, 4000, 1, MAX_RISE_SAMPLES, f"{field}.nb_samples", "nb_samples"
    )
    preservation = (
        options.preservation_probability if options.HasField("preservation_probability") else 0.5
    )
    if not 0.0 < preservation < 1.0:
        raise InvalidArgument(
            f"{field}.preservation_probability must be in (0, 1) (unset for 0.5); got "
            f"{preservation}",
            field=f"{field}.preservation_probability",
        )
    return domain.RiseSpec(grid, samples, float(preservation))


def _decimal_float32(value: float) -> float:
    """The shortest decimal that is this float32 (a caller's 0.001, not 0.0010000000474974513
    in every result); the default, a double, is kept."""
    if value == EVA_DEFAULTS.epsilon:
        return value
    return float(np.format_float_positional(np.float32(value), unique=True))


def eva_spec(options: apb.EvaOptions, field: str) -> domain.EvaSpec:
    grid = bounded(
        options.grid_size, EVA_DEFAULTS.grid, 2, MAX_EVA_GRID, f"{field}.grid_size", "grid_size"
    )
    epsilon = options.epsilon if options.HasField("epsilon") else EVA_DEFAULTS.epsilon
    if not 0.0 < epsilon <= 1.0:  # NaN fails too
        raise InvalidArgument(
            f"{field}.epsilon must be in (0, 1], a fraction of the pixel range (unset for "
            f"{EVA_DEFAULTS.epsilon * 255:g}/255); got {epsilon}",
            field=f"{field}.epsilon",
        )
    check_name(options.hybrid_layer, f"{field}.hybrid_layer")
    samples = bounded(
        options.samples,
        EVA_DEFAULTS.samples,
        1,
        MAX_BOUND_SAMPLES,
        f"{field}.samples",
        "samples per row",
    )
    return domain.EvaSpec(
        grid=grid,
        epsilon=_decimal_float32(epsilon),
        bound=_enum(options.bound, BOUND_NAMES, f"{field}.bound"),
        hybrid_layer=options.hybrid_layer,
        samples=samples,
    )


def _method(
    message: apb.AttributeRequest | apb.StabilityOptions, prefix: str = ""
) -> domain.AttributionMethod:
    """The `method` oneof: RISE or EVA when set, else Sobol (its defaults when unset)."""
    chosen = message.WhichOneof("method")
    if chosen == "rise":
        return rise_spec(message.rise, f"{prefix}rise")
    if chosen == "eva":
        return eva_spec(message.eva, f"{prefix}eva")
    return sobol_spec(message.sobol, f"{prefix}sobol")


def perturbation_spec(message: apb.Perturbation, field: str) -> domain.PerturbationSpec:
    sigma = message.blur_sigma
    if not (math.isfinite(sigma) and 0.0 <= sigma <= 1000.0):
        raise InvalidArgument(
            f"{field}.blur_sigma must be in [0, 1000] pixels (0 for 2% of the input's longer "
            f"side); got {sigma}",
            field=f"{field}.blur_sigma",
        )
    return domain.PerturbationSpec(
        kind=_enum(message.kind, KIND_NAMES, f"{field}.kind"),
        baseline=_enum(message.baseline, BASELINE_NAMES, f"{field}.baseline"),
        blur_sigma=float(sigma),
    )


def _check_model(model: domain.ClassifierRef) -> None:
    if not model.name:
        raise InvalidArgument(
            "model.name is required: the Triton name of the classifier", field="model.name"
        )


def _check_passes(passes: int, limits: Limits, what: str, field: str) -> None:
    if passes > limits.max_forward_passes:
        raise ResourceExhausted(
            f"{what} needs {passes} forward passes; the limit max_forward_passes is "
            f"{limits.max_forward_passes} per request; lower {field}",
            field=field,
        )


def _check_eva_samples(passes: int, limits: Limits, field: str) -> None:
    if passes > limits.max_eva_sample_passes:
        raise ResourceExhausted(
            f"EVA with these options samples {passes} forward passes inside the model; the "
            f"limit max_eva_sample_passes is {limits.max_eva_sample_passes} per request; lower "
            f"{field} (a hybrid samples on each of the grid_size^2 + 1 rows)",
            field=field,
        )


PASSES_FIELDS = {"sobol": "nb_design", "rise": "nb_samples", "eva": "grid_size"}


def attribute_spec(
    request: apb.AttributeRequest, limits: Limits, tenant: str = domain.DEFAULT_TENANT
) -> domain.AttributeSpec:
    check_name(request.request_id, "request_id")
    classifier = classifier_ref(request.model)
    _check_model(classifier)
    method = _method(request)
    name = domain.method_name(method)
    field = f"{name}.{PASSES_FIELDS[name]}"
    _check_passes(method.forward_passes, limits, f"{name} with these options", field)
    target_score = _enum(request.target_score, TARGET_SCORE_NAMES, "target_score")
    if isinstance(method, domain.EvaSpec):
        _check_eva_samples(method.sample_passes, limits, "eva.samples")
        if target_score not in ("auto", "logit"):
            raise InvalidArgument(
                f"target_score {target_score.upper()}: EVA bounds the logit margins "
                "f_c - f_y over the ball, not a probability; leave target_score unspecified "
                "or ask for LOGIT",
                field="target_score",
            )
    image = decode_image(request.image, limits)
    check_grid(method.grid, image.shape[:2], f"{name}.grid_size")
    return domain.AttributeSpec(
        request_id=request.request_id or uuid.uuid4().hex,
        image=image,
        classifier=classifier,
        method=method,
        target_score=target_score,
        perturbation=perturbation_spec(request.perturbation, "perturbation"),
        seed=request.seed,
        tenant=tenant,
    )


def _deletion(options: apb.DeletionOptions, field: str) -> domain.DeletionSpec:
    steps = bounded(options.steps, 10, 1, 256, f"{field}.steps", "steps")
    fraction = (
        options.max_percentage_perturbed if options.HasField("max_percentage_perturbed") else 1.0
    )
    if not 0.0 < fraction <= 1.0:
        raise InvalidArgument(
            f"{field}.max_percentage_perturbed must be in (0, 1] (unset for 1); got {fraction}",
            field=f"{field}.max_percentage_perturbed",
        )
    return domain.DeletionSpec(
        steps, float(fraction), _enum(options.baseline, BASELINE_NAMES, f"{field}.baseline")
    )


def _mu_fidelity(options: apb.MuFidelityOptions) -> domain.MuFidelitySpec:
    field = "mu_fidelity"
    grid = bounded(options.grid_size, 9, 2, 64, f"{field}.grid_size", "grid_size")
    samples = bounded(options.nb_samples, 200, 2, 10_000, f"{field}.nb_samples", "nb_samples")
    subset = options.subset_percent if options.HasField("subset_percent") else 0.2
    if not 0.0 < subset < 1.0:
        raise InvalidArgument(
            f"{field}.subset_percent must be in (0, 1) (unset for 0.2); got {subset}",
            field=f"{field}.subset_percent",
        )
    baseline = _enum(options.baseline, BASELINE_NAMES, f"{field}.baseline")
    return domain.MuFidelitySpec(grid, float(subset), samples, baseline)


def _stability(options: apb.StabilityOptions, limits: Limits) -> domain.StabilitySpec:
    radius = options.radius if options.HasField("radius") else 0.1
    if not 0.0 < radius <= 1.0:
        raise InvalidArgument(
            f"stability.radius must be in (0, 1] (unset for 0.1); got {radius}",
            field="stability.radius",
        )
    samples = bounded(options.nb_samples, 20, 1, 100, "stability.nb_samples", "nb_samples")
    method = _method(options, "stability.")
    if isinstance(method, domain.EvaSpec):
        _check_eva_samples(
            (samples + 1) * method.sample_passes, limits, "stability.eva.samples or nb_samples"
        )
    return domain.StabilitySpec(
        float(radius),
        samples,
        method,
        perturbation_spec(options.perturbation, "stability.perturbation"),
    )


def evaluate_spec(
    request: apb.EvaluateAttributionRequest, limits: Limits, tenant: str = domain.DEFAULT_TENANT
) -> domain.EvaluateSpec:
    check_name(request.request_id, "request_id")
    classifier = classifier_ref(request.model)
    _check_model(classifier)
    metrics: list[domain.MetricSpec] = []
    if request.HasField("deletion"):
        metrics.append(("deletion", _deletion(request.deletion, "deletion")))
    if request.HasField("insertion"):
        metrics.append(("insertion", _deletion(request.insertion, "insertion")))
    if request.HasField("mu_fidelity"):
        metrics.append(("mu_fidelity", _mu_fidelity(request.mu_fidelity)))
    if request.HasField("stability"):
        metrics.append(("stability", _stability(request.stability, limits)))
    if not metrics:
        metrics = [
            ("deletion", domain.DeletionSpec()),
            ("insertion", domain.DeletionSpec()),
            ("mu_fidelity", domain.MuFidelitySpec()),
        ]
    needs_map = [name for name, _ in metrics if name != "stability"]
    image = decode_image(request.image, limits)
    explanation = None
    if request.HasField("explanation"):
        explanation = _map(request.explanation, image.shape[:2])
    elif needs_map:
        raise InvalidArgument(
            f"explanation is required for {', '.join(needs_map)}: the map to score, with the "
            f"image's height and width ({image.shape[0]} x {image.shape[1]})",
            field="explanation",
        )
    for _, options in metrics:
        if isinstance(options, domain.MuFidelitySpec):
            check_grid(options.grid, image.shape[:2], "mu_fidelity.grid_size")
        if isinstance(options, domain.StabilitySpec):
            method = domain.method_name(options.method)
            check_grid(options.method.grid, image.shape[:2], f"stability.{method}.grid_size")
    passes = sum(metric_passes(options) for _, options in metrics)
    _check_passes(passes, limits, "these metrics", "the metrics' samples or steps")
    return domain.EvaluateSpec(
        request_id=request.request_id or uuid.uuid4().hex,
        image=image,
        classifier=classifier,
        explanation=explanation,
        metrics=tuple(metrics),
        target_score=_enum(request.target_score, TARGET_SCORE_NAMES, "target_score"),
        seed=request.seed,
        tenant=tenant,
    )


def _map(message: apb.AttributionMap, image_shape: tuple[int, int]) -> np.ndarray:
    """The caller's map: the image's height and width, finite values."""
    height, width = image_shape
    if (message.height, message.width) != (height, width):
        raise InvalidArgument(
            f"explanation is {message.height} x {message.width}; it must have the image's "
            f"height and width, {height} x {width} (resize your map to the image)",
            field="explanation",
        )
    if len(message.values) != height * width:
        raise InvalidArgument(
            f"explanation has {len(message.values)} values; height x width is {height * width} "
            "(row-major, one float per pixel)",
            field="explanation.values",
        )
    # fromiter: np.asarray over a repeated field made a Python float per value first
    # (about 170 bytes per value at its peak; 4 here).
    values = np.fromiter(message.values, np.float32, count=height * width).reshape(height, width)
    if not np.isfinite(values).all():
        raise InvalidArgument(
            "explanation has non-finite values (NaN or infinity)", field="explanation.values"
        )
    return values


def map_message(values: np.ndarray) -> apb.AttributionMap:
    return apb.AttributionMap(
        height=values.shape[0], width=values.shape[1], values=values.astype(np.float32).ravel()
    )


def _names(names: dict[int, str], value: str) -> int:
    return next(number for number, name in names.items() if name == value and number != 0)


def _method_messages(
    method: domain.AttributionMethod,
) -> dict[str, apb.SobolOptions | apb.RiseOptions | apb.EvaOptions]:
    if isinstance(method, domain.EvaSpec):
        return {
            "eva": apb.EvaOptions(
                grid_size=method.grid,
                epsilon=method.epsilon,
                bound=_names(BOUND_NAMES, method.bound),
                hybrid_layer=method.hybrid_layer,
                samples=method.samples,
            )
        }
    if isinstance(method, domain.SobolSpec):
        return {
            "sobol": apb.SobolOptions(
                grid_size=method.grid,
                nb_design=method.nb_design,
                estimator=_names(ESTIMATOR_NAMES, method.estimator),
                per_channel=method.per_channel,
                scrambled=method.scrambled,
            )
        }
    return {
        "rise": apb.RiseOptions(
            grid_size=method.grid,
            nb_samples=method.nb_samples,
            preservation_probability=method.preservation,
        )
    }


def _planned_fields(planned: domain.ClassifierPlanned) -> dict[str, object]:
    """The fields AttributeAccepted and EvaluationAccepted share, one definition."""
    return {
        "model_version": planned.model_version,
        "target_class": planned.target_class,
        "target_label": planned.target_label,
        "target_score": _names(TARGET_SCORE_NAMES, planned.target_score),
        "preprocessing": preprocessing_message(planned.preprocessing),
        "preprocessing_sources": planned.preprocessing_sources,
        "warnings": planned.warnings,
    }


def _perturbation(spec: domain.PerturbationSpec | None) -> apb.Perturbation | None:
    """The perturbation the method applies; unset for EVA, which perturbs nothing."""
    if spec is None:
        return None
    return apb.Perturbation(
        kind=_names(KIND_NAMES, spec.kind),
        baseline=_names(BASELINE_NAMES, spec.baseline),
        blur_sigma=spec.blur_sigma,
    )


def attribute_event(request_id: str, event: object) -> apb.AttributeEvent:
    if isinstance(event, domain.AttributionAccepted):
        return apb.AttributeEvent(
            request_id=request_id,
            accepted=apb.AttributeAccepted(
                method=domain.method_name(event.method),
                planned_forward_passes=event.planned_forward_passes,
                planned_forward_passes_total=event.planned_forward_passes_total,
                perturbation=_perturbation(event.perturbation),
                **_planned_fields(event.classifier),
                perturbation_description=event.perturbation_description,
                **_method_messages(event.method),
            ),
        )
    if isinstance(event, domain.PassesProgress):
        return apb.AttributeEvent(request_id=request_id, progress=_progress(event))
    assert isinstance(event, domain.AttributionOutcome)
    return apb.AttributeEvent(
        request_id=request_id,
        result=apb.AttributionResult(
            map=map_message(event.map),
            grid=map_message(event.grid),
            forward_passes=event.forward_passes,
            cache_hit=event.cache_hit,
            original_score=event.original_score,
            target_class=event.target_class,
            target_label=event.target_label,
            target_score=_names(TARGET_SCORE_NAMES, event.target_score),
            total_ms=event.total_s * 1000.0,
            warnings=event.warnings,
            channel_grid=(
                event.channel_grid.astype(np.float32).ravel()
                if event.channel_grid is not None
                else ()
            ),
            eva=_eva_result(event.eva) if event.eva is not None else None,
        ),
    )


def _eva_result(outcome: domain.EvaOutcome) -> apb.EvaResult:
    return apb.EvaResult(
        guaranteed=outcome.guaranteed,
        bound=_names(BOUND_NAMES, outcome.bound),
        epsilon=outcome.epsilon,
        epsilon_input=outcome.epsilon_input,
        hybrid_layer=outcome.hybrid_layer,
        overlap_bound=outcome.overlap_bound,
        adversary_class=outcome.adversary_class,
        adversary_label=outcome.adversary_label,
        sampled_overlap=outcome.sampled_overlap,
        samples=outcome.samples,
        region_bounds=outcome.region_bounds,
        certified=outcome.certified,
        bound_passes=outcome.bound_passes,
        sample_passes=outcome.sample_passes,
        decision=EVA_DECISIONS[outcome.decision],
        verdict=outcome.verdict,
    )


def _progress(event: domain.PassesProgress) -> apb.AttributeProgress:
    return apb.AttributeProgress(forward_passes_done=event.done, forward_passes_total=event.total)


def evaluate_event(request_id: str, event: object) -> apb.EvaluateAttributionEvent:
    if isinstance(event, domain.EvaluationAccepted):
        return apb.EvaluateAttributionEvent(
            request_id=request_id,
            accepted=apb.EvaluationAccepted(
                metrics=event.metrics,
                planned_forward_passes=event.planned_forward_passes,
                **_planned_fields(event.classifier),
            ),
        )
    if isinstance(event, domain.PassesProgress):
        return apb.EvaluateAttributionEvent(request_id=request_id, progress=_progress(event))
    assert isinstance(event, domain.MetricOutcome)
    return apb.EvaluateAttributionEvent(
        request_id=request_id,
        metric=apb.MetricResult(
            metric=event.metric,
            value=event.value,
            fractions=event.fractions,
            scores=event.scores,
            attribution_sums=event.attribution_sums,
            score_drops=event.score_drops,
            distances=event.distances,
            settings=event.settings,
            target_score=_names(TARGET_SCORE_NAMES, event.target_score),
            forward_passes=event.forward_passes,
            warnings=event.warnings,
        ),
    )
