"""The review runner's logic against a fake client (ordering, concurrency, errors, strips); the
real service is exercised by tests/integration/test_review.py."""

from __future__ import annotations

import io
import random
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from propscope._events import (
    Accepted,
    Decision,
    EditorParameter,
    ModelInfo,
    ModelRole,
    PropertyResult,
    SampleResult,
)
from propscope._preprocessing import Preprocessing
from propscope.review.report import render_html, render_markdown
from propscope.review.runner import ReviewError, observation_from_result, run_review
from propscope.review.spec import ImageEntry, ReviewSpec, load_spec

STEPS = 4


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


TINY_PNG = _tiny_png()


def sample(curve: list[float], classes: list[int], images: tuple[bytes, ...] = ()) -> SampleResult:
    return SampleResult(
        seed=0,
        score=0.0,
        p_value=1.0,
        prediction_curve=np.array(curve),
        predicted_classes=np.array(classes),
        cache_hit=False,
        path_images=images,
    )


def property_result(
    name: str, score: float, *samples: SampleResult, ok: bool = True
) -> PropertyResult:
    return PropertyResult(
        request_id="",
        property_name=name,
        status_code=grpc.StatusCode.OK if ok else grpc.StatusCode.INTERNAL,
        error=None if ok else "editor exploded",
        score=score,
        score_per_unit_strength=score * STEPS,
        score_ci_low=score,
        score_ci_high=score,
        p_value=0.5,
        significant=False,
        prediction_flipped=False,
        flip_rate=0.0,
        mean_signed_gradient=0.0,
        probability_change=0.0,
        relevant=False,
        pearson_correlation=None,
        mutual_information=None,
        target_class=0,
        samples=samples,
        cache_hits=0,
        cache_misses=1,
    )


def model_info(name: str, role: ModelRole) -> ModelInfo:
    parameters = (
        (EditorParameter("operation", "", "", ("hue", "blur")),) if role == ModelRole.EDITOR else ()
    )
    return ModelInfo(name, ("1",), role, "READY", (), (), 8, parameters, "")


