"""The review spec: a YAML file that says what to compare, on which images, by which rules.

Every path in the spec is relative to the spec file's folder. Unknown keys are errors, so a
typo never silently drops a rule. See docs/review.md for the format with an example.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from propscope._images import folder_images
from propscope._preflight import DEFAULT_STEPS, did_you_mean
from propscope._preprocessing import Preprocessing, read_class_labels
from propscope._properties import Box, Property, parse_property, region_from, split_property

__all__ = ["ImageEntry", "ReviewSpec", "SpecError", "load_spec"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SpecError(ValueError):
    """The spec cannot be used; the message names the file and the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """An unknown key is named with the closest allowed one and every allowed one (pydantic
        would say "Extra inputs are not permitted" and nothing more)."""
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                named = "; ".join(
                    f"unknown key {key!r}{did_you_mean(str(key), allowed)}" for key in unknown
                )
                raise PydanticCustomError(
                    "unknown_key",
                    "{named}; allowed keys: {allowed}",
                    {"named": named, "allowed": ", ".join(allowed)},
                )
        return data


class ServiceSpec(_Strict):
    # The CLI's --target (or $PROPSCOPE_TARGET) overrides this.
    target: str = "localhost:50051"
    # Deadline of each Explain call.
    timeout_s: float = Field(600.0, gt=0)


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
    """Which form a property takes, so that an error names that form's keys only."""
    if isinstance(value, dict):
        return "provided" if "provided" in value else "editor"
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


class MinAccuracyRule(_Strict):
    """The candidate classifies at least ``min`` of the labelled originals as labelled: passed
    when the (1 - 2 alpha) Clopper-Pearson interval of its accuracy lies at or above ``min``,
    failed when it lies below, inconclusive when it straddles ``min``."""

    rule: Literal["min_accuracy"]
    min: float = Field(ge=0, le=1)
    alpha: float = Field(0.05, gt=0, lt=0.5)

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

    @property
    def properties(self) -> None:
        """Checks no property: it reads the originals' predictions."""
        return None


class NoAccuracyRegressionRule(_Strict):
    """The candidate's accuracy is at most ``max_drop`` below the baseline's on the same
    labelled images: Newcombe's paired interval of the difference (at 1 - 2 alpha) decides,
    as for ``min_accuracy``."""

    rule: Literal["no_accuracy_regression"]
    max_drop: float = Field(0.05, ge=0, le=1)
    alpha: float = Field(0.05, gt=0, lt=0.5)

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

    @property
    def properties(self) -> None:
        """Checks no property: it reads the originals' predictions."""
        return None


# The rules that read the labelled originals' predictions (and so need labels).
AccuracyRule = MinAccuracyRule | NoAccuracyRegressionRule


class AttributionSpec(_Strict):
    """How the attribution maps of ``max_attribution_share`` are computed (``Client.attribute``'s
    options). Unset sizes are Sobol's paper defaults, grid 8 and N 32 (2112 forward passes per
    image), or the server's RISE defaults."""

    method: Literal["sobol", "rise"] = "sobol"
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
    target_score: Literal["auto", "probability", "logit", "log_odds"] = "auto"
    perturbation: Literal["inpainting", "blur", "amplitude"] = "inpainting"
    baseline: Literal["input_zero", "black", "mean_colour", "blur"] = "input_zero"
    blur_sigma: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _method_options(self) -> AttributionSpec:
        if self.method == "sobol":
            if self.nb_samples is not None or self.preservation_probability is not None:
                raise ValueError("nb_samples and preservation_probability are RISE options")
            if self.nb_design is not None and self.nb_design & (self.nb_design - 1):
                raise ValueError(f"nb_design must be a power of two, got {self.nb_design}")
        elif (
            self.nb_design is not None
            or self.per_channel
            or self.scrambled
            or self.estimator != "jansen"
        ):
            raise ValueError("nb_design, estimator, per_channel and scrambled are Sobol options")
        return self

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
        if self.method == "sobol":
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


class MaxAttributionShareRule(_Strict):
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

    @property
    def properties(self) -> None:
        """Checks no property: it reads the candidate's attribution maps."""
        return None


