"""What the explorer's page asks for, answered through the SDK: the models and their classes,
a class's concepts (CRAFT) and their pictures (MACO), and an uploaded image's PropGrad curves
and path strips, Sobol map and concept maps.

Every answer is JSON-ready. The expensive ones run as jobs (``jobs.py``) keyed by model,
version, class, image and the settings, so each is computed once per explorer and on demand.
"""

from __future__ import annotations

import csv
import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from propscope._client import Client
from propscope._events import ModelInfo, Progress, PropertyResult
from propscope._json import finite_or_none
from propscope._properties import parse_property
from propscope.explorer.jobs import Job, JobFailed, Jobs
from propscope.explorer.pictures import heat_overlay, png_uri, rgb_of

__all__ = ["DEFAULT_PROPERTIES", "ExplorerService", "ExplorerSettings", "read_class_images"]

# The demo's properties (Makefile DEMO_PROPERTIES): meaningful for the synthetic world, and
# whole-image edits anywhere else.
DEFAULT_PROPERTIES = (
    "object_hue=procedural:operation=hue,region=object",
    "patch=procedural:operation=blend",
    "background_brightness=procedural:operation=brightness,region=background,amount=0.2",
)
# Uploaded images kept in memory, the most recent first out last.
UPLOADS_KEPT = 32


@dataclass(frozen=True)
class ExplorerSettings:
    """The settings of every call the explorer makes; 0 means the server's default. Small
    values keep a demo or a test cheap; they are part of every cache key."""

    properties: tuple[str, ...] = DEFAULT_PROPERTIES
    steps: int = 10
    seed: int = 0
    path_image_px: int = 64
    sobol_grid: int = 0
    sobol_design: int = 0
    # CRAFT: the class's images come from ``images`` (a manifest CSV: image,label).
    images: Path | None = None
    images_per_class: int = 16
    concept_rank: int = 0
    concept_design: int = 0
    concept_crops: int = 4
    # MACO: pictures of the class and of its ``pictures`` most important concepts.
    pictures: int = 5
    maco_steps: int = 0
    maco_crops: int = 0
    maco_size: int = 0
    # Crop sides as a share of the picture, first step -> last. The picture is the model's
    # input size, where the paper's 0.5 -> 0.05 never shows the model the whole picture
    # (docs/maco.md); 1.0 -> 0.5 draws what the model classifies as the class.
    maco_box_start: float = 1.0
    maco_box_end: float = 0.5
    picture_px: int = 160
    workers: int = 2
    cache_entries: int = 256

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self)
        settings["images"] = str(self.images) if self.images else None
        return settings


def read_class_images(manifest: Path) -> dict[int, list[Path]]:
    """The images of a manifest CSV with ``image`` and ``label`` columns (the review's format:
    paths relative to the manifest), by class index. ``ValueError`` names a bad line."""
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as file:
            rows = list(csv.DictReader(file, skipinitialspace=True))
    except OSError as error:
        raise ValueError(f"cannot read the image manifest {str(manifest)!r}: {error}") from None
    by_class: dict[int, list[Path]] = {}
    for line, row in enumerate(rows, start=2):
        image, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
        if not image or not label.isdigit():
            raise ValueError(
                f"{manifest}:{line}: each line needs an image and a class index label "
                f"(columns image,label), got {image!r}, {label!r}"
            )
        path = manifest.parent / image
        if not path.is_file():
            raise ValueError(f"{manifest}:{line}: no image at {str(path)!r}")
        by_class.setdefault(int(label), []).append(path)
    return by_class


@dataclass
class _Upload:
    image: bytes
    digest: str
    width: int
    height: int