class FakeClient:
    """Answers every explanation with a score derived from the image, after a random delay, and
    records the calls."""

    target = "fake:1"

    def __init__(
        self,
        fail_on: str | None = None,
        models: list[ModelInfo] | None = None,
        steps: dict[str, int] | None = None,
    ) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.options: list[dict] = []
        self.properties: list[tuple[str, list]] = []
        self._lock = threading.Lock()
        self._fail_on = fail_on
        self._models = models
        # Model -> the N its (adaptive) results were decided on; STEPS by default.
        self._steps = steps or {}

    def list_models(self) -> list[ModelInfo]:
        return self._models or [
            model_info("new", ModelRole.CLASSIFIER),
            model_info("old", ModelRole.CLASSIFIER),
            model_info("procedural", ModelRole.EDITOR),
        ]

    def explain(self, image: bytes, model: str, properties: list, **options):
        index = Image.open(io.BytesIO(image)).getpixel((0, 0))[0]
        with self._lock:
            self.calls.append((f"{index}.png", model, options["return_path_images"]))
            self.options.append({"model": model, **options})
            self.properties.append((f"{index}.png", list(properties)))
        time.sleep(random.uniform(0, 0.01))
        yield Accepted(
            "",
            tuple(p.name for p in properties),
            1,
            STEPS,
            100,
            0.01,
            "7",
            10,
            10,
            0.05,
            path_mode="adaptive",
            max_steps=4 * STEPS,
            warnings=(f"{model}: no normalisation declared",),
        )
        steps = self._steps.get(model, STEPS)
        for prop in properties:
            ok = f"{index}.png" != self._fail_on
            base = [0.9, 0.8, 0.5, 0.2, 0.1] if model == "new" else [0.9] * 5
            curve = list(np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, 5), base))
            classes = [0] * (steps // 2) + [1] * (steps + 1 - steps // 2)
            path = (TINY_PNG,) * (steps + 1) if options["return_path_images"] else ()
            found = property_result(prop.name, index / 100, sample(curve, classes, path), ok=ok)
            yield replace(
                found,
                score=found.score * STEPS / steps,
                steps=steps,
                decision=Decision.CANNOT_REACH_ALPHA if steps > STEPS else Decision.RELEVANT,
                warnings=(f"mask of {index}.png is unreliable",) if index == 1 else (),
            )


def make_images(folder: Path, count: int) -> list[ImageEntry]:
    images = []
    for index in range(count):
        path = folder / f"{index}.png"
        Image.new("RGB", (4, 4), (index, 0, 0)).save(path)
        images.append(ImageEntry(f"{index}.png", path, None))
    return images


def spec(**changes: object) -> ReviewSpec:
    return ReviewSpec.model_validate(
        {
            "candidate": {"name": "new"},
            "baseline": {"name": "old"},
            "images": {"folder": "."},
            "properties": {"hue": "procedural:operation=hue"},
            # At alpha 0.01 no path of STEPS + 1 = 5 images could be significant (2 / 5! > 0.01).
            "explain": {"steps": STEPS, "alpha": 0.05},
            "concurrency": 3,
            "strips": 2,
            "rules": [{"rule": "max_score", "max": 0.05}],
            **changes,
        }
    )


def test_images_run_concurrently_but_results_keep_their_order_and_baselines_follow(tmp_path):
    client = FakeClient()
    updates = []
    result = run_review(spec(), make_images(tmp_path, 8), client, on_progress=updates.append)
    assert [obs.image for obs in result.select("new", "hue")] == [f"{i}.png" for i in range(8)]
    for image in result.images:
        models = [model for name, model, paths in client.calls if name == image and not paths]
        assert models == ["new", "old"]
    assert [update.completed for update in updates] == list(range(1, 17))
    assert {update.total for update in updates} == {16}
    assert [model.served_version for model in result.models] == ["7", "7"]
    assert result.settings.steps == STEPS and result.settings.target_class == "predicted"
    # mean score 0.035 <= 0.05
    assert result.passed and len(result.outcomes) == 1


def test_strips_show_the_candidates_highest_scores_with_every_models_curve(tmp_path):
    client = FakeClient()
    result = run_review(spec(), make_images(tmp_path, 6), client)
    assert [strip.image for strip in result.strips] == ["5.png", "4.png"]
    assert set(result.strips[0].curves) == {"new", "old"}
    assert len(result.strips[0].images) == STEPS + 1
    assert sorted(call for call in client.calls if call[2]) == [
        ("4.png", "new", True), ("4.png", "old", True), ("5.png", "new", True), ("5.png", "old", True),
    ]  # fmt: skip


def test_a_failed_property_stops_the_review_and_names_where(tmp_path):
    client = FakeClient(fail_on="1.png")
    with pytest.raises(ReviewError, match=r"1\.png, new: property 'hue' failed: INTERNAL: editor"):
        run_review(spec(concurrency=1), make_images(tmp_path, 6), client)
    time.sleep(0.1)
    assert {name for name, _, _ in client.calls} <= {"0.png", "1.png", "2.png"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"candidate": {"name": "typo"}},
            "candidate model 'typo' is not served; served classifiers: new, old",
        ),
        ({"baseline": {"name": "old", "version": "9"}}, "has no version '9'; versions: 1"),
        (
            {"properties": {"hue": "diffusion:prompt=x"}},
            "property 'hue': editor 'diffusion' is not",
        ),
    ],
)
def test_models_and_editors_the_service_lacks_are_named_before_any_work(tmp_path, changes, message):
    client = FakeClient()
    with pytest.raises(ReviewError, match=message):
        run_review(spec(**changes), make_images(tmp_path, 2), client)
    assert client.calls == []