Rule = Annotated[
    NotSignificantRule
    | MaxScoreRule
    | NoRegressionRule
    | MaxFlipRateRule
    | MaxAttributionShareRule
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

    @field_validator("properties")
    @classmethod
    def _properties_parse(cls, value: dict[str, PropertySource]) -> dict[str, PropertySource]:
        for name, source in value.items():
            if name != name.strip() or not name:
                raise ValueError(f"property name {name!r} is empty or has surrounding blanks")
            if isinstance(source, str):
                text = split_property(f"{name}={source}")
                if text.folder is not None:
                    ProvidedFolderSpec._per_image(text.folder)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ReviewSpec:
        if self.baseline is not None and (self.baseline.name, self.baseline.version) == (
            self.candidate.name,
            self.candidate.version,
        ):
            raise ValueError("baseline and candidate are the same model and version")
        for index, rule in enumerate(self.rules):
            unknown = sorted(set(rule.properties or ()) - set(self.properties))
            if unknown:
                raise ValueError(f"rules[{index}] ({rule.rule}) names unknown properties {unknown}")
            if isinstance(rule, NoRegressionRule | NoAccuracyRegressionRule) and not self.baseline:
                raise ValueError(f"rules[{index}]: {rule.rule} needs a baseline model")
        share_rules = self.attribution_rules()
        names = [rule.name for rule in share_rules]
        if len(set(names)) != len(names):
            raise ValueError(
                f"max_attribution_share rules need distinct names, got {names} "
                "(name: the region's name in the reports)"
            )
        if self.provided_folders() and self.explain.samples > 1:
            raise ValueError("explain.samples must be 1 with provided paths (they are one path)")
        return self

    def attribution_rules(self) -> list[MaxAttributionShareRule]:
        return [rule for rule in self.rules if isinstance(rule, MaxAttributionShareRule)]

    @property
    def property_names(self) -> list[str]:
        return list(self.properties)

    def provided_folders(self) -> dict[str, str]:
        """Property name -> its per-image folder pattern, for the provided paths."""
        folders = {}
        for name, source in self.properties.items():
            if isinstance(source, ProvidedSpec):
                folders[name] = source.provided.folder
            elif isinstance(source, str) and (folder := split_property(f"{name}={source}").folder):
                folders[name] = folder
        return folders

    def with_base(self, base: Path) -> ReviewSpec:
        """This spec with its files read relative to ``base``; ``SpecError`` when a mask cannot
        be read."""
        spec = self.model_copy()
        spec._base = base
        spec._editor_properties = None
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
        pattern = self.provided_folders()[name]
        image_id = str(Path(image.id).with_suffix(""))
        return self._base / pattern.format(stem=image.path.stem, image=image_id)

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
        if model.class_labels is None:
            return ()
        if isinstance(model.class_labels, list):
            if not all(isinstance(n, str) and n for n in model.class_labels):
                raise SpecError(f"class_labels of {model.name!r} must be non-empty names")
            return tuple(model.class_labels)
        try:
            return read_class_labels(self._base / model.class_labels)
        except ValueError as error:
            raise SpecError(str(error)) from None


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


@dataclass(frozen=True)
class ImageEntry:
    """One image of the set: its id in the reports (the path as the spec gave it) and label."""

    id: str
    path: Path
    label: int | None


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
    """The validated spec and its images; ``SpecError`` names what is wrong."""
    try:
        raw: Any = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as error:
        raise SpecError(f"cannot read the spec {str(path)!r}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping")
    try:
        spec = ReviewSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(f"{path}: {_describe(error)}") from None
    images = _image_entries(spec.images, path.parent)
    try:
        spec = spec.with_base(path.parent)
        for model in (spec.candidate, spec.baseline):
            if model is not None:
                spec.class_labels_of(model)
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None
    for name in spec.provided_folders():
        for image in images:
            folder = spec.provided_folder(name, image)
            try:
                folder_images(folder)
            except ValueError as error:
                raise SpecError(f"{path}: property {name!r}, image {image.id!r}: {error}") from None
    if spec.target_class == "label" and any(image.label is None for image in images):
        raise SpecError(f"{path}: target_class is 'label' but some images have no label")
    if all(image.label is None for image in images):
        for index, rule in enumerate(spec.rules):
            if isinstance(rule, AccuracyRule):
                raise SpecError(
                    f"{path}: rules[{index}]: {rule.rule} needs labelled images (images.manifest "
                    "with a label column); the set has none"
                )
    for index, rule in enumerate(spec.rules):
        if isinstance(rule, NoRegressionRule) and 0.5 ** len(images) >= rule.alpha:
            # The one-sided signed-rank test's smallest p-value is 1/2^n: below that, the rule
            # could never fail, and a gate that cannot fail is worse than none.
            needed = math.floor(math.log2(1 / rule.alpha)) + 1
            raise SpecError(
                f"{path}: rules[{index}]: no_regression at alpha {rule.alpha:g} needs at least "
                f"{needed} images to be able to fail; the set has {len(images)}"
            )
    return spec, images


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "spec"
        message = item["msg"]
        if item["type"] == "union_tag_invalid":
            # An unknown rule name: name the closest rule as for unknown keys.
            tag, expected = item["ctx"]["tag"], item["ctx"]["expected_tags"]
            names = [name.strip(" '") for name in expected.split(",")]
            message = f"unknown rule {tag!r}{did_you_mean(tag, names)}; rules: {', '.join(names)}"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def _image_entries(images: ImagesSpec, base: Path) -> list[ImageEntry]:
    if images.folder is not None:
        folder = base / images.folder
        if not folder.is_dir():
            raise SpecError(f"images.folder {str(folder)!r} is not a folder")
        found = sorted(file for file in folder.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES)
        entries = [ImageEntry(str(file.relative_to(folder)), file, None) for file in found]
    else:
        entries = _manifest_entries(base / (images.manifest or Path()))
    if not entries:
        raise SpecError("the image set is empty")
    return entries


def _manifest_entries(manifest: Path) -> list[ImageEntry]:
    try:
        # utf-8-sig: spreadsheets start their CSV files with a byte-order mark.
        with manifest.open(newline="", encoding="utf-8-sig") as file:
            rows = list(csv.DictReader(file, skipinitialspace=True))
            columns = set(rows[0]) if rows else set()
    except OSError as error:
        raise SpecError(
            f"cannot read images.manifest {str(manifest)!r}: {error.strerror}"
        ) from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise SpecError(f"{manifest}: not a UTF-8 CSV file: {error}") from None
    if rows and "image" not in columns:
        raise SpecError(f"{manifest}: the manifest needs an 'image' column")
    entries = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        image = (row.get("image") or "").strip()
        label_text = (row.get("label") or "").strip()
        if not image:
            raise SpecError(f"{manifest}:{line}: empty image")
        if image in seen:
            raise SpecError(f"{manifest}:{line}: {image!r} is listed twice")
        seen.add(image)
        if label_text and not (label_text.isascii() and label_text.isdigit()):
            raise SpecError(f"{manifest}:{line}: label {label_text!r} is not a class index")
        path = manifest.parent / image
        if not path.is_file():
            raise SpecError(f"{manifest}:{line}: no image at {str(path)!r}")
        entries.append(ImageEntry(image, path, int(label_text) if label_text else None))
    return entries
