"""The review spec: a YAML file that says what to compare, on which images, by which rules.

Every path in the spec is relative to the spec file's folder. Unknown keys are errors, so a
typo never silently drops a rule. See docs/review.md for the format with an example.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from propscope._preflight import (
    DEFAULT_STEPS,
    EXPLAIN_METHOD,
    INTERACTIONS_METHOD,
    Classifier,
    did_you_mean,
    problems_message,
)
from propscope._preprocessing import Preprocessing, read_class_labels
from propscope._properties import Box, Property, parse_property, region_from, split_property
from propscope._target import parse_target
from propscope.review.image_set import (
    ImageEntry,
    image_entries,
    provided_folder,
    provided_problems,
)
from propscope.review.spec_problems import describe, loc_of, place_of, position

__all__ = ["ImageEntry", "ReviewSpec", "ServiceChecks", "SpecError", "load_spec"]

# The validation context's keys: the keys each section allows, by the section's identity; and
# whether load_spec makes the checks across sections itself.
_ALLOWED_KEYS = "allowed_keys"
_SECTIONS_CHECKED = "sections_checked"

Value = TypeVar("Value")


class SpecError(ValueError):
    """The spec cannot be used. ``problems``: one line per problem, each naming its place in the
    spec (``rules[1].properties: ...``); ``checks``: what the service can still be asked about
    (the sections that are valid on their own; None when the file is no YAML mapping)."""

    def __init__(
        self,
        problems: str | Sequence[str],
        *,
        file: Path | None = None,
        checks: ServiceChecks | None = None,
    ) -> None:
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        self.file = file
        self.checks = checks
        if isinstance(problems, str):
            super().__init__(f"{file}: {problems}" if file else problems)
        else:
            super().__init__(problems_message(self.problems, str(file or "")))


@dataclass(frozen=True)
class ServiceChecks:
    """What the pre-flight asks the service about (``preflight``'s arguments), and where the
    service is: the whole spec's, or the sections that are valid on their own."""

    target: str
    timeout_s: float
    classifiers: tuple[Classifier, ...]
    properties: tuple[Property, ...]
    explain: ExplainSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _note_allowed_keys(cls, data: Any, info: ValidationInfo) -> Any:
        """Notes, by the section's identity, the keys it allows: an unknown key is then named
        with the closest allowed one and every allowed one (pydantic would say "Extra inputs
        are not permitted" and nothing more)."""
        if isinstance(data, dict) and isinstance(info.context, dict):
            info.context.setdefault(_ALLOWED_KEYS, {}).setdefault(id(data), list(cls.model_fields))
        return data


class ServiceSpec(_Strict):
    # The CLI's --target (or $PROPSCOPE_TARGET) overrides this. Several gateways as the SDK
    # takes them: dns:///NAME:PORT or IP:PORT,IP:PORT.
    target: str = "localhost:50051"
    # Deadline of each Explain call.
    timeout_s: float = Field(600.0, gt=0)

    @field_validator("target")
    @classmethod
    def _usable(cls, value: str) -> str:
        parse_target(value)  # a ValueError that says what to write
        return value


class PreprocessingSpec(_Strict):
    """A model's preprocessing override; unset fields stay the model's own."""

    mean: list[float] | None = Field(None, min_length=3, max_length=3)
    std: list[float] | None = Field(None, min_length=3, max_length=3)
    output_kind: Literal["logits", "probabilities"] | None = None
    resize: Literal["squash", "center_crop", "letterbox"] | None = None

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and min(value) <= 0:
            raise ValueError("std must be positive")
        return value


class ModelSpec(_Strict):
    # Triton versions are numbers; `version: 2` means "2".
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    name: str = Field(min_length=1)
    version: str = ""
    output: str = ""
    # Overrides, field by field, the preprocessing the model declares in its config.pbtxt.
    preprocessing: PreprocessingSpec | None = None
    # Class names by index, or a file (relative to the spec: a JSON list or one name per line);
    # unset: the model's own propscope.class_labels.
    class_labels: list[str] | str | None = None

    def preprocessing_override(self) -> Preprocessing | None:
        if self.preprocessing is None:
            return None
        spec = self.preprocessing
        return Preprocessing(
            mean=tuple(spec.mean) if spec.mean is not None else None,  # type: ignore[arg-type]
            std=tuple(spec.std) if spec.std is not None else None,  # type: ignore[arg-type]
            output_kind=spec.output_kind,
            resize=spec.resize,
        )


class ImagesSpec(_Strict):
    # Every PNG/JPEG under this folder (recursively, sorted), unlabelled.
    folder: Path | None = None
    # A CSV file with the columns ``image`` (a path relative to the manifest) and, optionally,
    # ``label`` (the class index; empty for an unlabelled image).
    manifest: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ImagesSpec:
        if (self.folder is None) == (self.manifest is None):
            raise ValueError("give exactly one of folder or manifest")
        return self


class RegionSpec(_Strict):
    """Where the edit may change pixels: one of a mask file (relative to the spec), a box in
    fractions of the image, or a box in pixels."""

    mask: str | None = None
    box: list[float] | None = Field(None, min_length=4, max_length=4)
    box_px: list[float] | None = Field(None, min_length=4, max_length=4)

    @model_validator(mode="after")
    def _one_shape(self) -> RegionSpec:
        given = {key: value for key, value in self.model_dump().items() if value is not None}
        if len(given) != 1:
            raise ValueError("give exactly one of mask, box or box_px")
        if self.mask is None:
            region_from(given)  # the box's own checks
        return self


class EditorSpec(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    editor: str = Field(min_length=1)
    version: str = ""
    parameters: dict[str, str | int | float | bool] = {}
    region: RegionSpec | None = None


class ProvidedFolderSpec(_Strict):
    # Each image's own folder, relative to the spec: {stem} is the image's file name without
    # its suffix, {image} its id (its path in the set) without the suffix.
    folder: str = Field(min_length=1)

    @field_validator("folder")
    @classmethod
    def _per_image(cls, value: str) -> str:
        if "{stem}" not in value and "{image}" not in value:
            raise ValueError(
                "the folder must name each image's own path with {stem} or {image}, "
                "e.g. paths/{stem}/"
            )
        try:
            value.format(stem="x", image="x")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"only {{stem}} and {{image}} may be used in braces ({error})"
            ) from None
        return value


class ProvidedSpec(_Strict):
    """The caller's own paths: per image, a folder whose images in natural order are x_1..x_N."""

    provided: ProvidedFolderSpec


def _property_kind(value: Any) -> str:
    """Which form a property takes, so that an error names that form's keys only. Dumping
    a spec (a shard's partial) passes the validated models: they name their own form."""
    if isinstance(value, dict):
        return "provided" if "provided" in value else "editor"
    if isinstance(value, EditorSpec):
        return "editor"
    if isinstance(value, ProvidedSpec):
        return "provided"
    return "text"


PropertySource = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[EditorSpec, Tag("editor")]
    | Annotated[ProvidedSpec, Tag("provided")],
    Discriminator(_property_kind),
]


