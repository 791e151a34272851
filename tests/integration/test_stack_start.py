"""`propscope-dev up` as a team runs it: with its own model repository holding a
model whose backend this Triton lacks, and its own PROPSCOPE_* settings. One stack
serves every test here (each start costs minutes on two cores)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import propscope
from propscope_dev import stack
from tests.integration.conftest import SAMPLE

UP = [sys.executable, "-m", "propscope_dev.main", "up"]
ONNX_CONFIG = """name: "own_onnx"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]
output [ { name: "LOGITS" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


@dataclass(frozen=True)
class Started:
    run_dir: Path
    command: list[str]
    env: dict[str, str]
    output: subprocess.CompletedProcess
    seconds: float
    metrics_port: int
    preprocessing: Path

    @property
    def info(self) -> stack.StackInfo:
        return stack.running(self.run_dir)


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    root = tmp_path_factory.mktemp("own-stack")
    model = root / "repository" / "own_onnx"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(ONNX_CONFIG)
    (model / "1" / "model.onnx").write_bytes(b"not a real network: Triton fails before reading it")
    preprocessing = root / "preprocessing.json"
    preprocessing.write_text(stack.DEFAULT_PREPROCESSING.read_text())
    metrics_port = stack.free_port()
    env = {
        **os.environ,
        "PROPSCOPE_METRICS_PORT": str(metrics_port),
        "PROPSCOPE_PREPROCESSING_FILE": str(preprocessing),
    }
    run_dir = root / "run"
    command = [
        *UP,
        "--port", str(stack.free_port()),
        "--run-dir", str(run_dir),
        "--model-repository", str(model.parent),
    ]  # fmt: skip
    begin = time.monotonic()
    output = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - begin
    try:
        yield Started(run_dir, command, env, output, seconds, metrics_port, preprocessing)
    finally:
        stack.down(run_dir)


def test_a_model_this_triton_cannot_load_is_named_and_the_rest_serves(started):
    assert started.output.returncode == 0, started.output.stderr
    print(f"propscope-dev up took {started.seconds:.1f} s")
    warnings = [line for line in started.output.stderr.splitlines() if "own_onnx" in line]
    assert len(warnings) == 1
    assert "'onnxruntime'" in warnings[0] and "docs/own-models.md" in warnings[0]
    assert (
        "model own_onnx UNAVAILABLE: Invalid argument: unable to find backend library for "
        "backend 'onnxruntime'" in started.output.stdout
    )
    info = started.info
    assert info is not None and set(info.unavailable) == {"own_onnx"}
    with propscope.Client(info.gateway, timeout=300) as client:
        events = list(
            client.explain(
                SAMPLE.read_bytes(), "synth_hue", ["hue=procedural:operation=hue"], steps=6
            )
        )
        assert isinstance(events[-1], propscope.Done)
        models = {m.name: m for m in client.list_models()}
        assert models["synth_hue"].state == "READY"
        assert models["own_onnx"].state == "UNAVAILABLE"
        assert "onnxruntime" in models["own_onnx"].state_reason
        with pytest.raises(propscope.PropscopeError) as refused:
            list(client.explain(SAMPLE.read_bytes(), "own_onnx", ["hue=procedural:operation=hue"]))
    assert "own_onnx" in str(refused.value) and "onnxruntime" in str(refused.value)


def test_up_honours_the_callers_settings(started):
    info = started.info
    assert info is not None
    environment = Path(f"/proc/{info.pids['gateway']}/environ").read_bytes().split(b"\0")
    assert f"PROPSCOPE_PREPROCESSING_FILE={started.preprocessing}".encode() in environment
    assert f"PROPSCOPE_METRICS_PORT={started.metrics_port}".encode() in environment
    assert info.metrics_url == f"http://127.0.0.1:{started.metrics_port}/metrics"
    assert f"127.0.0.1:{started.metrics_port}/metrics" in started.output.stdout
    metrics = urllib.request.urlopen(info.metrics_url, timeout=5).read().decode()
    assert "propscope_" in metrics


def test_a_second_up_reuses_the_running_stack(started):
    before = started.info
    begin = time.monotonic()
    again = subprocess.run(
        started.command, env=started.env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("already running")
    assert time.monotonic() - begin < 30
    assert "model own_onnx UNAVAILABLE" in again.stdout
    assert started.info.pids == before.pids


def test_a_start_that_runs_out_of_time_says_so_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    failed = subprocess.run(
        [*UP, "--port", str(stack.free_port()), "--run-dir", str(run_dir), "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in failed.stderr
    assert lines[0].startswith("propscope-dev up: Triton at ") and "not ready after 1 s" in lines[0]
    assert "--timeout" in lines[0] and "triton.log" in lines[0]
    assert not (run_dir / "stack.json").exists()


def test_a_second_gateway_on_a_port_in_use_exits_naming_the_setting(live_stack):
    """gRPC binds with SO_REUSEPORT by default, so a second gateway on the same port used
    to listen beside the first and the kernel split callers between two stacks."""
    env = {**os.environ, "PROPSCOPE_LISTEN_ADDRESS": live_stack.gateway}
    server = str(Path(sys.executable).parent / "propscope-server")
    started = subprocess.run(
        [server, "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 1, started.stdout + started.stderr
    assert f"could not listen on {live_stack.gateway}" in started.stderr
    assert "PROPSCOPE_LISTEN_ADDRESS" in started.stderr
    with propscope.Client(live_stack.gateway) as client:
        assert client.list_models()  # the first gateway still serves