@dataclass
class ExplorerService:
    """The page's questions, answered with ``client``; one per explorer process."""

    client: Client
    settings: ExplorerSettings = field(default_factory=ExplorerSettings)

    def __post_init__(self) -> None:
        self.jobs = Jobs(self.settings.workers, self.settings.cache_entries)
        self._uploads: OrderedDict[str, _Upload] = OrderedDict()
        self._lock = threading.Lock()
        self._class_images = read_class_images(self.settings.images) if self.settings.images else {}
        # Checked now: a malformed --property fails the start, not every upload.
        self._properties = {
            spec.name: spec for spec in (parse_property(text) for text in self.settings.properties)
        }

    def close(self) -> None:
        self.jobs.close()

    # The models and their classes.

    def models(self) -> list[dict[str, Any]]:
        return [_model_dict(info) for info in self.client.list_models() if _explorable(info)]

    def classes(self, model: str) -> list[dict[str, Any]]:
        return self._model(model)["classes"]

    def _model(self, model: str) -> dict[str, Any]:
        for info in self.models():
            if info["name"] == model:
                return info
        raise JobFailed("NOT_FOUND", f"the gateway serves no ready classifier {model!r}")

    # Uploads.

    def upload(self, image: bytes) -> dict[str, Any]:
        """Keeps an uploaded image; its id is the SHA-256 of its bytes (a cache key part)."""
        rgb = rgb_of(image)
        digest = hashlib.sha256(image).hexdigest()[:32]
        with self._lock:
            self._uploads[digest] = _Upload(image, digest, rgb.width, rgb.height)
            self._uploads.move_to_end(digest)
            while len(self._uploads) > UPLOADS_KEPT:
                self._uploads.popitem(last=False)
        return {"image_id": digest, "width": rgb.width, "height": rgb.height}

    def _upload(self, image_id: str) -> _Upload:
        with self._lock:
            upload = self._uploads.get(image_id)
        if upload is None:
            raise JobFailed("NOT_FOUND", f"no uploaded image {image_id!r}: upload it again")
        return upload

    # Jobs: each kind's key says everything its result depends on.

    def start(self, kind: str, model: str, version: str, target_class: int, image_id: str) -> Job:
        work: dict[str, Callable[[Job], Any]] = {
            "propgrad": lambda job: self._propgrad(job, model, version, target_class, image_id),
            "sobol": lambda job: self._sobol(job, model, version, target_class, image_id),
            "concepts": lambda job: self._concepts(job, model, version, target_class),
            "concept_map": lambda job: self._concept_map(
                job, model, version, target_class, image_id
            ),
            "class_picture": lambda job: self._picture(job, model, version, target_class, None),
        }
        if kind.startswith("concept_picture:"):
            concept = _index(kind.partition(":")[2], "concept")
            work[kind] = lambda job: self._picture(job, model, version, target_class, concept)
        if kind not in work:
            raise JobFailed("INVALID_ARGUMENT", f"unknown job kind {kind!r}")
        if kind in ("propgrad", "sobol", "concept_map"):
            self._upload(image_id)  # refused now, not as a failed job
        else:
            image_id = ""
        return self.jobs.start(
            (kind, model, version, target_class, image_id, self.settings), kind, work[kind]
        )

    def _propgrad(self, job: Job, model: str, version: str, target: int, image_id: str) -> Any:
        upload = self._upload(image_id)
        stream = self.client.explain(
            upload.image,
            model,
            list(self._properties.values()),
            steps=self.settings.steps,
            seed=self.settings.seed,
            target_class=target,
            model_version=version,
            return_path_images=True,
            path_image_max_side_px=self.settings.path_image_px,
        )
        progress: dict[str, tuple[int, int]] = {}
        for event in stream:
            if isinstance(event, Progress):
                progress[event.property_name] = (event.completed, event.total)
                done = sum(value[0] for value in progress.values())
                total = sum(value[1] for value in progress.values())
                job.progress(done, total, f"{event.stage} ({len(progress)} properties)")
        result = stream.result()
        return {
            "model_version": result.accepted.model_version,
            "steps": result.accepted.steps,
            "total_ms": result.done.total_ms,
            "properties": [_property_dict(found) for found in result.properties],
        }

    def _sobol(self, job: Job, model: str, version: str, target: int, image_id: str) -> Any:
        upload = self._upload(image_id)
        attribution = self.client.attribute(
            upload.image,
            model,
            grid_size=self.settings.sobol_grid,
            nb_design=self.settings.sobol_design,
            target_class=target,
            seed=self.settings.seed,
            model_version=version,
            on_progress=lambda update: job.progress(update.done, update.total, "forward passes"),
        )
        return {
            "model_version": attribution.model_version,
            "overlay": heat_overlay(rgb_of(upload.image), attribution.map),
            "options": attribution.options.describe(),
            "target_class": attribution.target_class,
            "target_label": attribution.target_label,
            "target_score": attribution.target_score,
            "original_score": finite_or_none(attribution.original_score),
            "forward_passes": attribution.forward_passes,
            "cache_hit": attribution.cache_hit,
            "warnings": list(attribution.warnings),
        }

    def _concepts(self, job: Job, model: str, version: str, target: int) -> Any:
        images = self._class_images.get(target, [])[: self.settings.images_per_class]
        if not images:
            where = (
                f"the manifest {self.settings.images} lists none"
                if self.settings.images
                else "start the explorer with --images MANIFEST.csv (columns image,label)"
            )
            raise JobFailed(
                "FAILED_PRECONDITION", f"no images of class {target} to fit concepts on: {where}"
            )
        bank = self.client.fit_concepts(
            [path.read_bytes() for path in images],
            model,
            target_class=target,
            model_version=version,
            rank=self.settings.concept_rank,
            nb_design=self.settings.concept_design,
            top_crops=self.settings.concept_crops,
            seed=self.settings.seed,
            on_progress=lambda update: job.progress(
                update.passes_done, update.passes_total, "forward passes"
            ),
        )
        return _bank_dict(bank)

    def _bank(self, model: str, version: str, target: int) -> dict[str, Any]:
        """The class's fitted bank (the page asks for maps and pictures once it is done)."""
        job = self.jobs.find(("concepts", model, version, target, "", self.settings))
        if job is None or job.state != "done":
            state = "being fitted" if job is not None else "not fitted"
            raise JobFailed(
                "FAILED_PRECONDITION",
                f"the concepts of class {target} of {model} are {state}: ask again once the "
                "concepts panel shows them",
            )
        return job.result

    def _concept_map(self, job: Job, model: str, version: str, target: int, image_id: str) -> Any:
        upload = self._upload(image_id)
        bank = self._bank(model, version, target)
        job.progress(0, 0, "concept maps")
        found = self.client.concept_maps(
            upload.image, bank["bank_id"], model=model, model_version=version
        )
        rgb = rgb_of(upload.image)
        importance = {concept["index"]: concept["importance"] for concept in bank["concepts"]}
        return {
            "bank_id": bank["bank_id"],
            "maps": [
                {
                    "concept": int(one.concept),
                    "importance": importance.get(int(one.concept)),
                    "overlay": heat_overlay(rgb, one.values),
                }
                for one in found.maps
            ],
        }

    def _picture(self, job: Job, model: str, version: str, target: int, concept: int | None) -> Any:
        objective: dict[str, Any] = {"class_index": target}
        if concept is not None:
            objective = {
                "bank_id": self._bank(model, version, target)["bank_id"],
                "concept": concept,
            }
        picture = self.client.visualize(
            model,
            **objective,
            model_version=version,
            steps=self.settings.maco_steps,
            crops=self.settings.maco_crops,
            size_px=self.settings.maco_size,
            box_start=self.settings.maco_box_start,
            box_end=self.settings.maco_box_end,
            seed=self.settings.seed,
            on_progress=lambda update: job.progress(
                update.steps_done, update.steps_total, "optimisation steps"
            ),
        )
        return _picture_dict(picture, target, concept, self.settings.picture_px)


