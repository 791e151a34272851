"""The diffusion editors end to end: real gRPC -> gateway -> Triton (tiny random
pipelines on CPU) -> Redis."""

from __future__ import annotations

import io
import re
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from propscope import Accepted, PropertyResult
from propscope_dev.triton_stream import stream_path
from propscope_server.editor_contract import SCHEMA_PARAMETER, EditorSchema, canonical_parameters
from tests.integration.conftest import inference_count, scene_png

PROPERTIES = {
    "ip2p": "blue=ip2p:instruction=make the object blue,num_inference_steps=3",
    "sdedit": "snow=sdedit:source_prompt=a red circle,target_prompt=a circle in snow,num_inference_steps=5",
    "ledits": "snow=ledits:editing_prompt=snow,num_inversion_steps=4",
}


def results(events: list) -> list[PropertyResult]:
    return [e for e in events if isinstance(e, PropertyResult)]


def triton_metric(url: str, name: str, model: str) -> float:
    """Sum of a Triton metric over the model's instances."""
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    pattern = re.compile(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', re.MULTILINE)
    return sum(float(value) for value in pattern.findall(body))


@pytest.mark.parametrize("editor", sorted(PROPERTIES))
def test_a_property_is_explained_through_each_diffusion_editor(client, triton, editor):
    image = scene_png(hue_deg=30.0, radius_px=11.0)
    calls = inference_count(triton, editor)
    events = list(
        client.explain(
            image,
            "synth_unbiased",
            [PROPERTIES[editor]],
            steps=5,
            samples=2,
            seed=1,
            return_path_images=True,
        )
    )
    (result,) = results(events)
    assert result.ok, result.error
    assert (result.cache_hits, result.cache_misses) == (0, 2)
    assert inference_count(triton, editor) == calls + 1  # both samples in one editor call
    assert 0 <= result.p_value <= 1 and result.score >= 0
    for sample in result.samples:
        assert len(sample.prediction_curve) == 6
        assert len(sample.path_images) == 6
    first, second = (s.path_images[-1] for s in result.samples)
    assert first != second  # each sample has its own seed


def test_a_second_classifier_makes_no_diffusion_call(client, triton):
    image = scene_png(hue_deg=200.0, radius_px=12.0)
    prop = PROPERTIES["ip2p"]
    first = results(
        list(client.explain(image, "synth_hue", [prop], steps=5, seed=4, path_mode="fixed"))
    )[0]
    calls = inference_count(triton, "ip2p")
    second = results(
        list(client.explain(image, "synth_patch", [prop], steps=5, seed=4, path_mode="fixed"))
    )[0]
    assert first.ok and second.ok
    assert (first.cache_misses, second.cache_hits, second.cache_misses) == (1, 1, 0)
    assert inference_count(triton, "ip2p") == calls


def test_a_cancelled_explanation_stops_the_diffusion_editor(live_stack, client):
    url = live_stack.triton_metrics_url
    units = "propscope_editor_work_units_total"
    cancelled = triton_metric(url, "propscope_editor_cancelled_total", "ip2p")
    started = triton_metric(url, units, "ip2p")
    denoising_steps = 400
    slow = f"blue=ip2p:instruction=make it blue,num_inference_steps={denoising_steps}"
    events = client.explain(scene_png(hue_deg=300.0), "synth_hue", [slow], steps=10, seed=9)
    assert isinstance(next(events), Accepted)
    deadline = time.monotonic() + 120  # a hang guard, not a timing assertion
    while triton_metric(url, units, "ip2p") < started + 3:
        assert time.monotonic() < deadline, "the editor never started denoising"
        time.sleep(0.1)
    events.close()  # cancels the call
    while triton_metric(url, "propscope_editor_cancelled_total", "ip2p") < cancelled + 1:
        assert time.monotonic() < deadline, "the editor never saw the cancellation"
        time.sleep(0.1)
    done = triton_metric(url, units, "ip2p") - started
    assert done < denoising_steps  # it stopped well before the path was finished
    after = results(
        list(client.explain(scene_png(hue_deg=300.0), "synth_hue", [PROPERTIES["ip2p"]], steps=5))
    )
    assert after[0].ok  # and the editor serves the next request


def raw_edit(triton, editor: str, image: bytes, parameters: dict[str, str], steps: int, seed: int):
    """The editor's own answer for one path, called alone (batch of one, no cache)."""
    config = triton.get_model_config(editor, as_json=True)["config"]
    schema = EditorSchema.from_json(config["parameters"][SCHEMA_PARAMETER]["string_value"])
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    tensors = {
        "IMAGE": pixels[None],
        "STRENGTHS": (np.arange(1, steps + 1, dtype=np.float32) / steps)[None],
        "PARAMETERS": np.array(
            [[canonical_parameters(schema.resolve(parameters)).encode()]], dtype=np.object_
        ),
        "SEED": np.array([[seed]], dtype=np.int64),
    }
    return stream_path(triton, editor, tensors)[0, 0]


def test_concurrent_edits_batched_by_triton_equal_the_editor_alone(client, triton):
    image = scene_png(hue_deg=120.0, radius_px=13.0)
    instructions = {"blue": "make it blue", "snow": "add snow", "dark": "make it darker"}
    properties = [
        f"{name}=ip2p:instruction={text},num_inference_steps=3"
        for name, text in instructions.items()
    ]
    events = list(
        client.explain(
            image, "synth_unbiased", properties, steps=5, seed=21, return_path_images=True
        )
    )
    by_name = {r.property_name: r for r in results(events)}
    assert all(r.ok for r in by_name.values())
    seed = by_name["blue"].samples[0].seed
    for name, text in instructions.items():
        served = np.stack(
            [
                np.asarray(Image.open(io.BytesIO(png)))
                for png in by_name[name].samples[0].path_images[1:]
            ]
        )
        alone = raw_edit(
            triton, "ip2p", image, {"instruction": text, "num_inference_steps": "3"}, 5, seed
        )
        assert np.abs(served.astype(int) - alone.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("strengths", "message"),
    [(np.array([0.5, 1.5], np.float32), "in \\[0, 1\\]"), (np.zeros(0, np.float32), "N >= 1")],
)
def test_the_editor_refuses_strengths_outside_the_contract(triton, strengths, message):
    tensors = {
        "IMAGE": np.zeros((1, 64, 64, 3), np.uint8),
        "STRENGTHS": strengths[None],
        "PARAMETERS": np.array([[b'{"instruction": "x"}']], dtype=np.object_),
        "SEED": np.array([[0]], dtype=np.int64),
    }
    with pytest.raises(InferenceServerException, match=message):
        stream_path(triton, "ip2p", tensors)
