"""ConceptService protobuf <-> domain (concepts_domain.py): request validation (every
refusal names the field and the fix), defaults, and the messages. What needs the model
(its layers, capabilities, the pass budget) or the bank is the method's (methods/craft.py)."""

from __future__ import annotations

import re
import uuid

import numpy as np

from propscope.v1 import concepts_pb2 as cpb
from propscope_server import concepts_domain as cd
from propscope_server.api.convert import (
    MAX_NAME_CHARS,
    bounded,
    check_name,
    classifier_ref,
    decode_image,
)
from propscope_server.config import Limits
from propscope_server.domain import DEFAULT_TENANT, ClassifierRef
from propscope_server.errors import InvalidArgument

# What FitConcepts answers as a bank id (methods/craft.py: "cb_" + 32 hex digits).
BANK_ID = re.compile(r"cb_[0-9a-f]{32}")
MAX_PATCH_SIZE = 4096


def bank_id(value: str, field: str = "bank_id") -> str:
    if not value:
        raise InvalidArgument(
            f"{field} is required: the id FitConcepts returned (ConceptBank.bank_id)", field=field
        )
    if not BANK_ID.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value[:40]!r} is not a concept bank id (cb_ and 32 hex digits, as "
            "FitConcepts returns them)",
            field=field,
        )
    return value


def _model(request_model: object, required: bool) -> ClassifierRef | None:
    if not request_model.name:  # type: ignore[attr-defined]
        if required:
            raise InvalidArgument(
                "model.name is required: the Triton name of the classifier", field="model.name"
            )
        return None
    return classifier_ref(request_model)  # type: ignore[arg-type]


def _images(images: list[bytes], limits: Limits) -> tuple[np.ndarray, ...]:
    count = len(images)
    if not 1 <= count <= limits.max_concept_images:
        raise InvalidArgument(
            f"images has {count} images; send 1..{limits.max_concept_images} (the limit "
            "max_concept_images; PROPSCOPE_LIMITS__MAX_CONCEPT_IMAGES)",
            field="images",
        )
    return tuple(
        decode_image(data, limits, f"images[{i}]", field=f"images[{i}]")
        for i, data in enumerate(images)
    )


def _layer(name: str) -> str:
    check_name(name, "layer", MAX_NAME_CHARS)
    return name


def fit_spec(
    request: cpb.FitConceptsRequest, limits: Limits, tenant: str = DEFAULT_TENANT
) -> cd.ConceptsSpec:
    """Counts and ranges first, images last (decoding is the costly part)."""
    check_name(request.request_id, "request_id")
    classifier = _model(request.model, required=True)
    assert classifier is not None
    layer = _layer(request.layer)
    rank = bounded(request.rank, cd.DEFAULT_RANK, 1, cd.MAX_RANK, "rank", "rank")
    nb_design = _design(request.nb_design)
    top_crops = bounded(
        request.top_crops, cd.DEFAULT_TOP_CROPS, 1, cd.MAX_TOP_CROPS, "top_crops", "top_crops"
    )
    if request.patch_size > MAX_PATCH_SIZE:
        raise InvalidArgument(
            f"patch_size is {request.patch_size}; at most {MAX_PATCH_SIZE} (0: 0.3 of "
            "each image's shorter side)",
            field="patch_size",
        )
    return cd.ConceptsSpec(
        request_id=request.request_id or uuid.uuid4().hex,
        images=_images(list(request.images), limits),
        classifier=classifier,
        layer=layer,
        rank=rank,
        patch_size=request.patch_size,
        nb_design=nb_design,
        seed=request.seed,
        top_crops=top_crops,
        tenant=tenant,
    )


def _design(value: int) -> int:
    design = bounded(value, cd.DEFAULT_NB_DESIGN, 1, cd.MAX_NB_DESIGN, "nb_design", "nb_design")
    if design & (design - 1):
        raise InvalidArgument(
            f"nb_design is {design}; it must be a power of two (the Sobol sequence's balance), "
            f"e.g. {1 << (design.bit_length() - 1)}",
            field="nb_design",
        )
    return design