class ExplainSpec(_Strict):
    """The request settings; 0 (or unset) means the server's default, as in the API."""

    steps: int = Field(10, ge=0)
    samples: int = Field(1, ge=0)
    seed: int = Field(0, ge=0)
    permutations: int = Field(0, ge=0)
    alpha: float = Field(0.0, ge=0, lt=1)
    min_probability_change: float | None = Field(None, ge=0, le=1)
    # adaptive: the service lengthens a path the test cannot decide, up to max_steps (0: the
    # server's limit); fixed: exactly steps. Scores at another N are compared at steps N.
    path_mode: Literal["adaptive", "fixed"] = "adaptive"
    max_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _max_steps(self) -> ExplainSpec:
        if self.path_mode == "fixed" and self.max_steps not in (0, self.steps or DEFAULT_STEPS):
            raise ValueError(
                "max_steps applies to adaptive paths; a fixed path has exactly steps images: "
                "leave max_steps 0 or use path_mode adaptive"
            )
        if self.max_steps and self.steps and self.max_steps < self.steps:
            raise ValueError(f"max_steps ({self.max_steps}) must be at least steps")
        return self


Metric = Literal["score", "score_per_unit_strength", "probability_change"]


class _Rule(_Strict):
    # The properties the rule checks; unset means every property of the spec.
    properties: list[str] | None = None


class NotSignificantRule(_Rule):
    """The candidate may be significant on at most ``max_fraction`` of the images."""

    rule: Literal["not_significant"]
    max_fraction: float = Field(0.0, ge=0, le=1)
    # "relevant" counts only significant effects at least min_probability_change large.
    decision: Literal["significant", "relevant"] = "significant"


class MaxScoreRule(_Rule):
    """The candidate's mean ``metric`` over images is at most ``max``."""

    rule: Literal["max_score"]
    max: float = Field(ge=0)
    metric: Metric = "score"


class NoRegressionRule(_Rule):
    """The candidate's ``metric`` is not above the baseline's × (1 + tolerance) + margin,
    by a one-sided paired test over images."""

    rule: Literal["no_regression"]
    tolerance: float = Field(0.1, ge=0)
    # An absolute allowance: ratios of scores near zero say nothing.
    margin: float = Field(0.0, ge=0)
    alpha: float = Field(0.05, gt=0, lt=1)
    metric: Metric = "score"


class MaxFlipRateRule(_Rule):
    """The candidate's predicted class changes along the path on at most ``max`` of the
    paths (the mean over images of each image's flip rate)."""

    rule: Literal["max_flip_rate"]
    max: float = Field(ge=0, le=1)


class _NoPropertiesRule(_Strict):
    """A rule that checks no property: it reads the originals' predictions or the candidate's
    attribution maps, not the property paths."""

    @property
    def properties(self) -> None:
        return None


