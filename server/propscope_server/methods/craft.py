"""CRAFT concepts (FitConcepts, DecomposeConcept, GetConceptBank, ConceptMaps): which
concepts an open model uses for a class, and how much each matters (Fel et al., CVPR
2023; maths in scoring/craft.py).

The model is cut at a declared layer: g (the input up to the layer, ACTIVATION_LAYER ->
ACTIVATIONS) and h (the rest, run on a replaced activation: REPLACE_LAYER +
REPLACE_ACTIVATION). Fit: crops of the class's images through g, pooled, NMF -> W;
each image through g once, its per-position coefficients U, and per image a replicated
Sobol design over the r coefficients through h; the logit shares from r + 2 broadcast
passes. The bank (W, the crops' coefficients and boxes, its settings and results) is
stored in the artefact cache under a tenant's namespace; a bank is used only with the
model version it was fitted on.

Every refusal that needs no forward pass comes before any: a black-box model, an
unknown layer, too few crops for the rank, the pass budget. Negative activations need
the activations: the images' g passes show them, and the refusal names the declared
layers whose activations on the first image are non-negative (one pass each)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np
from PIL import Image

from propscope_server import metrics
from propscope_server.backends.preprocessing import to_model_input
from propscope_server.cache.artefacts import ArtefactCache, artefact_key
from propscope_server.concepts_domain import (
    MAX_NB_DESIGN,
    MAX_RANK,
    MAX_TOP_CROPS,
    BankRef,
    Concept,
    ConceptBank,
    ConceptCrop,
    ConceptMap,
    ConceptMaps,
    ConceptsAccepted,
    ConceptsProgress,
    ConceptsSpec,
    DecomposeSpec,
    MapsSpec,
)
from propscope_server.config import Settings
from propscope_server.domain import ClassifierRef
from propscope_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from propscope_server.inference import Inference, ModelDescription
from propscope_server.methods import require
from propscope_server.methods.base import require_inputs
from propscope_server.open_contract import OPTIONAL_INPUTS, OPTIONAL_OUTPUTS
from propscope_server.orchestration.classifier import (
    DETECTED_SOURCE,
    PlannedClassifier,
    forward_rows,
    plan_classifier,
    same_shape_runs,
)
from propscope_server.orchestration.runner import Finished, with_progress
from propscope_server.scoring import craft as scoring
from propscope_server.scoring import sobol
from propscope_server.threads import in_thread

METHOD = "craft"
ACTIVATION_LAYER = "ACTIVATION_LAYER"
ACTIVATIONS = "ACTIVATIONS"
REPLACE_LAYER = "REPLACE_LAYER"
REPLACE_ACTIVATION = "REPLACE_ACTIVATION"
REQUIRED_INPUTS = (ACTIVATION_LAYER, REPLACE_LAYER, REPLACE_ACTIVATION)
REQUIRED_OUTPUTS = (ACTIVATIONS,)
assert set(REQUIRED_INPUTS) <= set(OPTIONAL_INPUTS)
assert set(REQUIRED_OUTPUTS) <= set(OPTIONAL_OUTPUTS)
CONTRACT_PURPOSE = "CRAFT (g through ACTIVATIONS, h on reconstructed activations)"
# The artefact-cache kinds of a stored bank's parts.
BANK_KIND = "concept-bank"
BANK_PARTS = ("meta", "basis", "coefficients", "origins")
# ConceptMaps answers every concept's map at the image's size (float32): 32 Mi values are
# 128 MiB, half the SDK's 256 MiB receive limit. A rank-64 bank on a 4096 x 4096 image
# would be 1 Gi values (4 GiB, and its Python list many times that in the gateway).
MAX_MAP_VALUES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Crop:
    image: int  # index of the image it was cut from
    box: tuple[int, int, int, int]  # left, top, width, height


@dataclass(frozen=True)
class ConceptsPlan:
    spec: ConceptsSpec
    classifier: PlannedClassifier
    layer_index: int
    layer: str
    channels: int
    crops: tuple[Crop, ...]
    origins: tuple[Crop, ...]  # where each crop lies in the original images (reported)
    patch_sizes: tuple[int, ...]  # per image
    image_inputs: tuple[np.ndarray, ...]  # [1, ...] model input per image
    image_maps: tuple[np.ndarray, ...]  # [C, H, W] g(image)
    target: int
    planned_passes: int
    passes_done: int
    warnings: tuple[str, ...]
    started: float


@dataclass
class _Counter:
    done: int
    total: int
    emit: Callable[[object], None] | None = None

    def add(self, passes: int) -> None:
        self.done += passes
        if self.emit is not None:
            self.emit(ConceptsProgress(self.done, self.total))


@dataclass(frozen=True)
class StoredBank:
    """A bank as stored: what the RPCs show, plus the crops' coefficients [crops, r] and
    their boxes [crops, 5] (image, left, top, width, height) for DecomposeConcept."""

    bank: ConceptBank
    coefficients: np.ndarray
    origins: np.ndarray


def bank_namespace(tenant: str) -> str:
    """Banks are a tenant's resources, never shared (unlike deterministic artefacts)."""
    return f"tenant.{tenant}"


