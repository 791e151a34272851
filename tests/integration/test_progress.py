"""Edit progress on the real stack: the gateway streams Progress("edit") as the cache
answers and as the (decoupled) editor works, per seed for the procedural editor and
per denoising step for a diffusion editor, and the paths are the editor's own."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from propscope import Progress, PropertyResult
from propscope_server.editor_contract import SCHEMA_PARAMETER, EditorSchema
from propscope_server.triton_models.editors.procedural import edit_path
from tests.integration.conftest import inference_count, scene_png

HUE = "object_hue=procedural:operation=hue,region=object"


def edit_progress(events: list) -> list[tuple[int, int]]:
    return [(e.completed, e.total) for e in events if isinstance(e, Progress) and e.stage == "edit"]


def result_of(events: list) -> PropertyResult:
    (result,) = [e for e in events if isinstance(e, PropertyResult)]
    assert result.ok, result.error
    return result


def test_procedural_progress_comes_per_seed_and_cached_paths_count_at_once(client, triton):
    image = scene_png(hue_deg=140.0, radius_px=10.0)
    calls = inference_count(triton, "procedural")
    events = list(
        client.explain(
            image,
            "synth_unbiased",
            [HUE],
            steps=5,
            samples=3,
            seed=16,
            path_mode="fixed",
            return_path_images=True,
        )
    )
    assert edit_progress(events) == [(0, 15), (5, 15), (10, 15), (15, 15)]
    assert inference_count(triton, "procedural") == calls + 1  # one editor call
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("PropertyResult") > max(i for i, k in enumerate(kinds) if k == "Progress")
    # the streamed paths are the editor's own, bit for bit
    config = triton.get_model_config("procedural", as_json=True)["config"]
    schema = EditorSchema.from_json(config["parameters"][SCHEMA_PARAMETER]["string_value"])
    parameters = schema.resolve({"operation": "hue", "region": "object"})
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    strengths = np.arange(1, 6, dtype=np.float32) / 5
    for sample in result_of(events).samples:
        served = [np.asarray(Image.open(io.BytesIO(png))) for png in sample.path_images[1:]]
        assert np.array_equal(
            np.stack(served), edit_path(pixels, strengths, parameters, sample.seed)
        )

    again = list(
        client.explain(image, "synth_hue", [HUE], steps=5, samples=3, seed=16, path_mode="fixed")
    )
    assert result_of(again).cache_hits == 3
    assert edit_progress(again) == [(15, 15)]


def test_a_diffusion_editor_reports_progress_per_denoising_step(client):
    snow = "snow=sdedit:source_prompt=a red circle,target_prompt=snow,num_inference_steps=5"
    events = list(
        client.explain(
            scene_png(hue_deg=60.0, radius_px=12.0),
            "synth_unbiased",
            [snow],
            steps=5,
            seed=17,
            path_mode="fixed",
        )
    )
    result_of(events)
    # 3 denoising steps (5 x noise_strength 0.6), then decoding: 4 units for 5 images
    assert edit_progress(events) == [(0, 5), (1, 5), (2, 5), (3, 5), (5, 5)]