# The accuracy rules' alpha: each side of their two-sided (1 - 2 alpha) interval.
_AccuracyAlpha = Annotated[float, Field(gt=0, lt=0.5)]


class MinAccuracyRule(_NoPropertiesRule):
    """The candidate classifies at least ``min`` of the labelled originals as labelled: passed
    when the (1 - 2 alpha) Clopper-Pearson interval of its accuracy lies at or above ``min``,
    failed when it lies below, inconclusive when it straddles ``min``."""

    rule: Literal["min_accuracy"]
    min: float = Field(ge=0, le=1)
    alpha: _AccuracyAlpha = 0.05

    @field_validator("min")
    @classmethod
    def _can_pass(cls, minimum: float) -> float:
        """With every image right the interval's lower bound is alpha^(1/n) < 1: min 1
        would leave the rule inconclusive however many images there are."""
        if minimum == 1:
            raise PydanticCustomError(
                "unreachable_min",
                "min 1 can never pass: the exact interval's lower bound stays below 1 however "
                "many images are right; give a min below 1 (e.g. 0.99)",
            )
        return minimum


class NoAccuracyRegressionRule(_NoPropertiesRule):
    """The candidate's accuracy is at most ``max_drop`` below the baseline's on the same
    labelled images: Newcombe's paired interval of the difference (at 1 - 2 alpha) decides,
    as for ``min_accuracy``."""

    rule: Literal["no_accuracy_regression"]
    max_drop: float = Field(0.05, ge=0, le=1)
    alpha: _AccuracyAlpha = 0.05

    @field_validator("max_drop")
    @classmethod
    def _can_pass(cls, max_drop: float) -> float:
        """Equal accuracies' interval always reaches below 0: max_drop 0 would leave a
        candidate as good as the baseline inconclusive however many images there are."""
        if max_drop == 0:
            raise PydanticCustomError(
                "unreachable_max_drop",
                "max_drop 0 can never pass a candidate as accurate as the baseline: the "
                "difference's interval always reaches below 0; give a max_drop above 0 "
                "(e.g. 0.05)",
            )
        return max_drop


# The rules that read the labelled originals' predictions (and so need labels).
AccuracyRule = MinAccuracyRule | NoAccuracyRegressionRule


class AttributionSpec(_Strict):
    """How the attribution maps of ``max_attribution_share`` are computed (``Client.attribute``'s
    options). Unset sizes are Sobol's paper defaults, grid 8 and N 32 (2112 forward passes per
    image), or the server's RISE and EVA defaults. EVA needs an open model with the ``bounds``
    capability; its map is verified (guaranteed) unless ``hybrid_layer`` is given."""

    method: Literal["sobol", "rise", "eva"] = "sobol"
    grid_size: int | None = Field(None, ge=2, le=64)
    # Sobol: N, a power of two.
    nb_design: int | None = Field(None, ge=2, le=1024)
    estimator: Literal["jansen", "homma", "janon", "glen_isaacs", "saltelli"] = "jansen"
    per_channel: bool = False
    # Sobol: an Owen-scrambled design seeded by ``seed`` (default: Xplique's unscrambled one).
    scrambled: bool = False
    # RISE: masks, and the probability a cell is kept.
    nb_samples: int | None = Field(None, ge=1)
    preservation_probability: float | None = Field(None, gt=0, lt=1)
    # EVA: the l-inf radius as a fraction of the pixel range (server default 8/255), the bound
    # propagation, a declared layer to verify from (NOT guaranteed), the points sampled.
    epsilon: float | None = Field(None, gt=0, le=1)
    bound: Literal["crown", "ibp"] | None = None
    hybrid_layer: str = ""
    samples: int | None = Field(None, ge=1, le=65536)
    target_score: Literal["auto", "probability", "logit", "log_odds"] = "auto"
    perturbation: Literal["inpainting", "blur", "amplitude"] = "inpainting"
    baseline: Literal["input_zero", "black", "mean_colour", "blur"] = "input_zero"
    blur_sigma: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _method_options(self) -> AttributionSpec:
        eva_given = (self.epsilon, self.bound, self.samples) != (None, None, None)
        if self.method != "eva" and (eva_given or self.hybrid_layer):
            raise ValueError(
                "epsilon, bound, hybrid_layer and samples are EVA options (method: eva)"
            )
        sobol_given = (
            self.nb_design is not None
            or self.per_channel
            or self.scrambled
            or self.estimator != "jansen"
        )
        if self.method != "sobol" and sobol_given:
            raise ValueError("nb_design, estimator, per_channel and scrambled are Sobol options")
        if self.method == "eva":
            self._eva_options()
        elif self.method == "sobol":
            if self.nb_samples is not None or self.preservation_probability is not None:
                raise ValueError("nb_samples and preservation_probability are RISE options")
            if self.nb_design is not None and self.nb_design & (self.nb_design - 1):
                raise ValueError(f"nb_design must be a power of two, got {self.nb_design}")
        return self

    def _eva_options(self) -> None:
        if self.nb_samples is not None or self.preservation_probability is not None:
            raise ValueError(
                "nb_samples and preservation_probability are RISE options; EVA's sampled "
                "points are samples"
            )
        if self.grid_size is not None and self.grid_size > 32:
            raise ValueError(f"EVA's grid_size must be in 2..32, got {self.grid_size}")
        if self.target_score not in ("auto", "logit"):
            raise ValueError(
                f"EVA bounds logit margins: target_score must be auto or logit, got "
                f"{self.target_score!r}"
            )
        if (self.perturbation, self.baseline, self.blur_sigma) != ("inpainting", "input_zero", 0):
            raise ValueError(
                "perturbation, baseline and blur_sigma set how Sobol and RISE mask pixels; "
                "EVA perturbs every pixel within epsilon: leave them out"
            )

    def client_options(self) -> dict[str, Any]:
        """The keywords of ``Client.attribute``."""
        options: dict[str, Any] = {
            "method": self.method,
            "target_score": self.target_score,
            "perturbation": self.perturbation,
            "baseline": self.baseline,
            "blur_sigma": self.blur_sigma,
            "seed": self.seed,
        }
        if self.method == "eva":
            options.update(
                grid_size=self.grid_size or 0,
                epsilon=self.epsilon,
                bound=self.bound,
                hybrid_layer=self.hybrid_layer,
                samples=self.samples or 0,
            )
        elif self.method == "sobol":
            options.update(
                grid_size=self.grid_size or 8,
                nb_design=self.nb_design or 32,
                estimator=self.estimator,
                per_channel=self.per_channel,
                scrambled=self.scrambled,
            )
        else:
            options.update(
                grid_size=self.grid_size or 0,
                nb_samples=self.nb_samples or 0,
                preservation_probability=self.preservation_probability,
            )
        return options