def images_digest(images: tuple[np.ndarray, ...]) -> str:
    hasher = hashlib.sha256()
    for image in images:
        hasher.update(str(image.shape).encode())
        hasher.update(np.ascontiguousarray(image).tobytes())
    return hasher.hexdigest()


async def load_bank(cache: ArtefactCache, tenant: str, bank_id: str) -> StoredBank:
    """The stored bank `bank_id` of `tenant` (`.bank.basis` is W [r, C]); NotFound
    naming FitConcepts as the fix when the cache does not hold it (never fitted,
    another tenant's, or expired)."""
    namespace = bank_namespace(tenant)
    parts = {}
    for part in BANK_PARTS:
        parts[part] = await cache.get(artefact_key(BANK_KIND, namespace, (bank_id, part)))
        if parts[part] is None:
            raise NotFound(
                f"no concept bank {bank_id!r}: never fitted for this tenant, or expired from "
                "the cache; fit it again with FitConcepts (propscope concepts fit)",
                field="bank_id",
            )
    meta = json.loads(parts["meta"].tobytes().decode())
    concepts = tuple(
        Concept(
            **{
                **concept,
                "top_crops": tuple(
                    ConceptCrop(**{**crop, "png": base64.b64decode(crop["png"])})
                    for crop in concept["top_crops"]
                ),
            }
        )
        for concept in meta.pop("concepts")
    )
    meta["warnings"] = tuple(meta["warnings"])
    bank = ConceptBank(**meta, concepts=concepts, basis=parts["basis"])
    return StoredBank(bank, parts["coefficients"], parts["origins"])


async def store_bank(cache: ArtefactCache, tenant: str, stored: StoredBank) -> None:
    bank = stored.bank
    meta = {
        f.name: getattr(bank, f.name)
        for f in dataclasses.fields(bank)
        if f.name not in ("basis", "concepts")
    }
    meta["warnings"] = list(bank.warnings)
    meta["concepts"] = [
        {
            **{f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "top_crops"},
            "top_crops": [
                {**vars(crop), "png": base64.b64encode(crop.png).decode()} for crop in c.top_crops
            ],
        }
        for c in bank.concepts
    ]
    arrays = {
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        "basis": np.asarray(bank.basis, dtype=np.float64),
        "coefficients": np.asarray(stored.coefficients, dtype=np.float64),
        "origins": np.asarray(stored.origins, dtype=np.int64),
    }
    namespace = bank_namespace(tenant)
    for part in BANK_PARTS:
        await cache.put(artefact_key(BANK_KIND, namespace, (bank.bank_id, part)), arrays[part])


def check_current(bank: ConceptBank, model: ModelDescription) -> None:
    """FailedPrecondition when `model` is not the model and version the bank was
    fitted on."""
    if model.name != bank.model:
        raise FailedPrecondition(
            f"concept bank {bank.bank_id!r} was fitted on model {bank.model!r}, not "
            f"{model.name!r}; name its model or fit a bank for {model.name!r}",
            field="model.name",
        )
    if model.version != bank.model_version:
        raise FailedPrecondition(
            f"stale bank (fitted on version {bank.model_version} of {bank.model!r}; version "
            f"{model.version} is served now): its concepts belong to the old weights; fit it "
            "again with FitConcepts, or name version "
            f"{bank.model_version} in model.version while it is still served",
            field="bank_id",
        )


