"""The pure parts of starting the stack: which models this Triton cannot load,
why Triton failed (from its log), whose settings the gateway gets, and
readiness read from a repository index that changes under the probe."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from propscope_dev import main, stack
from propscope_dev.triton_launcher import (
    ModelState,
    config_fields,
    failure_cause,
    model_backend,
    repository_index,
    unsupported_models,
    wait_for_models,
)

ONNX_CONFIG = """
# backend: "python" in a comment does not count
name: "own_onnx"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]
parameters: { key: "backend" value: { string_value: "python" } }
"""


def model(repository: Path, name: str, config: str | None, files: tuple[str, ...] = ()) -> Path:
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    if config is not None:
        (folder / "config.pbtxt").write_text(config)
    for file_name in files:
        (folder / "1" / file_name).write_text("")
    return folder


def test_config_fields_reads_top_level_strings_only():
    assert config_fields(ONNX_CONFIG) == {"backend": "onnxruntime"}
    assert config_fields('platform:"onnxruntime_onnx"\nname: "a\\"b"') == {
        "platform": "onnxruntime_onnx"
    }
    nested = 'name: "x"\noptimization { execution_accelerators { backend: "tensorrt" } }'
    assert config_fields(nested) == {}


def test_the_backend_comes_from_backend_then_platform_then_the_files(tmp_path):
    assert model_backend(model(tmp_path, "a", ONNX_CONFIG)) == "onnxruntime"
    assert model_backend(model(tmp_path, "b", 'platform: "tensorrt_plan"')) == "tensorrt"
    assert model_backend(model(tmp_path, "c", 'name: "c"', ("model.onnx",))) == "onnxruntime"
    assert model_backend(model(tmp_path, "d", None, ("model.py",))) == "python"
    assert model_backend(model(tmp_path, "e", 'platform: "ensemble"')) is None


def test_unsupported_models_name_the_model_the_backend_and_the_fix(tmp_path):
    model(tmp_path, "fine", 'backend: "python"', ("model.py",))
    model(tmp_path, "own_onnx", ONNX_CONFIG, ("model.onnx",))
    model(tmp_path, "plan", 'platform: "tensorrt_plan"', ("model.plan",))
    problems = unsupported_models([tmp_path])
    assert [(p.name, p.backend) for p in problems] == [
        ("own_onnx", "onnxruntime"),
        ("plan", "tensorrt"),
    ]
    warning = problems[0].warning()
    assert "'own_onnx'" in warning and "'onnxruntime'" in warning
    assert 'propscope.format "onnx"' in warning and "docs/own-models.md" in warning
    assert "\n" not in warning


def test_propscopes_own_models_all_have_a_backend_this_triton_has():
    assert stack.check_models() == []


TRITON_LOG = """\
W1127 12:53:07.560815 12375 pinned_memory_manager.cc:273] "Unable to allocate pinned system memory"
E1127 12:53:07.560936 12375 server.cc:241] "CudaDriverHelper has not been initialized."
I1127 12:53:07.561967 12375 model_lifecycle.cc:472] "loading: own_onnx:1"
E1127 12:53:07.562751 12375 model_lifecycle.cc:642] "failed to load 'own_onnx' version 1: \
Invalid argument: unable to find backend library for backend 'onnxruntime', try specifying \
runtime on the model configuration."
Error: Failed to initialize NVML
W1127 12:53:07.575527 12375 metrics.cc:798] "DCGM unable to start: DCGM initialization error"
E1127 12:53:07.575757 12375 tritonserver.cc:2607] "Internal: failed to load all models"
"""


def test_the_cause_is_the_last_real_error_of_the_log():
    assert failure_cause(TRITON_LOG) == (
        "failed to load 'own_onnx' version 1: Invalid argument: unable to find backend library "
        "for backend 'onnxruntime', try specifying runtime on the model configuration."
    )


def test_a_python_stub_traceback_gives_its_exception_line():
    log = TRITON_LOG.splitlines()[:3] + [
        "Traceback (most recent call last):",
        '  File "model.py", line 3, in <module>',
        "ModuleNotFoundError: No module named 'onnxruntime'",
    ]
    assert failure_cause("\n".join(log)) == "ModuleNotFoundError: No module named 'onnxruntime'"


def test_a_log_without_errors_has_no_cause_and_long_causes_are_one_short_line():
    assert failure_cause(TRITON_LOG.splitlines()[0]) is None
    assert failure_cause("") is None
    long = 'E1127 12:53:07.1 1 a.cc:1] "' + "x " * 1000 + '"'
    cause = failure_cause(long)
    assert len(cause) <= 400 and cause.endswith("...")


def test_a_failed_start_says_why_in_one_line(tmp_path):
    log = tmp_path / "triton.log"
    log.write_text(TRITON_LOG)
    message = stack._cause("Triton", TimeoutError("Triton not ready after 5 s"), log)
    assert "\n" not in message
    assert message.startswith("Triton not ready after 5 s: failed to load 'own_onnx'")
    assert str(log) in message and stack.START_TIMEOUT_VARIABLE in message
    exited = stack._cause("Triton", RuntimeError("Triton exited with code 1"), log)
    assert stack.START_TIMEOUT_VARIABLE not in exited


def test_the_explicit_env_beats_the_caller_which_beats_ups_defaults():
    defaults = {
        "PROPSCOPE_METRICS_PORT": "1111",
        "PROPSCOPE_PREPROCESSING_FILE": "/ours.json",
        "PROPSCOPE_LISTEN_ADDRESS": "127.0.0.1:50051",
    }
    caller = {"PROPSCOPE_METRICS_PORT": "2222", "propscope_preprocessing_file": "/theirs.json"}
    env = {"PROPSCOPE_METRICS_PORT": "3333", "PROPSCOPE_TRITON_URL": "127.0.0.1:1"}
    merged = stack.gateway_environment(caller, env, defaults)
    assert merged["PROPSCOPE_METRICS_PORT"] == "3333"
    assert merged["propscope_preprocessing_file"] == "/theirs.json"
    assert "PROPSCOPE_PREPROCESSING_FILE" not in merged  # the caller's, in lower case, wins
    assert merged["PROPSCOPE_LISTEN_ADDRESS"] == "127.0.0.1:50051"
    assert stack.gateway_environment({}, {}, defaults) == defaults


def test_a_start_request_holds_the_callers_gateway_settings_only(tmp_path):
    caller = {"PATH": "/bin", "PROPSCOPE_METRICS_PORT": "9", "REDIS_URL": "redis://x", "HOME": "/"}
    request = stack.start_request(None, True, None, (tmp_path,), caller)
    assert request["settings"] == {"PROPSCOPE_METRICS_PORT": "9", "REDIS_URL": "redis://x"}
    assert request["model_repositories"] == [str(tmp_path.resolve())]
    assert json.loads(json.dumps(request)) == request  # stack.json round-trips it
    assert request != stack.start_request(None, True, None, (), caller)


def test_a_gateway_on_every_interface_is_reached_on_loopback():
    assert stack._local_target("0.0.0.0:50051") == "127.0.0.1:50051"
    assert stack._local_target("[::]:7000") == "127.0.0.1:7000"
    assert stack._local_target("127.0.0.1:7001") == "127.0.0.1:7001"


def test_the_start_timeout_comes_from_the_environment():
    assert stack.start_timeout_s({}) == stack.DEFAULT_START_TIMEOUT_S
    assert stack.start_timeout_s({stack.START_TIMEOUT_VARIABLE: "42"}) == 42.0


def test_no_stack_is_running_without_state_or_with_dead_processes(tmp_path):
    assert stack.running(tmp_path) is None
    info = stack.StackInfo("127.0.0.1:1", "127.0.0.1:2", None, None, {"gateway": 2**22 + 1})
    (tmp_path / "stack.json").write_text(json.dumps(info.__dict__))
    assert stack.running(tmp_path) is None
    (tmp_path / "stack.json").write_text("{not json")
    assert stack.running(tmp_path) is None
    assert stack.down(tmp_path) is None and not (tmp_path / "stack.json").exists()


class FakeTriton(BaseHTTPRequestHandler):
    """Triton's two HTTP endpoints readiness reads; each index answer pops a state."""

    states: list[list[dict]] = []
    connections: set[int] = set()

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.connections.add(self.client_address[1])
        self._answer(200 if self.path == "/v2/health/live" else 404, b"")

    def do_POST(self) -> None:  # noqa: N802
        self.connections.add(self.client_address[1])
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        index = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        self._answer(200, json.dumps(index).encode())

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_triton() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTriton)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_readiness_waits_for_loading_models_and_reports_failed_ones(fake_triton):
    loading = [{"name": "synth_hue", "version": "1", "state": "LOADING"}]
    settled = [
        {"name": "synth_hue", "version": "1", "state": "READY"},
        {"name": "own_onnx", "version": "1", "state": "UNAVAILABLE", "reason": "no onnxruntime"},
    ]
    FakeTriton.states, FakeTriton.connections = [loading, loading, settled], set()
    models = wait_for_models(fake_triton, None, timeout_s=10)
    assert models == [
        ModelState("synth_hue", "READY"),
        ModelState("own_onnx", "UNAVAILABLE", "no onnxruntime"),
    ]
    # every probe on a connection of its own: none can get stuck behind a dead one
    assert len(FakeTriton.connections) >= 6


def test_an_unreachable_triton_is_not_live_and_times_out(tmp_path):
    url = f"http://127.0.0.1:{stack.free_port()}"
    assert repository_index(url) is None
    with pytest.raises(TimeoutError, match="not ready after"):
        wait_for_models(url, None, timeout_s=0.6)


@pytest.mark.parametrize(
    ("run_dir", "stop"),
    [(".run", "make down"), ("/tmp/my run", "propscope-dev down --run-dir '/tmp/my run'")],
)
def test_up_names_the_command_that_stops_its_own_run_dir(monkeypatch, run_dir, stop):
    """`make down` stops the default .run stack only: another run dir gets its own command."""
    running = stack.StackInfo("127.0.0.1:1", "127.0.0.1:2", None, None, {})
    monkeypatch.setattr(stack, "start_request", lambda *args: {})
    monkeypatch.setattr(stack, "running", lambda path: running if path == Path(run_dir) else None)
    result = CliRunner().invoke(main.app, ["up", "--run-dir", run_dir])
    assert result.exit_code == 0, result.output
    assert f"stop: {stop})" in result.output and f"stop with `{stop}`" in result.output