class ShareRegionSpec(_Strict):
    """The region whose share of the attribution mass is bounded: a box in fractions of the
    image or in pixels, [left, right) x [top, bottom)."""

    box: list[float] | None = Field(None, min_length=4, max_length=4)
    box_px: list[float] | None = Field(None, min_length=4, max_length=4)

    @model_validator(mode="after")
    def _one_box(self) -> ShareRegionSpec:
        given = {key: value for key, value in self.model_dump().items() if value is not None}
        if len(given) != 1:
            raise ValueError("give exactly one of box or box_px")
        region_from(given)  # the box's own checks
        return self

    def to_box(self) -> Box:
        shape = {key: value for key, value in self.model_dump().items() if value is not None}
        box = region_from(shape)
        assert isinstance(box, Box)
        return box


class MaxAttributionShareRule(_NoPropertiesRule):
    """The candidate puts at most ``max`` of its attribution mass (the sum of the map's
    positive values) inside ``region``, e.g. a watermark corner: over the images on average
    (``over: mean``) or on every image (``over: every_image``)."""

    rule: Literal["max_attribution_share"]
    # The region's name in the reports (where the other rules name their property).
    name: str = Field("region", min_length=1)
    region: ShareRegionSpec
    max: float = Field(ge=0, le=1)
    over: Literal["mean", "every_image"] = "mean"
    attribution: AttributionSpec = AttributionSpec()


class InteractionSettingsSpec(_Strict):
    """How the Sobol indices of ``max_interaction_share`` are estimated
    (``Client.interactions``' options; unset: the server's defaults, N 32 and 1000 bootstrap
    resamples)."""

    # N, a power of two: N (P + 2) edited images per image.
    design_size: int | None = Field(None, ge=4, le=1024)
    bootstrap: int | None = Field(None, ge=100, le=100_000)
    # The level of each image's interval, which the rule's verdict reads.
    confidence: float = Field(0.95, gt=0, lt=1)
    target_score: Literal["auto", "probability", "logit", "log_odds"] = "auto"
    seed: int = Field(0, ge=0)

    @field_validator("design_size")
    @classmethod
    def _power_of_two(cls, size: int | None) -> int | None:
        if size is not None and size & (size - 1):
            below = 1 << (size.bit_length() - 1)
            raise PydanticCustomError(
                "design_size",
                "design_size must be a power of two, got {size}; the nearest: {below} or {above}",
                {"size": size, "below": below, "above": 2 * below},
            )
        return size

    def client_options(self) -> dict[str, Any]:
        """The keywords of ``Client.interactions``."""
        return {
            "design_size": self.design_size or 0,
            "bootstrap": self.bootstrap or 0,
            "confidence": self.confidence,
            "target_score": self.target_score,
            "seed": self.seed,
        }


