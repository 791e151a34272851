"""The CLI against the running service, and the gateway's single-node mode."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

import propscope
from propscope_dev import stack
from tests.integration.conftest import SAMPLE, inference_count, scene_png

HUE = "object_hue=procedural:operation=hue,region=object"


def test_cli_streams_json_events_for_each_model(live_stack):
    command = [
        sys.executable, "-m", "propscope", "explain", str(SAMPLE),
        "--target", live_stack.gateway,
        "--model", "synth_unbiased", "--model", "synth_hue",
        "--property", HUE, "--steps", "8", "--json",
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    events = [json.loads(line) for line in finished.stdout.splitlines()]
    results = {e["model"]: e for e in events if e["event"] == "PropertyResult"}
    assert set(results) == {"synth_unbiased", "synth_hue"}
    assert results["synth_hue"]["significant"] is True
    assert results["synth_hue"]["score"] > results["synth_unbiased"]["score"]
    assert [e["event"] for e in events].count("Done") == 2


def test_cli_exits_2_with_a_clear_message_for_an_unknown_model(live_stack):
    command = [
        sys.executable, "-m", "propscope", "explain", str(SAMPLE),
        "--target", live_stack.gateway, "--model", "nope", "--property", HUE,
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2
    # Refused by the pre-flight, which lists what is served.
    assert "model 'nope' is not served; served classifiers: " in finished.stderr
    assert "synth_hue" in finished.stderr and "Traceback" not in finished.stderr


def test_without_redis_the_in_process_cache_serves_the_second_classifier(
    live_stack, triton, tmp_path
):
    port = stack.free_port()
    gateway = stack.start_gateway(
        {
            "PROPSCOPE_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "PROPSCOPE_TRITON_URL": live_stack.triton_grpc,
        },
        tmp_path / "gateway.log",
    )
    try:
        stack.wait_for_gateway(f"127.0.0.1:{port}", gateway)
        image = scene_png(hue_deg=222.0, radius_px=11.0)
        with propscope.Client(f"127.0.0.1:{port}", timeout=120) as client:
            editor_calls = inference_count(triton, "procedural")
            for model, hits in (("synth_unbiased", 0), ("synth_patch", 1)):
                events = list(client.explain(image, model, [HUE], steps=6))
                (result,) = [e for e in events if isinstance(e, propscope.PropertyResult)]
                assert result.cache_hits == hits
            assert inference_count(triton, "procedural") == editor_calls + 1
    finally:
        gateway.terminate()
        gateway.wait(10)


def test_jpeg_input_is_explained(client):
    rgb = np.asarray(Image.open(io.BytesIO(scene_png(hue_deg=0.0))).convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    events = list(client.explain(buffer.getvalue(), "synth_hue", [HUE], steps=8))
    (result,) = [e for e in events if isinstance(e, propscope.PropertyResult)]
    assert result.ok and result.significant