def _check_spec(spec: ConceptsSpec, settings: Settings) -> None:
    limit = settings.limits.max_concept_images
    if not 1 <= len(spec.images) <= limit:
        raise InvalidArgument(
            f"images has {len(spec.images)} images; send 1..{limit} (the limit "
            "max_concept_images; PROPSCOPE_LIMITS__MAX_CONCEPT_IMAGES)",
            field="images",
        )
    if not 1 <= spec.rank <= MAX_RANK:
        raise InvalidArgument(f"rank is {spec.rank}; it must be in 1..{MAX_RANK}", field="rank")
    design = spec.nb_design
    if not 1 <= design <= MAX_NB_DESIGN or design & (design - 1):
        raise InvalidArgument(
            f"nb_design is {design}; it must be a power of two in 1..{MAX_NB_DESIGN} "
            "(the Sobol sequence's balance)",
            field="nb_design",
        )
    if not 1 <= spec.top_crops <= MAX_TOP_CROPS:
        raise InvalidArgument(
            f"top_crops is {spec.top_crops}; it must be in 1..{MAX_TOP_CROPS}", field="top_crops"
        )


def _layer_index(name: str, model: ModelDescription) -> int:
    """The chosen layer's index in the declared layers (empty: the last one)."""
    names = [layer.name for layer in model.layers]
    if not names:
        raise FailedPrecondition(
            f"model {model.name!r} declares no layers (propscope.layers in its config.pbtxt); "
            "CRAFT cuts the model at a declared layer",
            field="layer",
        )
    if not name:
        return len(names) - 1
    if name not in names:
        raise InvalidArgument(
            f"layer: model {model.name!r} has no layer {name!r}; it declares {', '.join(names)}",
            field="layer",
        )
    return names.index(name)