def test_an_observation_averages_its_samples_curves():
    result = property_result("hue", 0.1, sample([1.0, 0.0], [0, 1]), sample([0.0, 0.0], [1, 1]))
    observation = observation_from_result("a.png", "new", result)
    assert observation.curve == (0.5, 0.0)
    assert observation.original_class == 0


def test_a_classifier_without_a_declared_role_is_reviewed(tmp_path):
    """propscope.role is optional: any model that is not an editor is a classifier."""
    client = FakeClient(
        models=[
            model_info("new", ModelRole.UNSPECIFIED),
            model_info("old", ModelRole.CLASSIFIER),
            model_info("procedural", ModelRole.EDITOR),
        ]
    )
    result = run_review(spec(), make_images(tmp_path, 3), client)
    assert [model.name for model in result.models] == ["new", "old"]
    assert len(result.select("new", "hue")) == 3


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            [
                ModelInfo(
                    "new", (), ModelRole.UNSPECIFIED, "UNAVAILABLE", (), (), 0, (), "",
                    state_reason="unable to find backend library for backend 'onnxruntime'",
                ),
                model_info("old", ModelRole.CLASSIFIER),
                model_info("procedural", ModelRole.EDITOR),
            ],
            "candidate model 'new' is UNAVAILABLE: unable to find backend library for "
            "backend 'onnxruntime'",
        ),
        (
            [
                model_info("new", ModelRole.EDITOR),
                model_info("old", ModelRole.CLASSIFIER),
                model_info("procedural", ModelRole.EDITOR),
            ],
            "candidate model 'new' is an editor, not a classifier; served classifiers: old",
        ),
        (
            [
                model_info("new", ModelRole.CLASSIFIER),
                model_info("old", ModelRole.CLASSIFIER),
                model_info("procedural", ModelRole.UNSPECIFIED),
            ],
            "property 'hue': editor 'procedural' is a classifier, not an editor; served editors: none",
        ),
    ],
)  # fmt: skip
def test_a_model_that_cannot_serve_is_named_with_its_state_and_reason(tmp_path, models, message):
    client = FakeClient(models=models)
    with pytest.raises(ReviewError, match=re.escape(message)):
        run_review(spec(), make_images(tmp_path, 2), client)
    assert client.calls == []


def test_models_preprocessing_labels_and_path_options_reach_every_request(tmp_path):
    client = FakeClient()
    changed = spec(
        candidate={
            "name": "new",
            "preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "class_labels": ["circle", "square"],
        },
        baseline={"name": "old", "preprocessing": {"output_kind": "probabilities"}},
        explain={"steps": STEPS, "alpha": 0.05, "max_steps": 4 * STEPS},
    )
    result = run_review(changed, make_images(tmp_path, 3), client)
    by_model = {options["model"]: options for options in client.options}
    assert by_model["new"]["preprocessing"] == Preprocessing(
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )
    assert by_model["new"]["class_labels"] == ("circle", "square")
    assert by_model["old"]["preprocessing"] == Preprocessing(output_kind="probabilities")
    assert by_model["old"]["class_labels"] == ()
    assert {(o["path_mode"], o["max_steps"]) for o in client.options} == {("adaptive", 16)}
    assert result.models[0].warnings == ("new: no normalisation declared",)
    assert (result.settings.path_mode, result.settings.max_steps) == ("adaptive", 16)


