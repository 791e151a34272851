"""The review runner's logic against a fake client (ordering, concurrency, errors, strips); the
real service is exercised by tests/integration/test_review.py."""

from __future__ import annotations

import io
import random
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from propscope._events import Accepted, ModelInfo, ModelRole, PropertyResult, SampleResult
from propscope.review.runner import ReviewError, observation_from_result, run_review
from propscope.review.spec import ImageEntry, ReviewSpec

STEPS = 4


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
    return ModelInfo(name, ("1",), role, "READY", (), (), 8, (), "")


class FakeClient:
    """Answers every explanation with a score derived from the image, after a random delay, and
    records the calls."""

    target = "fake:1"

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()
        self._fail_on = fail_on

    def list_models(self) -> list[ModelInfo]:
        return [
            model_info("new", ModelRole.CLASSIFIER),
            model_info("old", ModelRole.CLASSIFIER),
            model_info("procedural", ModelRole.EDITOR),
        ]

    def explain(self, image: bytes, model: str, properties: list, **options):
        index = Image.open(io.BytesIO(image)).getpixel((0, 0))[0]
        with self._lock:
            self.calls.append((f"{index}.png", model, options["return_path_images"]))
        time.sleep(random.uniform(0, 0.01))
        yield Accepted(
            "", tuple(p.name for p in properties), 1, STEPS, 100, 0.01, "7", 10, 10, 0.05
        )
        for prop in properties:
            ok = f"{index}.png" != self._fail_on
            curve = [0.9, 0.8, 0.5, 0.2, 0.1] if model == "new" else [0.9] * 5
            path = (b"png",) * (STEPS + 1) if options["return_path_images"] else ()
            yield property_result(
                prop.name, index / 100, sample(curve, [0, 0, 1, 1, 1], path), ok=ok
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
            "explain": {"steps": STEPS},
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
        ({"candidate": {"name": "typo"}}, "candidate model 'typo' is not served; served: new, old"),
        ({"baseline": {"name": "old", "version": "9"}}, "has no version '9'; versions: 1"),
        ({"properties": {"hue": "diffusion:prompt=x"}}, "editor of property 'hue' 'diffusion'"),
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