def decompose_spec(
    request: cpb.DecomposeConceptRequest, limits: Limits, tenant: str = DEFAULT_TENANT
) -> cd.DecomposeSpec:
    check_name(request.request_id, "request_id")
    return cd.DecomposeSpec(
        request_id=request.request_id or uuid.uuid4().hex,
        bank_id=bank_id(request.bank_id),
        concept=request.concept,
        images=_images(list(request.images), limits),
        classifier=_model(request.model, required=False),
        layer=_layer(request.layer),
        rank=bounded(request.rank, cd.DEFAULT_DECOMPOSE_RANK, 1, cd.MAX_RANK, "rank", "rank"),
        nb_design=_design(request.nb_design),
        seed=request.seed,
        top_crops=bounded(
            request.top_crops, cd.DEFAULT_TOP_CROPS, 1, cd.MAX_TOP_CROPS, "top_crops", "top_crops"
        ),
        tenant=tenant,
    )


def bank_ref(request: cpb.GetConceptBankRequest, tenant: str = DEFAULT_TENANT) -> cd.BankRef:
    return cd.BankRef(bank_id(request.bank_id), _model(request.model, required=False), tenant)


def maps_spec(
    request: cpb.ConceptMapsRequest, limits: Limits, tenant: str = DEFAULT_TENANT
) -> cd.MapsSpec:
    return cd.MapsSpec(
        bank_id=bank_id(request.bank_id),
        image=decode_image(request.image, limits),
        classifier=_model(request.model, required=False),
        tenant=tenant,
    )


def bank_message(bank: cd.ConceptBank) -> cpb.ConceptBank:
    return cpb.ConceptBank(
        bank_id=bank.bank_id,
        model=bank.model,
        model_version=bank.model_version,
        layer=bank.layer,
        channels=bank.channels,
        target_class=bank.target_class,
        target_label=bank.target_label,
        rank=bank.rank,
        patch_size=bank.patch_size,
        nb_design=bank.nb_design,
        seed=bank.seed,
        images=bank.images,
        crops=bank.crops,
        images_digest=bank.images_digest,
        reconstruction_error=bank.reconstruction_error,
        concepts=[
            cpb.Concept(
                index=c.index,
                sobol_total_importance=c.sobol_total_importance,
                logit_contribution=c.logit_contribution,
                logit_share=c.logit_share,
                mean_coefficient=c.mean_coefficient,
                top_crops=[cpb.ConceptCrop(**vars(crop)) for crop in c.top_crops],
            )
            for c in bank.concepts
        ],
        logit_share_exact=bank.logit_share_exact,
        g_passes=bank.g_passes,
        h_passes=bank.h_passes,
        total_ms=bank.total_ms,
        parent_bank_id=bank.parent_bank_id,
        parent_concept=bank.parent_concept,
        warnings=bank.warnings,
        basis=np.asarray(bank.basis, dtype=np.float32).reshape(-1).tolist(),
    )


def fit_event(
    request_id: str,
    event: cd.ConceptsEvent,
    kind: type[cpb.FitConceptsEvent | cpb.DecomposeConceptEvent] = cpb.FitConceptsEvent,
) -> cpb.FitConceptsEvent | cpb.DecomposeConceptEvent:
    """The stream message of `event`: FitConceptsEvent, or DecomposeConceptEvent (`kind`)."""
    message = kind(request_id=request_id)
    if isinstance(event, cd.ConceptsAccepted):
        message.accepted.CopyFrom(cpb.ConceptsAccepted(**vars(event)))
    elif isinstance(event, cd.ConceptsProgress):
        message.progress.CopyFrom(
            cpb.ConceptsProgress(passes_done=event.done, passes_total=event.total)
        )
    elif isinstance(event, cd.ConceptBank):
        message.done.CopyFrom(bank_message(event))
    else:
        raise TypeError(f"not a FitConcepts event: {type(event).__name__}")
    return message


def maps_message(maps: cd.ConceptMaps) -> cpb.ConceptMapsResponse:
    return cpb.ConceptMapsResponse(
        bank_id=maps.bank_id,
        height=maps.height,
        width=maps.width,
        grid_height=maps.grid_height,
        grid_width=maps.grid_width,
        maps=[
            cpb.ConceptMap(
                concept=m.concept,
                values=m.values.reshape(-1).tolist(),
                grid=m.grid.reshape(-1).tolist(),
            )
            for m in maps.maps
        ],
    )