class MaxInteractionShareRule(_Rule):
    """The candidate's interaction share (sum of total- minus sum of first-order Sobol
    indices over ``properties``' strengths, composed in that order; unset: every property)
    is at most ``max``: on average over the images (``over: mean``) or on every image
    (``over: every_image``). Failed when the share's interval lies above ``max`` (its lower
    bound: noise alone cannot fail the gate), passed when it lies at or below (its upper
    bound: noise alone cannot pass it), inconclusive when it straddles ``max``."""

    rule: Literal["max_interaction_share"]
    # The rule's name in the reports (where the other rules name their property).
    name: str = Field("interactions", min_length=1)
    max: float = Field(ge=0)
    over: Literal["mean", "every_image"] = "mean"
    interactions: InteractionSettingsSpec = InteractionSettingsSpec()


Rule = Annotated[
    NotSignificantRule
    | MaxScoreRule
    | NoRegressionRule
    | MaxFlipRateRule
    | MaxAttributionShareRule
    | MaxInteractionShareRule
    | MinAccuracyRule
    | NoAccuracyRegressionRule,
    Field(discriminator="rule"),
]


class ReviewSpec(_Strict):
    title: str = "propscope review"
    service: ServiceSpec = ServiceSpec()
    candidate: ModelSpec
    baseline: ModelSpec | None = None
    images: ImagesSpec
    # Whose probability to follow along the path: every image's label (the same class for both
    # models; needs labels) or each model's own prediction on the original image. Unset: "label"
    # when every image has a label, else "predicted".
    target_class: Literal["label", "predicted"] | None = None
    properties: dict[str, PropertySource] = Field(min_length=1)
    explain: ExplainSpec = ExplainSpec()
    # Explain calls in flight; each image runs its candidate and then its baseline, so that the
    # baseline finds the candidate's edited paths in the cache.
    concurrency: int = Field(4, ge=1, le=64)
    # Per property, how many of the most affected images the HTML report shows as path strips.
    strips: int = Field(3, ge=0, le=20)
    rules: list[Rule] = []
    # Whether a rule the set cannot decide (verdict inconclusive) fails the gate (exit code 4);
    # either way it is reported apart from the passed ones.
    fail_on_inconclusive: bool = False
    # The spec file's folder: what mask files and provided-path folders are relative to.
    _base: Path = PrivateAttr(default_factory=Path)
    _editor_properties: dict[str, Property] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> ReviewSpec:
        """The checks across sections; ``load_spec`` makes them itself, on the sections that
        are valid on their own, so that one run names the problems of every section."""
        if isinstance(info.context, dict) and info.context.get(_SECTIONS_CHECKED):
            return self
        problems = _Sections.of_spec(self).problems()
        if problems:
            raise PydanticCustomError(
                "spec_sections", "{problems}", {"problems": "; ".join(problems)}
            )
        return self

    def attribution_rules(self) -> list[MaxAttributionShareRule]:
        return [rule for rule in self.rules if isinstance(rule, MaxAttributionShareRule)]

    def interaction_rules(self) -> list[MaxInteractionShareRule]:
        return [rule for rule in self.rules if isinstance(rule, MaxInteractionShareRule)]

    @property
    def property_names(self) -> list[str]:
        return list(self.properties)

    def provided_folders(self) -> dict[str, str]:
        """Property name -> its per-image folder pattern, for the provided paths."""
        return _provided_folders(self.properties)

    def service_checks(self) -> ServiceChecks:
        """What the pre-flight asks the service about."""
        return _Sections.of_spec(self).service_checks()

    def with_base(
        self, base: Path, editor_properties: dict[str, Property] | None = None
    ) -> ReviewSpec:
        """This spec with its files read relative to ``base``; ``SpecError`` when a mask cannot
        be read. ``editor_properties``: those already built from ``base`` (``load_spec``'s
        checks read the masks), not read again."""
        spec = self.model_copy()
        spec._base = base
        spec._editor_properties = editor_properties
        spec.editor_properties()
        return spec

    def editor_properties(self) -> dict[str, Property]:
        """The editor properties, their mask files read (once)."""
        if self._editor_properties is None:
            provided = self.provided_folders()
            try:
                self._editor_properties = {
                    name: _editor_property(name, source, self._base)
                    for name, source in self.properties.items()
                    if name not in provided
                }
            except ValueError as error:
                raise SpecError(f"properties: {error}") from None
        return self._editor_properties

    def provided_folder(self, name: str, image: ImageEntry) -> Path:
        return self._base / provided_folder(self.provided_folders()[name], image)

    def properties_for(self, image: ImageEntry) -> list[Property]:
        """Every property of the spec for one image, in spec order (provided paths read from
        the image's own folder)."""
        editors = self.editor_properties()
        properties = []
        for name in self.properties:
            if name in editors:
                properties.append(editors[name])
                continue
            try:
                properties.append(Property.from_folder(name, self.provided_folder(name, image)))
            except ValueError as error:
                raise SpecError(f"property {name!r}, image {image.id!r}: {error}") from None
        return properties

    def class_labels_of(self, model: ModelSpec) -> tuple[str, ...]:
        """The model's class labels as given in the spec (a list, or a file's names)."""
        try:
            return _class_labels(model, self._base)
        except ValueError as error:
            raise SpecError(str(error)) from None


