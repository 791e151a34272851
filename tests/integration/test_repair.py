"""The repair round trip on the real stack: `propscope repair` writes version 2 of a team's
open model, Triton serves it beside version 1, and `propscope review` compares the two."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc
from PIL import Image

from propscope import Client
from propscope_dev import stack
from propscope_server.triton_models.classifiers.open_model import ABLATION_FILE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "review"
HUE = "object_hue=procedural:operation=hue,region=object"
MODEL = "team_hue"
# synth_hue's layers: features.0 16, features.1 32, features.2 64 channels.
CHANNELS = 112
# Two circles and two squares of the review example.
IMAGES = ("000_circle.png", "001_circle.png", "002_square.png", "007_square.png")


def propscope_cli(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "propscope", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def team_repository(root: Path) -> Path:
    """synth_hue copied as the team's model `team_hue` (version 1 only; version_policy all
    kept), its weights path made absolute."""
    models = Path(stack.DEFAULT_MODEL_REPOSITORY)
    weights = (models.parent / "weights").resolve()
    folder = root / MODEL
    (folder / "1").mkdir(parents=True)
    config = (models / "synth_hue" / "config.pbtxt").read_text()
    assert "version_policy: { all { } }" in config
    config = config.replace('name: "synth_hue"', f'name: "{MODEL}"')
    (folder / "config.pbtxt").write_text(config.replace("../../weights/", f"{weights}/"))
    shutil.copy(models / "synth_hue" / "1" / "model.py", folder / "1" / "model.py")
    return root


def review_spec(path: Path, images: list[Path]) -> Path:
    """Candidate: the repaired version 2; baseline: version 1; the object's hue on the
    images, short paths."""
    path.parent.mkdir(parents=True)
    manifest = path.parent / "manifest.csv"
    labels = {name: 0 if "circle" in name else 1 for name in IMAGES}
    manifest.write_text(
        "image,label\n" + "".join(f"{image},{labels[image.name]}\n" for image in images)
    )
    path.write_text(
        f"candidate: {{name: {MODEL}, version: 2}}\n"
        f"baseline: {{name: {MODEL}, version: 1}}\n"
        "images: {manifest: manifest.csv}\n"
        "target_class: label\n"
        "properties: {object_hue: 'procedural:operation=hue,region=object'}\n"
        "explain: {steps: 10, permutations: 1000, alpha: 0.05}\n"
        "strips: 0\n"
        "rules: [{rule: max_flip_rate, properties: [object_hue], max: 1.0}]\n"
    )
    return path


def logits(triton_grpc_url: str, image: np.ndarray, version: str) -> np.ndarray:
    client = triton_grpc.InferenceServerClient(triton_grpc_url)
    entry = triton_grpc.InferInput("IMAGE", [1, *image.shape], "UINT8")
    entry.set_data_from_numpy(image[None])
    result = client.infer(
        MODEL,
        [entry],
        model_version=version,
        outputs=[triton_grpc.InferRequestedOutput("LOGITS")],
    )
    return result.as_numpy("LOGITS")[0]


def test_a_repaired_version_is_written_served_and_reviewed_against_the_original(tmp_path):
    """`propscope repair` on the team's model served by `propscope-dev up --model-repository`
    writes version 2 with at most 5% of the channels ablated and has Triton load it; both
    versions are listed and served (version 2's forward pass differs), and a review of
    version 2 against version 1 reports the hue's flip rate of each. Whether the repair
    cuts the flip rate is the validation table's question, not this test's."""
    started_at = time.monotonic()
    repository = team_repository(tmp_path / "models")
    images = [EXAMPLES / "images" / name for name in IMAGES]
    server = str(Path(sys.executable).parent / "propscope-dev")
    port = stack.free_port()
    run_dir = tmp_path / "stack"
    started = subprocess.run(
        [server, "up", "--port", str(port), "--run-dir", str(run_dir), "--no-redis",
         "--model-repository", str(repository)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        up_s = time.monotonic() - started_at
        info = json.loads((run_dir / "stack.json").read_text())
        assert f"Triton (HTTP)      {info['triton_http_url']}" in started.stdout
        gateway = f"127.0.0.1:{port}"
        repaired = propscope_cli(
            "repair", *map(str, images), "--target", gateway, "--model", MODEL,
            "--version", "1", "--property", HUE, "--repository", str(repository),
            "--triton-url", info["triton_http_url"], "--layers", "features.1,features.2",
            "--steps", "8", "--format", "plain",
        )  # fmt: skip
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        repair_s = time.monotonic() - started_at - up_s
        assert f"Triton loaded {MODEL} (versions 1 and 2)" in repaired.stderr
        ablation = json.loads((repository / MODEL / "2" / ABLATION_FILE).read_text())
        with Client(gateway) as client:
            listed = [model for model in client.list_models() if model.name == MODEL]
        pixels = np.asarray(Image.open(images[0]).convert("RGB"), dtype=np.uint8)
        first = logits(info["triton_grpc"], pixels, "1")
        second = logits(info["triton_grpc"], pixels, "2")
        spec = review_spec(tmp_path / "review" / "spec.yaml", images)
        review_started = time.monotonic()
        reviewed = propscope_cli(
            "review", str(spec), "--target", gateway, "--out", str(tmp_path / "out")
        )
        review_s = time.monotonic() - review_started
    finally:
        subprocess.run([server, "down", "--run-dir", str(run_dir)], timeout=60)
    chosen = ablation["channels"]
    assert 1 <= len(chosen) <= CHANNELS * 5 // 100, chosen
    assert {channel["layer"] for channel in chosen} <= {"features.1", "features.2"}
    assert "propscope repair --property" in ablation["source"]
    assert (repository / MODEL / "2" / "model.py").is_file()
    # Triton's repository index has one entry per served version; ListModels one per model.
    assert [(model.versions, model.state) for model in listed] == [(("1", "2"), "READY")]
    assert not np.array_equal(first, second), "version 2 must apply its ablation"

    assert reviewed.returncode == 0, reviewed.stdout + reviewed.stderr
    data = json.loads((tmp_path / "out" / "review.json").read_text())
    models = {model["role"]: model for model in data["models"]}
    assert (models["candidate"]["name"], models["candidate"]["served_version"]) == (MODEL, "2")
    assert (models["baseline"]["name"], models["baseline"]["served_version"]) == (MODEL, "1")
    labels = {role: f"{model['name']}:{model['version']}" for role, model in models.items()}
    flips: dict[str, list[float]] = {}
    for observation in data["observations"]:
        assert observation["property_name"] == "object_hue"
        flips.setdefault(observation["model"], []).append(observation["flip_rate"])
    assert sorted(flips) == sorted(labels.values()), flips
    assert all(len(rates) == len(images) for rates in flips.values())
    print(
        f"\nrepair ablated {len(chosen)} of {CHANNELS} channels: "
        + ", ".join(f"{c['layer']}[{c['channel']}]" for c in chosen)
    )
    for role in ("baseline", "candidate"):
        label = labels[role]
        print(f"object_hue flip rate, {label}: {np.mean(flips[label]):.3f} {flips[label]}")
    print(
        f"stack up {up_s:.0f} s, repair (CLI) {repair_s:.0f} s, review (CLI) {review_s:.0f} s, "
        f"round trip {time.monotonic() - started_at:.0f} s"
    )
