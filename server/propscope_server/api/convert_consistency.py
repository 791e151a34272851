"""ConsistencyService protobuf <-> domain (consistency_domain.py): request validation
(every refusal names the field and the fix), defaults, and the events' messages. What
needs the models (their capabilities, classes, the pass budget) is the method's plan()."""

from __future__ import annotations

import uuid

from propscope.v1 import consistency_pb2 as cpb
from propscope_server import consistency_domain as cd
from propscope_server.api.convert import check_name, classifier_ref, decode_image
from propscope_server.api.convert_attribution import (
    TARGET_SCORE_NAMES,
    _enum,
    rise_spec,
    sobol_spec,
)
from propscope_server.config import Limits
from propscope_server.domain import DEFAULT_TENANT, ClassifierRef
from propscope_server.errors import InvalidArgument

EXPLAINER_NAMES = {
    cpb.CONSISTENCY_EXPLAINER_SOBOL: "sobol",
    cpb.CONSISTENCY_EXPLAINER_RISE: "rise",
    cpb.CONSISTENCY_EXPLAINER_SALIENCY: "saliency",
    cpb.CONSISTENCY_EXPLAINER_GRADIENT_X_INPUT: "gradient_x_input",
    cpb.CONSISTENCY_EXPLAINER_RANDOM: "random",
}
EXPLAINER_VALUES = {name: value for value, name in EXPLAINER_NAMES.items()}
assert set(EXPLAINER_NAMES.values()) == set(cd.EXPLAINERS)


def _models(request: cpb.EvaluateConsistencyRequest, limits: Limits) -> tuple[ClassifierRef, ...]:
    count = len(request.models)
    if not cd.MIN_MODELS <= count <= limits.max_consistency_models:
        raise InvalidArgument(
            f"models has {count} models; MeGe and ReCo compare {cd.MIN_MODELS}.."
            f"{limits.max_consistency_models} (the limit max_consistency_models), e.g. the "
            "versions of synth_patch_folds",
            field="models",
        )
    refs = []
    for index, model in enumerate(request.models):
        field = f"models[{index}]"
        if not model.name:
            raise InvalidArgument(
                f"{field}.name is required: the Triton name of the classifier",
                field=f"{field}.name",
            )
        if model.WhichOneof("target") == "target_class":
            raise InvalidArgument(
                f"{field}.target_class must stay unset: every model explains the same class "
                "of an image, its label (labels) or else the class models[0] predicts",
                field=f"{field}.target_class",
            )
        refs.append(classifier_ref(model))
    return tuple(refs)


def _explainers(values: list[int]) -> tuple[str, ...]:
    names: list[str] = []
    for index, value in enumerate(values):
        field = f"explainers[{index}]"
        if value not in EXPLAINER_NAMES:
            raise InvalidArgument(
                f"{field} {value} is not an explainer; use "
                + ", ".join(cpb.ConsistencyExplainer.Name(v) for v in EXPLAINER_NAMES),
                field=field,
            )
        name = EXPLAINER_NAMES[value]
        if name in names:
            raise InvalidArgument(f"{field}: {name} is asked for twice", field=field)
        names.append(name)
    return tuple(sorted(names, key=cd.EXPLAINERS.index))


def consistency_spec(
    request: cpb.EvaluateConsistencyRequest, limits: Limits, tenant: str = DEFAULT_TENANT
) -> cd.ConsistencySpec:
    """Counts and options first, images last (decoding is the costly part)."""
    check_name(request.request_id, "request_id")
    models = _models(request, limits)
    explainers = _explainers(list(request.explainers))
    count = len(request.images)
    if not cd.MIN_IMAGES <= count <= limits.max_consistency_images:
        raise InvalidArgument(
            f"images has {count} images; send {cd.MIN_IMAGES}..{limits.max_consistency_images} "
            "(the limit max_consistency_images; PROPSCOPE_LIMITS__MAX_CONSISTENCY_IMAGES)",
            field="images",
        )
    labels = None
    if request.labels:
        if len(request.labels) != count:
            raise InvalidArgument(
                f"labels has {len(request.labels)} values for {count} images; give one class "
                "per image, or none",
                field="labels",
            )
        labels = tuple(int(label) for label in request.labels)
    sobol = sobol_spec(request.sobol, "sobol")
    rise = rise_spec(request.rise, "rise")
    images = tuple(
        decode_image(data, limits, f"images[{i}]", field=f"images[{i}]")
        for i, data in enumerate(request.images)
    )
    return cd.ConsistencySpec(
        request_id=request.request_id or uuid.uuid4().hex,
        models=models,
        explainers=explainers,
        images=images,
        labels=labels,
        sobol=sobol,
        rise=rise,
        target_score=_enum(request.target_score, TARGET_SCORE_NAMES, "target_score"),
        seed=request.seed,
        tenant=tenant,
    )


def _model(outcome: cd.ModelOutcome) -> cpb.ConsistencyModel:
    message = cpb.ConsistencyModel(
        name=outcome.name,
        version=outcome.version,
        predicted_classes=outcome.predicted_classes,
    )
    if outcome.accuracy is not None:
        message.accuracy = outcome.accuracy
    return message


def _explainer(result: cd.ExplainerConsistency) -> cpb.ExplainerConsistency:
    message = cpb.ExplainerConsistency(
        explainer=EXPLAINER_VALUES[result.explainer],
        agreeing_pair_count=result.agreeing_pairs,
        disagreeing_pair_count=result.disagreeing_pairs,
        both_wrong_pair_count=result.both_wrong_pairs,
        undefined_pair_count=result.undefined_pairs,
        seconds=result.seconds,
        warnings=result.warnings,
    )
    for field in ("mege", "reco", "mean_distance_agreeing", "mean_distance_disagreeing"):
        value = getattr(result, field)
        if value is not None:
            setattr(message, field, value)
    return message


def consistency_event(request_id: str, event: object) -> cpb.EvaluateConsistencyEvent:
    if isinstance(event, cd.ConsistencyAccepted):
        return cpb.EvaluateConsistencyEvent(
            request_id=request_id,
            accepted=cpb.ConsistencyAccepted(
                models=[_model(m) for m in event.models],
                explainers=[EXPLAINER_VALUES[name] for name in event.explainers],
                image_count=event.image_count,
                labels_given=event.labels_given,
                planned_pass_count=event.planned_passes,
                warnings=event.warnings,
            ),
        )
    if isinstance(event, cd.ConsistencyProgress):
        return cpb.EvaluateConsistencyEvent(
            request_id=request_id,
            progress=cpb.ConsistencyProgress(
                done_pass_count=event.done,
                planned_pass_count=event.planned,
                explainer=EXPLAINER_VALUES.get(event.explainer, 0),
            ),
        )
    if isinstance(event, cd.ConsistencyDone):
        return cpb.EvaluateConsistencyEvent(
            request_id=request_id,
            done=cpb.ConsistencyDone(
                explainers=[_explainer(r) for r in event.explainers],
                models=[_model(m) for m in event.models],
                pass_count=event.passes,
                total_s=event.total_s,
                warnings=event.warnings,
            ),
        )
    raise TypeError(f"not a consistency event: {type(event).__name__}")