def _class_labels(model: ModelSpec, base: Path) -> tuple[str, ...]:
    if model.class_labels is None:
        return ()
    if isinstance(model.class_labels, list):
        if not all(isinstance(n, str) and n for n in model.class_labels):
            raise ValueError(f"class_labels of {model.name!r} must be non-empty names")
        return tuple(model.class_labels)
    return read_class_labels(base / model.class_labels)


def _provided_folders(properties: Mapping[str, PropertySource]) -> dict[str, str]:
    folders = {}
    for name, source in properties.items():
        if isinstance(source, ProvidedSpec):
            folders[name] = source.provided.folder
        elif isinstance(source, str):
            try:
                folder = split_property(f"{name}={source}").folder
            except ValueError:
                continue  # a problem of its own
            if folder is not None:
                folders[name] = folder
    return folders


def _editor_outline(name: str, source: PropertySource) -> Property | None:
    """The editor property without its region (no file read): what the pre-flight checks."""
    try:
        if isinstance(source, EditorSpec):
            return Property(
                name=name,
                editor=source.editor,
                editor_version=source.version,
                parameters={key: _parameter_text(v) for key, v in source.parameters.items()},
            )
        if isinstance(source, str):
            text = split_property(f"{name}={source}")
            if text.editor is not None:
                return Property(
                    name=name,
                    editor=text.editor,
                    editor_version=text.version,
                    parameters=text.parameters,
                )
    except ValueError:
        pass  # a problem of its own
    return None


def _text_problems(name: str, source: str) -> list[str]:
    try:
        text = split_property(f"{name}={source}")
        if text.folder is not None:
            ProvidedFolderSpec._per_image(text.folder)
    except ValueError as error:
        return [f"{place_of(('properties', name))}: {error}"]
    return []


def _editor_property(name: str, source: PropertySource, base: Path) -> Property:
    if isinstance(source, str):
        return parse_property(f"{name}={source}", base=base)
    assert isinstance(source, EditorSpec)
    region = None
    if source.region is not None:
        if source.region.mask is not None:
            # parse_property's reading of mask files, errors included.
            region = parse_property(f"{name}=x;mask={source.region.mask}", base=base).region
        else:
            shape = {k: v for k, v in source.region.model_dump().items() if v is not None}
            region = region_from(shape)
    return Property(
        name=name,
        editor=source.editor,
        editor_version=source.version,
        parameters={key: _parameter_text(value) for key, value in source.parameters.items()},
        region=region,
    )