# Reading the SDK's results.


def _explorable(info: ModelInfo) -> bool:
    return info.is_classifier and info.state.upper() == "READY"


def _model_dict(info: ModelInfo) -> dict[str, Any]:
    versions = sorted(
        info.versions, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v)
    )
    count = len(info.class_labels) or _class_count(info)
    labels = info.class_labels or tuple(str(index) for index in range(count))
    return {
        "name": info.name,
        "versions": versions[::-1],  # the latest first: the page's default
        "methods": list(info.methods),
        "layers": [layer.name for layer in info.layers],
        "classes": [{"index": index, "label": label} for index, label in enumerate(labels)],
        "description": info.description,
    }


def _class_count(info: ModelInfo) -> int:
    """The classes of a model without labels: its first output's last dimension."""
    if info.outputs and info.outputs[0].shape and info.outputs[0].shape[-1] > 0:
        return info.outputs[0].shape[-1]
    return 0


def _property_dict(found: PropertyResult) -> dict[str, Any]:
    return {
        "name": found.property_name,
        "ok": found.ok,
        "error": found.error,
        "score": finite_or_none(found.score),
        "p_value": finite_or_none(found.p_value),
        "probability_change": finite_or_none(found.probability_change),
        "relevant": found.relevant,
        "flipped": found.prediction_flipped,
        "decision": found.decision.value,
        "decision_detail": found.decision_detail,
        "target_class": found.target_class,
        "target_label": found.target_label,
        "steps": found.steps,
        "warnings": list(found.warnings),
        "curves": [
            [finite_or_none(float(value)) for value in sample.prediction_curve]
            for sample in found.samples
        ],
        "strips": [[png_uri(png) for png in sample.path_images] for sample in found.samples],
    }


def _bank_dict(bank: Any) -> dict[str, Any]:
    return {
        "bank_id": bank.bank_id,
        "model_version": bank.model_version,
        "layer": bank.layer,
        "rank": bank.rank,
        "images": bank.images,
        "crops": bank.crops,
        "reconstruction_error": finite_or_none(bank.reconstruction_error),
        "logit_share_exact": bank.logit_share_exact,
        "warnings": list(bank.warnings),
        "concepts": [
            {
                "index": concept.index,
                "importance": finite_or_none(concept.sobol_total_importance),
                "logit_share": finite_or_none(concept.logit_share),
                "crops": [
                    {
                        "image": crop.image,
                        "coefficient": finite_or_none(crop.coefficient),
                        "uri": png_uri(crop.png),
                    }
                    for crop in concept.top_crops
                ],
            }
            for concept in bank.concepts
        ],
    }


def _picture_dict(picture: Any, target: int, concept: int | None, side: int) -> dict[str, Any]:
    """A ``Visualization``: the picture scaled to ``side`` (nearest: its pixels stay visible)."""
    shown = picture.picture.resize((side, side), Image.NEAREST)
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    probabilities = picture.class_probabilities
    return {
        "concept": concept,
        "uri": png_uri(buffer.getvalue()),
        "objective": finite_or_none(picture.objective),
        "objective_description": picture.objective_description,
        "class_probability": finite_or_none(probabilities[target])
        if target < len(probabilities)
        else None,
        "predicted_class": picture.predicted_class,
        "steps": picture.steps,
        "warnings": list(picture.warnings),
    }


def _index(text: str, what: str) -> int:
    if not text.isdigit():
        raise JobFailed("INVALID_ARGUMENT", f"{what} must be an index, got {text!r}")
    return int(text)