def _cut(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, width, height = box
    return image[top : top + height, left : left + width]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


class Craft:
    """FitConcepts and DecomposeConcept (streams: ConceptsAccepted, ConceptsProgress,
    ConceptBank), and the unary GetConceptBank and ConceptMaps."""

    def __init__(self, inference: Inference, cache: ArtefactCache, settings: Settings) -> None:
        self._inference = inference
        self._cache = cache
        self._settings = settings

    # ----------------------------------------------------------------- planning

    async def plan(
        self, spec: ConceptsSpec | DecomposeSpec, deadline: float | None
    ) -> ConceptsPlan:
        if isinstance(spec, DecomposeSpec):
            spec = await self._decomposition(spec, deadline)
        return await self._plan(spec, deadline)

    async def _plan(self, spec: ConceptsSpec, deadline: float | None) -> ConceptsPlan:
        started = time.perf_counter()
        _check_spec(spec, self._settings)
        described = await self._inference.describe(
            spec.classifier.name, spec.classifier.version, deadline
        )
        if described.role != "editor" and not described.config_problem:
            require(METHOD, described)
            require_inputs(described, (*REQUIRED_INPUTS, *REQUIRED_OUTPUTS), CONTRACT_PURPOSE)
            _layer_index(spec.layer, described)
        boxes, patches = self._boxes(spec)
        crops = tuple(Crop(i, box) for i, image_boxes in enumerate(boxes) for box in image_boxes)
        if len(crops) < spec.rank:
            raise InvalidArgument(
                f"rank {spec.rank} needs at least {spec.rank} crops; {len(spec.images)} images "
                f"give {len(crops)} (patch_size {', '.join(map(str, sorted(set(patches))))}, "
                "stride 0.8 x patch): send more images, a smaller patch_size or a smaller rank",
                field="rank",
            )
        planned = _g_passes(spec, len(crops)) + scoring.importance_passes(
            len(spec.images), spec.nb_design, spec.rank
        )
        limit = self._settings.limits.max_concept_passes
        if planned > limit:
            raise ResourceExhausted(
                f"the concepts need {planned} forward passes ({len(crops)} crops + "
                f"{len(spec.images)} images through g, {len(spec.images)} x nb_design "
                f"{spec.nb_design} x (rank + 2) + rank + 2 through h); the limit "
                f"max_concept_passes is {limit}; send fewer images, a larger patch_size, a "
                "smaller nb_design or rank",
                field="max_concept_passes",
            )
        classifier = await plan_classifier(
            self._inference, spec.classifier, spec.images[0], self._settings, deadline
        )
        model = classifier.model
        index = _layer_index(spec.layer, model)
        layer = model.layers[index]
        detected = int(DETECTED_SOURCE in classifier.preprocessing_sources)
        planned += detected
        inputs = tuple(
            [
                await in_thread(self._model_input, classifier, image, image.shape[:2])
                for image in spec.images
            ]
        )
        raw, activations = await self._g(classifier, inputs, index, deadline)
        maps = await in_thread(self._maps, activations, layer.channels, model.name, layer.name)
        worst = min(scoring.most_negative(m) for m in maps)
        if worst < -scoring.NEGATIVE_TOLERANCE:
            await self._refuse_negative(classifier, inputs[0], index, worst, deadline)
        if spec.classifier.target_class is not None:
            target = spec.classifier.target_class
            if classifier.classes and target >= classifier.classes:
                raise InvalidArgument(
                    f"model.target_class is {target}; model {model.name!r} has "
                    f"{classifier.classes} classes",
                    field="model.target_class",
                )
        else:
            target = int(np.bincount(raw.argmax(axis=1)).argmax())
        warnings = list(classifier.warnings)
        predicted = raw.argmax(axis=1)
        others = int(np.sum(predicted != target))
        if others:
            warnings.append(
                f"{others} of {len(inputs)} images are predicted as another class than "
                f"{target}: their crops still shape the concepts"
            )
        return ConceptsPlan(
            spec=spec,
            classifier=classifier,
            layer_index=index,
            layer=layer.name,
            channels=layer.channels,
            crops=crops,
            origins=spec_origins(spec, crops),
            patch_sizes=tuple(patches),
            image_inputs=inputs,
            image_maps=tuple(maps),
            target=target,
            planned_passes=planned,
            passes_done=detected + len(inputs),
            warnings=tuple(warnings),
            started=started,
        )

    def _boxes(self, spec: ConceptsSpec) -> tuple[list[list[tuple]], list[int]]:
        boxes, patches = [], []
        for i, image in enumerate(spec.images):
            height, width = image.shape[:2]
            if spec.patch_size < 0:  # a decomposition: each image is one crop
                boxes.append([(0, 0, width, height)])
                patches.append(min(height, width))
                continue
            patch = spec.patch_size or scoring.default_patch(height, width)
            if patch > min(height, width):
                raise InvalidArgument(
                    f"patch_size {patch} is larger than images[{i}] ({width} x {height}); give "
                    f"at most {min(height, width)} or 0 for 0.3 of the shorter side",
                    field="patch_size",
                )
            boxes.append(scoring.crop_boxes(height, width, patch))
            patches.append(patch)
        return boxes, patches

    @staticmethod
    def _model_input(
        classifier: PlannedClassifier, pixels: np.ndarray, size: tuple[int, int]
    ) -> np.ndarray:
        """A picture (an image or a crop) as the model takes it, resized to its input
        (a variable-size model's: `size`, the image's own (height, width))."""
        layout = classifier.layout
        if layout.height is None or layout.width is None:
            pixels = np.asarray(Image.fromarray(pixels).resize((size[1], size[0])))
        return to_model_input(pixels[None], layout, classifier.preprocessing)

    @staticmethod
    def _maps(activations: np.ndarray, channels: int, model: str, layer: str) -> list[np.ndarray]:
        try:
            return list(scoring.as_maps(activations, channels))
        except ValueError as error:
            raise FailedPrecondition(
                f"model {model!r}, layer {layer!r}: {error}; CRAFT needs the layer's map "
                "shape (send square images to a variable-size model)",
                field="layer",
            ) from None

    async def _refuse_negative(
        self,
        classifier: PlannedClassifier,
        model_input: np.ndarray,
        index: int,
        worst: float,
        deadline: float | None,
    ) -> None:
        model = classifier.model
        working = []
        for other, layer in enumerate(model.layers):
            if other == index:
                continue
            _, activations = await self._g(classifier, (model_input,), other, deadline)
            if activations.size and float(activations.min()) >= -scoring.NEGATIVE_TOLERANCE:
                working.append(layer.name)
        fix = (
            f"choose a layer whose activations are non-negative on the first image: "
            f"{', '.join(working)}"
            if working
            else "no declared layer's activations are non-negative on the first image; "
            "declare a layer after a ReLU (propscope.layers)"
        )
        raise FailedPrecondition(
            f"layer {model.layers[index].name!r} of model {model.name!r} has negative "
            f"activations (min {worst:.3g}); NMF factorises non-negative activations only "
            f"(a layer after a ReLU); {fix}",
            field="layer",
        )

    async def _decomposition(self, spec: DecomposeSpec, deadline: float | None) -> ConceptsSpec:
        """A DecomposeConcept request as a fit whose images are the parent's crops that
        the concept marks most (each one crop), at an earlier layer."""
        stored = await load_bank(self._cache, spec.tenant, spec.bank_id)
        bank = stored.bank
        ref = spec.classifier or ClassifierRef(name=bank.model)
        model = await self._inference.describe(ref.name, ref.version, deadline)
        check_current(bank, model)
        if not 0 <= spec.concept < bank.rank:
            raise InvalidArgument(
                f"concept is {spec.concept}; bank {bank.bank_id!r} has concepts 0..{bank.rank - 1}",
                field="concept",
            )
        names = [layer.name for layer in model.layers]
        parent = names.index(bank.layer) if bank.layer in names else -1
        if spec.layer:
            child = _layer_index(spec.layer, model)
            if child >= parent:
                raise InvalidArgument(
                    f"layer {spec.layer!r} is not earlier than the bank's layer {bank.layer!r}; "
                    f"choose one of {', '.join(names[:parent]) or '(none)'}",
                    field="layer",
                )
        elif parent <= 0:
            raise InvalidArgument(
                f"the bank's layer {bank.layer!r} is the model's first declared layer: there "
                "is no earlier layer to decompose its concepts at",
                field="layer",
            )
        else:
            child = parent - 1
        if images_digest(spec.images) != bank.images_digest:
            raise InvalidArgument(
                f"images are not the {bank.images} images bank {bank.bank_id!r} was fitted on "
                "(their digest differs); send the same images in the same order",
                field="images",
            )
        # The concept's crops: the 1 / r of the bank's crops with its largest coefficients
        # (at least 4 per sub-concept, at most max_concept_images), those it marks at all.
        coefficients = stored.coefficients[:, spec.concept]
        wanted = max(4 * spec.rank, -(-len(coefficients) // bank.rank))
        wanted = min(wanted, self._settings.limits.max_concept_images)
        mine = np.argsort(-coefficients, kind="stable")[:wanted]
        mine = mine[coefficients[mine] > 0]
        if len(mine) < spec.rank:
            raise InvalidArgument(
                f"rank {spec.rank} needs at least {spec.rank} crops; concept {spec.concept} "
                f"marks {len(mine)} crops of the bank (coefficient > 0); ask for a smaller rank",
                field="rank",
            )
        crops = []
        origins = []
        for row in mine:
            image, left, top, width, height = (int(v) for v in stored.origins[row])
            crops.append(_cut(spec.images[image], (left, top, width, height)))
            origins.append((image, left, top, width, height))
        classifier = dataclasses.replace(
            ref, version=bank.model_version, target_class=bank.target_class
        )
        return ConceptsSpec(
            request_id=spec.request_id,
            images=tuple(crops),
            classifier=classifier,
            layer=names[child],
            rank=spec.rank,
            patch_size=-1,
            nb_design=spec.nb_design,
            seed=spec.seed,
            top_crops=spec.top_crops,
            tenant=spec.tenant,
            parent=(bank.bank_id, spec.concept),
            origins=tuple(origins),
            digest=bank.images_digest,
        )

    # ------------------------------------------------------------------ passes

    async def _g(
        self,
        classifier: PlannedClassifier,
        inputs: tuple[np.ndarray, ...],
        index: int,
        deadline: float | None,
        counter: _Counter | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class outputs and ACTIVATIONS of layer `index` of the pictures; pictures of
        other shapes (a variable-size model) go in batches of their own."""
        raws, activations = [], []
        for start, stop in same_shape_runs(inputs):
            rows = stop - start
            layer = np.full((rows, 1), index, dtype=np.int32)
            raw, acts = await forward_rows(
                self._inference,
                classifier,
                np.concatenate(inputs[start:stop]),
                {ACTIVATION_LAYER: layer},
                rows,
                (ACTIVATIONS,),
                deadline,
                counter.add if counter is not None else None,
            )
            raws.append(raw)
            activations.append(acts)
        widths = {a.shape[1] for a in activations}
        if len(widths) > 1:
            raise FailedPrecondition(
                f"model {classifier.model.name!r}: the pictures' activations differ in size; "
                "send images of one size",
                field="images",
            )
        return np.concatenate(raws), np.concatenate(activations)

    async def _h(
        self,
        classifier: PlannedClassifier,
        model_input: np.ndarray,
        index: int,
        replacements: np.ndarray,
        target: int,
        deadline: float | None,
        counter: _Counter | None = None,
    ) -> np.ndarray:
        """The target's class output for each replaced activation row [m, C*H*W]."""
        rows = len(replacements)
        extra = {
            REPLACE_LAYER: np.full((rows, 1), index, dtype=np.int32),
            REPLACE_ACTIVATION: replacements.astype(np.float32),
        }
        (raw,) = await forward_rows(
            self._inference,
            classifier,
            model_input,
            extra,
            rows,
            (),
            deadline,
            counter.add if counter is not None else None,
        )
        return raw[:, target]

    # --------------------------------------------------------------------- run

    async def run(self, plan: ConceptsPlan) -> AsyncIterator[object]:
        spec = plan.spec
        model = plan.classifier.model
        yield ConceptsAccepted(
            model=model.name,
            model_version=model.version,
            layer=plan.layer,
            channels=plan.channels,
            target_class=plan.target,
            target_label=plan.classifier.label(plan.target),
            rank=spec.rank,
            images=len(spec.images),
            crops=len(plan.crops),
            patch_size=max(plan.patch_sizes),
            nb_design=spec.nb_design,
            planned_passes=plan.planned_passes,
            warnings=plan.warnings,
        )

        async def work(emit: Callable[[object], None]) -> ConceptBank:
            counter = _Counter(plan.passes_done, plan.planned_passes, emit)
            bank = await self._fit(plan, counter)
            metrics.FORWARD_PASSES.labels(method=METHOD).inc(counter.done)
            return bank

        async with aclosing(with_progress(work)) as events:
            async for event in events:
                yield event.value if isinstance(event, Finished) else event

    async def _fit(self, plan: ConceptsPlan, counter: _Counter) -> ConceptBank:
        spec = plan.spec
        classifier = plan.classifier
        crop_pixels = [_cut(spec.images[c.image], c.box) for c in plan.crops]
        if spec.patch_size < 0:  # a decomposition: each image is its one crop, g ran on it
            crop_maps = np.stack(plan.image_maps)
            pooled, worst = scoring.pooled(crop_maps), scoring.most_negative(crop_maps)
        else:
            pooled, worst = await self._pooled_crops(plan, crop_pixels, counter)
        if worst < -scoring.NEGATIVE_TOLERANCE:
            await self._refuse_negative(
                classifier, plan.image_inputs[0], plan.layer_index, worst, None
            )
        crop_u, basis, error = await in_thread(scoring.fit_nmf, pooled, spec.rank, spec.seed)
        importance, mean_u = await self._importance(plan, basis, counter)
        height, width = plan.image_maps[0].shape[1:]
        rows, _ = scoring.broadcast_concepts(mean_u, basis, height, width)
        share_scores = await self._h(
            classifier, plan.image_inputs[0], plan.layer_index, rows, plan.target, None, counter
        )
        contributions, shares, exact = scoring.logit_shares(share_scores)
        warnings = []
        if not exact:
            warnings.append(
                "h is not additive in the concepts (not linear after pooling): the logit "
                "shares are h(u_bar_c W_c) - h(0) each, not an exact split of the logit"
            )
        if error > 0.15:
            warnings.append(
                f"NMF reconstruction error {error:.3f} > 0.15: {spec.rank} concepts explain the "
                "activations poorly; try a larger rank or more images"
            )
        order = np.argsort(-importance, kind="stable")
        concepts = tuple(
            Concept(
                index=int(c),
                sobol_total_importance=float(importance[c]),
                logit_contribution=float(contributions[c]),
                logit_share=float(shares[c]),
                mean_coefficient=float(mean_u[c]),
                top_crops=self._top_crops(plan, crop_u, crop_pixels, int(c)),
            )
            for c in order
        )
        digest = spec.digest or images_digest(spec.images)
        bank_id = _bank_id(plan, digest)
        g_passes = _g_passes(spec, len(plan.crops))
        bank = ConceptBank(
            bank_id=bank_id,
            model=classifier.model.name,
            model_version=classifier.model.version,
            layer=plan.layer,
            channels=plan.channels,
            target_class=plan.target,
            target_label=classifier.label(plan.target),
            rank=spec.rank,
            patch_size=max(plan.patch_sizes),
            nb_design=spec.nb_design,
            seed=spec.seed,
            images=len(spec.images),
            crops=len(plan.crops),
            images_digest=digest,
            reconstruction_error=error,
            concepts=concepts,
            logit_share_exact=exact,
            g_passes=g_passes,
            h_passes=scoring.importance_passes(len(spec.images), spec.nb_design, spec.rank),
            total_ms=(time.perf_counter() - plan.started) * 1000.0,
            basis=basis,
            parent_bank_id=spec.parent[0] if spec.parent else "",
            parent_concept=spec.parent[1] if spec.parent else 0,
            warnings=(*plan.warnings, *warnings),
        )
        origins = np.array([(c.image, *c.box) for c in plan.origins], dtype=np.int64)
        await store_bank(self._cache, spec.tenant, StoredBank(bank, crop_u, origins))
        return bank

    async def _pooled_crops(
        self, plan: ConceptsPlan, crop_pixels: list[np.ndarray], counter: _Counter
    ) -> tuple[np.ndarray, float]:
        """The crops' pooled activations [crops, C] and their most negative value, one
        batch of crops through g at a time: a small patch_size makes tens of thousands of
        crops, whose model inputs and maps must not be held all at once (the memory
        estimate counts one batch)."""
        classifier = plan.classifier
        batch = classifier.model.max_batch_size
        pooled, worst = [], 0.0
        for start in range(0, len(plan.crops), batch):
            rows = range(start, min(start + batch, len(plan.crops)))
            inputs = tuple(
                [
                    await in_thread(
                        self._model_input,
                        classifier,
                        crop_pixels[row],
                        plan.spec.images[plan.crops[row].image].shape[:2],
                    )
                    for row in rows
                ]
            )
            _, activations = await self._g(classifier, inputs, plan.layer_index, None, counter)
            maps = np.stack(
                self._maps(activations, plan.channels, classifier.model.name, plan.layer)
            )
            worst = min(worst, scoring.most_negative(maps))
            pooled.append(scoring.pooled(maps))
        return np.concatenate(pooled), worst

    async def _importance(
        self, plan: ConceptsPlan, basis: np.ndarray, counter: _Counter
    ) -> tuple[np.ndarray, np.ndarray]:
        """Total-order Sobol indices of the r coefficients averaged over the images, and
        u_bar: the coefficients' mean over the images' positions (the logit shares')."""
        spec = plan.spec
        masks = scoring.importance_masks(spec.nb_design, spec.rank, spec.seed)
        total = np.zeros(spec.rank)
        mean_u = np.zeros(spec.rank)
        for model_input, maps in zip(plan.image_inputs, plan.image_maps, strict=True):
            position_u = await in_thread(scoring.position_coefficients, maps, basis)
            mean_u += position_u.mean(axis=(0, 1)) / len(plan.image_inputs)
            rows = await in_thread(scoring.reconstructed, position_u, basis, masks)
            scores = await self._h(
                plan.classifier, model_input, plan.layer_index, rows, plan.target, None, counter
            )
            total += scoring.sobol_importance(scores, spec.nb_design, spec.rank)
        return total / len(plan.image_inputs), mean_u

    def _top_crops(
        self, plan: ConceptsPlan, crop_u: np.ndarray, pixels: list[np.ndarray], concept: int
    ) -> tuple[ConceptCrop, ...]:
        best = np.argsort(-crop_u[:, concept], kind="stable")[: plan.spec.top_crops]
        crops = []
        for row in best:
            origin = plan.origins[row]
            left, top, width, height = origin.box
            crops.append(
                ConceptCrop(
                    image=origin.image,
                    left=left,
                    top=top,
                    width=width,
                    height=height,
                    coefficient=float(crop_u[row, concept]),
                    png=_png(pixels[row]),
                )
            )
        return tuple(crops)

    # ------------------------------------------------------------ unary calls

    async def bank(self, ref: BankRef, deadline: float | None) -> ConceptBank:
        stored = await load_bank(self._cache, ref.tenant, ref.bank_id)
        if ref.classifier is not None:
            model = await self._inference.describe(
                ref.classifier.name, ref.classifier.version, deadline
            )
            check_current(stored.bank, model)
        return stored.bank

    async def maps(self, spec: MapsSpec, deadline: float | None) -> ConceptMaps:
        stored = await load_bank(self._cache, spec.tenant, spec.bank_id)
        bank = stored.bank
        height, width = spec.image.shape[:2]
        values = len(bank.concepts) * height * width
        if values > MAX_MAP_VALUES:
            raise ResourceExhausted(
                f"the concept maps of a {width} x {height} image are {len(bank.concepts)} maps "
                f"of {height * width} values ({values} in all); at most {MAX_MAP_VALUES} are "
                "answered: send a smaller image (the maps are upsampled from the layer's "
                "grid, so a downscaled image loses little)",
                field="image",
            )
        ref = spec.classifier or ClassifierRef(name=bank.model)
        described = await self._inference.describe(ref.name, ref.version, deadline)
        check_current(bank, described)
        require(METHOD, described)
        classifier = await plan_classifier(
            self._inference,
            dataclasses.replace(ref, target_class=bank.target_class),
            spec.image,
            self._settings,
            deadline,
        )
        index = _layer_index(bank.layer, classifier.model)
        model_input = await in_thread(
            self._model_input, classifier, spec.image, spec.image.shape[:2]
        )
        _, activations = await self._g(classifier, (model_input,), index, deadline)
        (maps,) = self._maps(activations, bank.channels, bank.model, bank.layer)
        position_u = await in_thread(scoring.position_coefficients, maps, bank.basis)
        results = []
        for concept in bank.concepts:
            grid = position_u[:, :, concept.index].astype(np.float32)
            values = await in_thread(sobol.resize_map, grid, height, width)
            results.append(ConceptMap(concept.index, values, grid))
        return ConceptMaps(
            bank_id=bank.bank_id,
            height=height,
            width=width,
            grid_height=position_u.shape[0],
            grid_width=position_u.shape[1],
            maps=tuple(results),
        )


def spec_origins(spec: ConceptsSpec, crops: tuple[Crop, ...]) -> tuple[Crop, ...]:
    """Where the crops lie in the original images: themselves for a fit, the parent's
    crop boxes for a decomposition (each of whose images is one of them)."""
    if not spec.origins:
        return crops
    return tuple(Crop(spec.origins[c.image][0], tuple(spec.origins[c.image][1:])) for c in crops)


def _g_passes(spec: ConceptsSpec, crops: int) -> int:
    """One per image, one per crop (a decomposition's images are its crops: once)."""
    return len(spec.images) + (crops if spec.patch_size >= 0 else 0)


def _bank_id(plan: ConceptsPlan, digest: str) -> str:
    """Deterministic: the same fit of the same images gives the same id."""
    spec = plan.spec
    model = plan.classifier.model
    parts = (
        model.name,
        model.version,
        plan.layer,
        str(plan.target),
        str(spec.rank),
        str(spec.patch_size),
        str(spec.nb_design),
        str(spec.seed),
        str(spec.top_crops),
        digest,
        json.dumps(spec.parent),
    )
    return "cb_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
