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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from propscope._properties import Property, parse_property
from propscope._requests import normalize_properties

__all__ = ["ImageEntry", "ReviewSpec", "SpecError", "load_spec"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SpecError(ValueError):
    """The spec cannot be used; the message names the file and the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceSpec(_Strict):
    # The CLI's --target (or $PROPSCOPE_TARGET) overrides this.
    target: str = "localhost:50051"
    # Deadline of each Explain call.
    timeout_s: float = Field(600.0, gt=0)


class ModelSpec(_Strict):
    # Triton versions are numbers; `version: 2` means "2".
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    name: str = Field(min_length=1)
    version: str = ""
    output: str = ""


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


class EditorSpec(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    editor: str = Field(min_length=1)
    version: str = ""
    parameters: dict[str, str | int | float | bool] = {}


class ExplainSpec(_Strict):
    """The request settings; 0 (or unset) means the server's default, as in the API."""

    steps: int = Field(10, ge=0)
    samples: int = Field(1, ge=0)
    seed: int = Field(0, ge=0)
    permutations: int = Field(0, ge=0)
    alpha: float = Field(0.0, ge=0, lt=1)
    min_probability_change: float | None = Field(None, ge=0, le=1)


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


Rule = Annotated[
    NotSignificantRule | MaxScoreRule | NoRegressionRule | MaxFlipRateRule,
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
    properties: dict[str, str | EditorSpec] = Field(min_length=1)
    explain: ExplainSpec = ExplainSpec()
    # Explain calls in flight; each image runs its candidate and then its baseline, so that the
    # baseline finds the candidate's edited paths in the cache.
    concurrency: int = Field(4, ge=1, le=64)
    # Per property, how many of the most affected images the HTML report shows as path strips.
    strips: int = Field(3, ge=0, le=20)
    rules: list[Rule] = []

    @field_validator("properties")
    @classmethod
    def _properties_parse(cls, value: dict[str, str | EditorSpec]) -> dict[str, str | EditorSpec]:
        for name, source in value.items():
            if name != name.strip() or not name:
                raise ValueError(f"property name {name!r} is empty or has surrounding blanks")
            _to_property(name, source)
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
            if isinstance(rule, NoRegressionRule) and self.baseline is None:
                raise ValueError(f"rules[{index}]: no_regression needs a baseline model")
        return self

    def property_list(self) -> list[Property]:
        return normalize_properties(
            [_to_property(name, source) for name, source in self.properties.items()]
        )


def _to_property(name: str, source: str | EditorSpec) -> Property:
    if isinstance(source, str):
        return parse_property(f"{name}={source}")
    return Property(
        name=name,
        editor=source.editor,
        editor_version=source.version,
        parameters={key: _parameter_text(value) for key, value in source.parameters.items()},
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
    if spec.target_class == "label" and any(image.label is None for image in images):
        raise SpecError(f"{path}: target_class is 'label' but some images have no label")
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
        problems.append(f"{where}: {item['msg']}")
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