def test_paths_of_different_lengths_compare_at_the_specs_n_and_render(tmp_path):
    """The candidate's adaptive paths grew to 4N: its scores are stated at N, its curves
    interpolated onto one grid, its strips show every model's p where it was measured."""
    client = FakeClient(steps={"new": 4 * STEPS})
    result = run_review(spec(), make_images(tmp_path, 4), client)
    new = result.select("new", "hue")
    assert [obs.steps for obs in new] == [4 * STEPS] * 4
    assert [obs.decision for obs in new] == ["cannot_reach_alpha"] * 4
    # score_per_unit_strength is the same at any N, so the score at N is what fixed N gives.
    assert result.values("new", "hue", "score") == pytest.approx([i / 100 for i in range(4)])
    assert result.curves("new", "hue").shape == (4, 4 * STEPS + 1)
    assert result.curves("old", "hue").shape == (4, STEPS + 1)
    assert result.decisions("new", "hue") == {"cannot_reach_alpha": 4}
    strip = result.strips[0]
    assert len(strip.images) == 4 * STEPS + 1 and len(strip.curves["old"]) == STEPS + 1
    markdown = render_markdown(result)
    assert "undecidable at N 4" in markdown and "relevant 4" in markdown
    assert "`1.png`: mask of 1.png is unreliable" in markdown
    assert "**new** (candidate): new: no normalisation declared" in markdown
    assert "adaptive paths up to 16; scores stated at N = 4" in markdown
    html = render_html(result)
    assert "mask of 1.png is unreliable" in html and "undecidable at N 4" in html
    # The baseline's p shows at the 5 strengths it measured of the candidate's 17.
    assert html.count('<br><span style="color: #1f77b4">p ') == (STEPS + 1) * len(result.strips)


def test_provided_paths_come_from_each_images_own_folder(tmp_path):
    (tmp_path / "images").mkdir()
    images = make_images(tmp_path / "images", 2)
    for image in images:
        folder = tmp_path / "paths" / Path(image.id).stem
        folder.mkdir(parents=True)
        for step in (1, 2, 10):
            Image.new("RGB", (4, 4), (step, 0, 0)).save(folder / f"x_{step}.png")
    spec_file = tmp_path / "review.yaml"
    spec_file.write_text(
        "candidate: {name: new}\nimages: {folder: images}\nexplain: {steps: 4, alpha: 0.1}\n"
        "properties:\n  real: '@paths/{stem}/'\n"
        "  other: {provided: {folder: 'paths/{stem}'}}\n"
        "  hue: 'procedural:operation=hue;box=0,0,0.5,0.5'\n"
    )
    loaded, entries = load_spec(spec_file)
    client = FakeClient()
    run_review(loaded, entries, client)
    sent = {}
    for image, properties in client.properties:
        sent.setdefault(image, properties)  # the review's calls, not the strips' later ones
    real = next(p for p in sent["0.png"] if p.name == "real")
    colors = [Image.open(io.BytesIO(png)).getpixel((0, 0))[0] for png in real.provided_path]
    assert colors == [1, 2, 10]
    assert next(p for p in sent["1.png"] if p.name == "hue").region is not None


def test_every_problem_the_service_would_refuse_is_named_before_the_first_image(tmp_path):
    """Editor parameters, their choices and steps were checked only when the first image
    reached the server; the pre-flight lists them all, with suggestions, before any call."""
    client = FakeClient()
    changed = spec(
        baseline={"name": "odl"},
        properties={
            "hue": "procedural:opration=hue",
            "blur": "procedural:operation=blurr",
        },
        explain={"steps": 2},
    )
    with pytest.raises(ReviewError) as raised:
        run_review(changed, make_images(tmp_path, 2), client)
    assert client.calls == []
    assert str(raised.value).splitlines() == [
        "4 problems found before any work started:",
        "  - baseline model 'odl' is not served (did you mean 'old'?); served classifiers: new, old",
        "  - property 'hue': editor 'procedural' has no parameter 'opration' (did you mean "
        "'operation'?); it accepts: operation",
        "  - property 'blur': parameter 'operation' of 'procedural' is 'blurr' (did you mean "
        "'blur'?); one of: hue, blur",
        "  - steps: a path of 3 images can never be significant at alpha 0.01 (smallest p-value "
        "0.333); use at least 6 images",
    ]


def test_the_result_carries_the_specs_fail_on_inconclusive(tmp_path):
    result = run_review(spec(fail_on_inconclusive=True), make_images(tmp_path, 2), FakeClient())
    assert result.fail_on_inconclusive and result.to_dict()["fail_on_inconclusive"] is True
