"""The real stack for integration tests: tritonserver, redis-server and the
gateway process, started once per session on free loopback ports with the same
launcher as `make up`."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from PIL import Image

import propscope
from propscope_dev import scale_out, stack
from propscope_dev.stack import ExtraGateway, extra_gateway  # noqa: F401 - used by tests
from propscope_server.synthetic.world import Scene, render

NODE_CLIENT = Path(__file__).resolve().parents[2] / "client" / "node"
# Small enough that the limit tests need no huge payloads.
SMALL_LIMITS = {
    "PROPSCOPE_LIMITS__MAX_IMAGE_BYTES": str(300_000),
    "PROPSCOPE_LIMITS__MAX_IMAGE_PIXELS": str(512 * 512),
    "PROPSCOPE_LIMITS__MAX_PATH_PIXELS": str(64 * 64 * 2000),
    "PROPSCOPE_LIMITS__MAX_EDITS": str(2000),
}


# The session's temporary folder, where every stack writes its logs (see the report below).
SESSION_TEMP: list[Path] = []
LOG_PROBLEM_LINES = 20
GLOG_ERROR = re.compile(r"E\d{4} \d\d:\d\d:\d\d")
CALL_STARTED = pytest.StashKey[float]()


@pytest.fixture(scope="session", autouse=True)
def session_temp(tmp_path_factory: pytest.TempPathFactory) -> None:
    SESSION_TEMP.append(tmp_path_factory.getbasetemp())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    item.stash[CALL_STARTED] = time.time()  # a fixture's work (a review run) counts too
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test's report carries the problems (errors, tracebacks) its stacks logged
    while it ran: CI keeps no temporary files, and an INTERNAL status names nothing without
    the gateway's traceback."""
    report = yield
    if report.failed and call.when in ("setup", "call"):
        started = item.stash.get(CALL_STARTED, 0.0)
        logs = {log for folder in SESSION_TEMP for log in folder.glob("**/*.log")}
        for log in sorted(logs):
            if log.stat().st_mtime >= started:
                problems = logged_problems(log.read_text(errors="replace"), started)
                if problems:
                    report.sections.append((f"log {log}", "\n".join(problems)))
    return report


def logged_problems(text: str, since: float) -> list[str]:
    """The gateway's JSON ERROR lines (their traceback inline) and glog error lines (Triton,
    gRPC core: "E1127 21:57:56.22") stamped at or after `since`, and the last traceback
    printed raw (a crash before logging), the last LOG_PROBLEM_LINES of them."""
    json_since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    glog_since = time.strftime("%m%d %H:%M:%S", time.localtime(since))
    found, raw = [], []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith('{"time": "'):
            if '"level": "ERROR"' in line and line[10:29] >= json_since:
                found.append(line)
        elif GLOG_ERROR.match(line):
            if line[1:14] >= glog_since:
                found.append(line)
        elif line.startswith("Traceback (most recent call last):"):
            block = [line]
            for following in lines[index + 1 :]:
                block.append(following)
                if not following.startswith(" "):
                    break
            raw = block
    return (found + raw)[-LOG_PROBLEM_LINES:]


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("stack")
    info = stack.up(
        run_dir, gateway_port=stack.free_port(), use_redis=True, gateway_env=SMALL_LIMITS
    )
    assert info.redis_url, "integration tests need redis-server (make setup installs it)"
    try:
        yield info
    finally:
        stack.down(run_dir)


@pytest.fixture(scope="session")
def scaled_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[scale_out.ScaledStack]:
    """Two Tritons, two gateways each wired to both, and a three-node Redis Cluster: the
    scale-out tests share it (a start takes ~8 s) and restart its parts on the same ports."""
    scaled = scale_out.up_scaled(tmp_path_factory.mktemp("scaled"), tritons=2, gateways=2)
    try:
        yield scaled
    finally:
        scaled.close()


@pytest.fixture(scope="session")
def npm() -> str:
    """npm, with the Node client installed and built once for the session (test_node_client
    and test_scale_out_clients drive it)."""
    found = shutil.which("npm")
    assert found, "npm is not on PATH: the Node client needs Node 20 and npm"
    assert (NODE_CLIENT / "node_modules").is_dir(), "client/node is not installed: run make setup"
    built = subprocess.run(
        [found, "run", "build"], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, f"npm run build failed:\n{built.stdout}\n{built.stderr}"
    return found


@pytest.fixture(scope="session")
def client(live_stack) -> propscope.Client:
    with propscope.Client(live_stack.gateway, timeout=300) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def triton(live_stack):
    triton_client = triton_grpc.InferenceServerClient(live_stack.triton_grpc)
    yield triton_client
    triton_client.close()


@pytest.fixture(scope="session")
def channel(live_stack):
    with grpc.insecure_channel(live_stack.gateway) as grpc_channel:
        yield grpc_channel


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def scene_png(**overrides: object) -> bytes:
    values = dict(
        shape=0, hue_deg=5.0, radius_px=13.0, background=0.5, patch=False, center=(32.0, 32.0)
    )
    values.update(overrides)
    return png(render(Scene(**values)))


def inference_count(triton_client: triton_grpc.InferenceServerClient, model: str) -> int:
    stats = triton_client.get_inference_statistics(model, as_json=True)
    return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", []))


SAMPLE = Path(__file__).resolve().parents[2] / "docs" / "sample.png"
