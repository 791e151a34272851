"""synth_conjunction through the real stack: loaded on demand when a request first names it,
it decides on red AND patch, so its interaction indices show both properties acting
together (the ground truth bench/validate_interactions.py checks on more scenes)."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as triton_grpc

import propscope
from propscope._preflight import preflight
from propscope_server.synthetic.world import Scene, render

PROPERTIES = [
    "hue=procedural:operation=hue,region=object",
    "patch=procedural:operation=blend",
]


def scene(hue_deg: float, patch: bool) -> np.ndarray:
    return render(Scene(0, hue_deg, 12.5, 0.5, patch, (32.0, 32.0)))


def test_the_conjunction_model_loads_on_demand_and_its_hue_and_patch_interact(
    client: propscope.Client, triton: triton_grpc.InferenceServerClient
):
    # Listed as loaded on demand (loaded by now or not): every pre-flight lets it through.
    listed = {info.name: info for info in client.list_models()}
    assert listed["synth_conjunction"].loads_on_demand
    assert not listed["synth_hue"].loads_on_demand
    preflight(client, classifiers=["synth_conjunction"])
    found = client.interactions(
        scene(3.0, patch=False), "synth_conjunction", PROPERTIES, design_size=64, seed=5
    )
    assert found.interaction_significant
    for name in ("hue", "patch"):
        assert found[name].total_order.value > 1.5 * found[name].first_order.value
    # The served model is the conjunction: square for red with the patch only.
    images = np.stack([scene(3.0, False), scene(3.0, True), scene(180.0, True)])
    batch = triton_grpc.InferInput("IMAGE", list(images.shape), "UINT8")
    batch.set_data_from_numpy(images)
    logits = triton.infer("synth_conjunction", [batch]).as_numpy("LOGITS")
    assert logits.argmax(axis=1).tolist() == [0, 1, 0]