def _parameter_text(value: str | int | float | bool) -> str:
    # YAML reads `amount: 0.2` as a float and `invert: true` as a bool; editors take strings.
    return str(value).lower() if isinstance(value, bool) else str(value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice: PyYAML would keep the last silently, and a second
    ``rules:`` block would drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for index, key in enumerate(keys):
            if key in keys[:index]:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", node.value[index][0].start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_spec(path: Path) -> tuple[ReviewSpec, list[ImageEntry]]:
    """The validated spec and its images. ``SpecError`` lists every problem of the file in one
    run, each naming its place: every section is checked, and so are the files and the image
    set of the sections that are valid on their own."""
    raw = _read_spec(path)
    context: dict[str, Any] = {_SECTIONS_CHECKED: True}
    problems: list[str] = []
    spec = None
    try:
        spec = ReviewSpec.model_validate(raw, context=context)
    except ValidationError as error:
        allowed = context.get(_ALLOWED_KEYS, {})
        problems += [describe(item, raw, allowed, RULE_NAMES) for item in error.errors()]
    sections = _Sections.of_raw(raw)
    problems += sections.problems()
    images, image_problems = sections.image_set(path.parent)
    problems += image_problems
    file_problems, editors = sections.file_problems(path.parent, images)
    problems += file_problems
    problems += sections.set_problems(images)
    # In the file's order; at one place, its fields' problems before those of its files.
    problems.sort(key=lambda problem: position(raw, loc_of(problem)))
    if problems:
        raise SpecError(problems, file=path, checks=sections.service_checks())
    assert spec is not None  # a spec pydantic refuses has problems
    return spec.with_base(path.parent, editors), images


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        raw: Any = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as error:
        problem = f"cannot read the spec {str(path)!r}: {error.strerror or error}"
        raise SpecError([problem], file=path) from None
    except UnicodeDecodeError as error:
        problem = f"not UTF-8 text ({error.reason} at byte {error.start})"
        raise SpecError([problem], file=path) from None
    except yaml.YAMLError as error:
        raise SpecError([f"not valid YAML: {error}"], file=path) from None
    if not isinstance(raw, dict):
        raise SpecError(["the spec must be a YAML mapping"], file=path)
    return raw


def _valid(validate: Callable[[Any], Value], value: Any) -> Value | None:
    """``value`` validated, or None when it is not valid on its own."""
    try:
        return validate(value)
    except ValueError:  # pydantic's ValidationError included
        return None


_RULE = TypeAdapter(Rule)
_PROPERTY = TypeAdapter(PropertySource)
RULE_NAMES = tuple(
    name
    for kind in get_args(get_args(Rule)[0])
    for name in get_args(kind.model_fields["rule"].annotation)
)
# A properties key in these rules is an unknown key, a problem of its own.
_RULES_WITHOUT_PROPERTIES = tuple(
    name
    for kind in get_args(get_args(Rule)[0])
    if "properties" not in kind.model_fields
    for name in get_args(kind.model_fields["rule"].annotation)
)


@dataclass(frozen=True)
class _Sections:
    """The sections of a spec that are valid on their own (None, or left out, when not): the
    checks across sections, of files and by the service then run on a spec with problems
    elsewhere, so that one run names every problem."""

    service: ServiceSpec | None
    candidate: ModelSpec | None
    baseline: ModelSpec | None
    baseline_given: bool
    images: ImagesSpec | None
    target_class: str | None
    # Every property name the spec gives, valid or not; the valid properties.
    property_names: tuple[str, ...]
    properties: dict[str, PropertySource]
    explain: ExplainSpec | None
    # The valid rules, with their index in the spec.
    rules: tuple[tuple[int, Rule], ...]
    # The property names of every rule that takes properties, valid or not, with its index.
    rule_properties: tuple[tuple[int, tuple[str, ...]], ...]

    @classmethod
    def of_spec(cls, spec: ReviewSpec) -> _Sections:
        return cls(
            spec.service,
            spec.candidate,
            spec.baseline,
            spec.baseline is not None,
            spec.images,
            spec.target_class,
            tuple(spec.properties),
            dict(spec.properties),
            spec.explain,
            tuple(enumerate(spec.rules)),
            tuple((index, tuple(rule.properties or ())) for index, rule in enumerate(spec.rules)),
        )

    @classmethod
    def of_raw(cls, raw: Mapping[str, Any]) -> _Sections:
        properties = raw.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        rules = raw.get("rules")
        rules = rules if isinstance(rules, list) else []
        valid_properties = {
            str(name): source
            for name, value in properties.items()
            if (source := _valid(_PROPERTY.validate_python, value)) is not None
        }
        valid_rules = tuple(
            (index, rule)
            for index, value in enumerate(rules)
            if (rule := _valid(_RULE.validate_python, value)) is not None
        )
        target_class = raw.get("target_class")
        return cls(
            _valid(ServiceSpec.model_validate, raw.get("service", {})),
            _valid(ModelSpec.model_validate, raw.get("candidate")),
            _valid(ModelSpec.model_validate, raw.get("baseline")),
            raw.get("baseline") is not None,
            _valid(ImagesSpec.model_validate, raw.get("images")),
            target_class if target_class in ("label", "predicted") else None,
            tuple(str(name) for name in properties),
            valid_properties,
            _valid(ExplainSpec.model_validate, raw.get("explain", {})),
            valid_rules,
            tuple(
                (index, tuple(name for name in names if isinstance(name, str)))
                for index, value in enumerate(rules)
                if isinstance(value, dict)
                and isinstance(names := value.get("properties"), list)
                and value.get("rule") not in _RULES_WITHOUT_PROPERTIES
            ),
        )

    def problems(self) -> list[str]:
        """The checks across sections (and of the text properties, which need their name)."""
        problems = [
            f"properties: property name {name!r} is empty or has surrounding blanks"
            for name in self.property_names
            if not name or name != name.strip()
        ]
        for name, source in self.properties.items():
            if isinstance(source, str):
                problems += _text_problems(name, source)
        if (
            self.candidate is not None
            and self.baseline is not None
            and (self.baseline.name, self.baseline.version)
            == (self.candidate.name, self.candidate.version)
        ):
            problems.append("baseline: baseline and candidate are the same model and version")
        known = ", ".join(self.property_names)
        for index, names in self.rule_properties if self.property_names else ():
            # No property names: the spec's properties are missing or no mapping, a problem
            # of their own.
            for name in names:
                if name not in self.property_names:
                    problems.append(
                        f"rules[{index}].properties: unknown property {name!r}"
                        f"{did_you_mean(name, self.property_names)}; the spec's properties: "
                        f"{known}"
                    )
        for index, rule in self.rules:
            if (
                isinstance(rule, NoRegressionRule | NoAccuracyRegressionRule)
                and not self.baseline_given
            ):
                problems.append(f"rules[{index}]: {rule.rule} needs a baseline model")
        names = [rule.name for _, rule in self.rules if isinstance(rule, MaxAttributionShareRule)]
        if len(set(names)) != len(names):
            problems.append(
                f"rules: max_attribution_share rules need distinct names, got {names} "
                "(name: the region's name in the reports)"
            )
        problems += self._interaction_problems()
        if _provided_folders(self.properties) and self.explain and self.explain.samples > 1:
            problems.append(
                "explain.samples: must be 1 with provided paths (they are one path each)"
            )
        return problems

    def _interaction_problems(self) -> list[str]:
        """max_interaction_share: distinct names, two or more properties, editors only (a
        provided path is one fixed path: it cannot compose with other edits)."""
        rules = [(i, rule) for i, rule in self.rules if isinstance(rule, MaxInteractionShareRule)]
        names = [rule.name for _, rule in rules]
        problems = []
        if len(set(names)) != len(names):
            problems.append(
                f"rules: max_interaction_share rules need distinct names, got {names} "
                "(name: the rule's name in the reports)"
            )
        provided = _provided_folders(self.properties)
        for index, rule in rules if self.property_names else ():
            chosen = rule.properties or list(self.property_names)
            if len(set(chosen)) < 2:
                problems.append(
                    f"rules[{index}].properties: max_interaction_share needs at least two "
                    f"properties, got {len(set(chosen))}"
                )
            folders = [name for name in chosen if name in provided]
            if folders:
                problems.append(
                    f"rules[{index}].properties: {folders[0]!r} is a provided path, which "
                    "cannot compose with other edits: list editor properties only"
                )
        return problems

    def image_set(self, base: Path) -> tuple[list[ImageEntry], list[str]]:
        """The images and the problems of reading them."""
        if self.images is None:
            return [], []
        folder, manifest = self.images.folder, self.images.manifest
        return image_entries(
            base / folder if folder is not None else None,
            base / manifest if manifest is not None else None,
        )

    def file_problems(
        self, base: Path, images: Sequence[ImageEntry]
    ) -> tuple[list[str], dict[str, Property]]:
        """The mask files, class label files and provided-path folders that cannot be used; and
        the editor properties built on the way (their masks read), for the spec to keep."""
        problems: list[str] = []
        editors: dict[str, Property] = {}
        provided = _provided_folders(self.properties)
        for name, source in self.properties.items():
            where = place_of(("properties", name))
            if name in provided:
                problems += provided_problems(where, base, provided[name], images)
            elif not (isinstance(source, str) and _text_problems(name, source)):
                try:
                    editors[name] = _editor_property(name, source, base)
                except ValueError as error:
                    problems.append(f"{where}: {_without_name(str(error), name)}")
        for role, model in (("candidate", self.candidate), ("baseline", self.baseline)):
            if model is not None:
                try:
                    _class_labels(model, base)
                except ValueError as error:
                    problems.append(f"{role}.class_labels: {error}")
        return problems, editors

    def set_problems(self, images: Sequence[ImageEntry]) -> list[str]:
        """The rules and settings the image set cannot serve."""
        if not images:
            return []
        problems = []
        unlabelled = [image for image in images if image.label is None]
        if self.target_class == "label" and unlabelled:
            problems.append(
                f"target_class: 'label', but some images have no label ({len(unlabelled)} of "
                f"{len(images)}, e.g. {unlabelled[0].id!r})"
            )
        for index, rule in self.rules:
            if isinstance(rule, AccuracyRule) and len(unlabelled) == len(images):
                problems.append(
                    f"rules[{index}]: {rule.rule} needs labelled images (images.manifest with a "
                    "label column); the set has none"
                )
            if isinstance(rule, NoRegressionRule) and 0.5 ** len(images) >= rule.alpha:
                # The one-sided signed-rank test's smallest p-value is 1/2^n: below that, the
                # rule could never fail, and a gate that cannot fail is worse than none.
                needed = math.floor(math.log2(1 / rule.alpha)) + 1
                problems.append(
                    f"rules[{index}]: no_regression at alpha {rule.alpha:g} needs at least "
                    f"{needed} images to be able to fail; the set has {len(images)}"
                )
        return problems

    def service_checks(self) -> ServiceChecks:
        service = self.service or ServiceSpec()
        methods = sorted(
            {
                rule.attribution.method
                for _, rule in self.rules
                if isinstance(rule, MaxAttributionShareRule)
            }
            | {
                INTERACTIONS_METHOD
                for _, rule in self.rules
                if isinstance(rule, MaxInteractionShareRule)
            }
        )
        classifiers = []
        if self.candidate is not None:
            candidate = self.candidate
            classifiers.append(
                Classifier(
                    candidate.name,
                    candidate.version,
                    (EXPLAIN_METHOD, *methods),
                    role="candidate",
                )
            )
        if self.baseline is not None:
            classifiers.append(
                Classifier(self.baseline.name, self.baseline.version, role="baseline")
            )
        properties = (_editor_outline(name, source) for name, source in self.properties.items())
        return ServiceChecks(
            service.target,
            service.timeout_s,
            tuple(classifiers),
            tuple(prop for prop in properties if prop is not None),
            self.explain or ExplainSpec(),
        )


def _without_name(message: str, name: str) -> str:
    """A property's message after its place is named: without its own ``property 'x': ``."""
    return message.removeprefix(f"property {name!r}: ")
