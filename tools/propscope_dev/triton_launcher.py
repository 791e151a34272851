"""Start the real `tritonserver` binary shipped in the nvidia-pytriton wheel.

PyTriton normally drives this binary itself; we launch it directly so it can
serve an ordinary model repository of python-backend models. That Triton has
the Python backend only: a model needing another backend (onnxruntime, tensorrt,
...) is found before the start by `unsupported_models`, fails alone (Triton runs
on with `--exit-on-error=false`), and its reason is read back from the
repository index.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytriton
import tritonclient.grpc as grpcclient

import propscope_server

PYTRITON_DIR = Path(pytriton.__file__).parent / "tritonserver"
WHEEL_LIBS_DIR = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"


@dataclass(frozen=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int


def assemble_backend_dir(cache_dir: Path) -> Path:
    """Lay out `<dir>/python/` as tritonserver expects: the backend library,
    its utils module and the stub for the running Python version."""
    python_dir = cache_dir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    source = PYTRITON_DIR / "backends" / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _copy_if_changed(source / name, python_dir / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = PYTRITON_DIR / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton ships no python backend stub for Python {version}")
    _copy_if_changed(stub, python_dir / "triton_python_backend_stub")
    return cache_dir / "backends"


def _copy_if_changed(source: Path, target: Path) -> None:
    if not target.exists() or not filecmp.cmp(source, target, shallow=False):
        shutil.copy2(source, target)


def _own_libpython_dir() -> tuple[str, ...]:
    """The running interpreter's libpython, when it is a shared build: the stub
    then runs the same patch release as the standard library it imports (a
    mismatch breaks extension modules such as _ssl). Otherwise the stub falls
    back to the system libpython."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    return (libdir,) if (Path(libdir) / name).exists() else ()


def triton_environment() -> dict[str, str]:
    """The stub runs libpython: point it at our site-packages (for torch) and at
    the propscope_server sources (for the model code)."""
    site_packages = sysconfig.get_paths()["purelib"]
    server_sources = str(Path(propscope_server.__file__).parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (server_sources, site_packages, env.get("PYTHONPATH", "")) if p
    )
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (*_own_libpython_dir(), str(WHEEL_LIBS_DIR), env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# Parallel model loading: every Python-backend stub is its own process, and
# loading them side by side is what keeps a start on a few cores short.
MODEL_LOAD_THREADS = 4


def start_triton(
    model_repository: Path,
    ports: TritonPorts,
    cache_dir: Path,
    log_file: Path | None = None,
    extra_args: tuple[str, ...] = (),
    new_session: bool = False,
    address: str = "127.0.0.1",
    models: tuple[str, ...] = ("*",),
) -> subprocess.Popen:
    """Triton on `ports`, loading `models` (every one by default); a model that fails
    to load leaves the others serving (`--exit-on-error=false`) and readiness does not
    wait for it (`--strict-readiness=false`). Explicit model control lets the gateway
    reload a model whose worker process died (Triton skips no model at the start)."""
    backend_dir = assemble_backend_dir(cache_dir)
    command = [
        str(PYTRITON_DIR / "bin" / "tritonserver"),
        f"--model-repository={model_repository.resolve()}",
        f"--backend-directory={backend_dir.resolve()}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        f"--http-address={address}",
        f"--grpc-address={address}",
        "--exit-on-error=false",
        "--strict-readiness=false",
        "--model-control-mode=explicit",
        *(f"--load-model={model}" for model in models),
        f"--model-load-thread-count={MODEL_LOAD_THREADS}",
        "--log-verbose=0",
        *extra_args,
    ]
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL
    return subprocess.Popen(
        command,
        env=triton_environment(),
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )


def wait_for(
    ready: Callable[[], bool],
    process: subprocess.Popen | None,
    what: str,
    timeout_s: float,
    interval_s: float = 0.5,
) -> None:
    """Poll `ready` until it holds, failing fast if `process` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        if ready():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def wait_until_ready(
    grpc_url: str, process: subprocess.Popen | None = None, timeout_s: float = 180.0
) -> None:
    """Block until Triton reports ready over gRPC, failing fast if the process died.
    Each probe opens a fresh channel: one long-lived channel can sit in reconnect
    back-off for minutes after the server came up."""

    def ready() -> bool:
        client = grpcclient.InferenceServerClient(
            grpc_url, channel_args=[("grpc.enable_http_proxy", 0)]
        )
        try:
            return bool(client.is_server_ready(client_timeout=PROBE_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - not up yet
            return False
        finally:
            client.close()

    wait_for(ready, process, f"Triton at {grpc_url}", timeout_s)


PROBE_TIMEOUT_S = 2.0
# Loopback only: a caller's http_proxy must not route the probes elsewhere.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class ModelState:
    """One entry of Triton's repository index."""

    name: str
    state: str  # READY, UNAVAILABLE, LOADING, UNLOADING
    reason: str = ""


def repository_index(http_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> list[ModelState] | None:
    """Every model Triton knows and its state, over HTTP (a new connection per
    call); None while the server is not live."""
    try:
        with _LOCAL.open(f"{http_url}/v2/health/live", timeout=timeout_s) as live:
            if live.status != 200:
                return None
        request = urllib.request.Request(f"{http_url}/v2/repository/index", data=b"{}")
        with _LOCAL.open(request, timeout=timeout_s) as response:
            entries = json.loads(response.read())
    except (OSError, ValueError):  # refused, reset, timed out, not JSON yet
        return None
    return [
        ModelState(entry["name"], entry.get("state", ""), entry.get("reason", ""))
        for entry in entries
    ]


def wait_for_models(
    http_url: str, process: subprocess.Popen | None, timeout_s: float
) -> list[ModelState]:
    """Until Triton is live and no model is still loading; then every model's
    state, READY or not. A model that failed does not hold the start up."""
    settled: list[ModelState] = []

    def ready() -> bool:
        index = repository_index(http_url)
        if index is None or any(m.state in ("LOADING", "UNLOADING") for m in index):
            return False
        settled[:] = index
        return True

    wait_for(ready, process, f"Triton at {http_url}", timeout_s, 0.25)
    return settled


# Backends this Triton has: the wheel ships the Python backend only.
AVAILABLE_BACKENDS = frozenset({"python"})
PLATFORM_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "pytorch_libtorch": "pytorch",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
    "ensemble": None,
}
# The file names Triton's auto-complete infers a backend from when the config names none.
DEFAULT_MODEL_FILES = {
    "model.py": "python",
    "model.onnx": "onnxruntime",
    "model.plan": "tensorrt",
    "model.pt": "pytorch",
    "model.savedmodel": "tensorflow",
    "model.graphdef": "tensorflow",
}
OWN_MODELS_DOC = "docs/own-models.md"
FIXES = {
    "onnxruntime": 'serve the .onnx file with backend "python" and parameter propscope.format "onnx"',
    "pytorch": 'serve the TorchScript file with backend "python" and parameter propscope.format '
    '"torchscript"',
    "tensorrt": 'export the network to ONNX and serve it with backend "python" and parameter '
    'propscope.format "onnx"',
    "tensorflow": 'export the network to ONNX (tf2onnx) and serve it with backend "python" and '
    'parameter propscope.format "onnx"',
}


@dataclass(frozen=True)
class UnsupportedModel:
    """A model whose backend this Triton lacks: it will be UNAVAILABLE."""

    name: str
    config: Path
    backend: str

    def warning(self) -> str:
        fix = FIXES.get(self.backend, 'serve it with backend "python"')
        return (
            f"model {self.name!r} ({self.config}) needs backend {self.backend!r}, which this "
            f"Triton lacks (Python backend only); it will be UNAVAILABLE. Fix: {fix} "
            f"({OWN_MODELS_DOC})"
        )


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|#[^\n]*|[{}\[\]]|[A-Za-z_][A-Za-z0-9_]*\s*:?|\S')


def config_fields(text: str, names: Iterable[str] = ("backend", "platform")) -> dict[str, str]:
    """The top-level string fields `names` of a config.pbtxt (protobuf text format),
    ignoring comments and anything nested (parameters, instance groups, ...)."""
    wanted, found, depth, key = set(names), {}, 0, None
    for token in _TOKEN.findall(text):
        if token.startswith("#"):
            continue
        if token in ("{", "["):
            depth, key = depth + 1, None
        elif token in ("}", "]"):
            depth, key = depth - 1, None
        elif depth == 0 and token.endswith(":") and token[:-1].strip() in wanted:
            key = token[:-1].strip()
        elif key is not None and token.startswith('"'):
            found[key] = json.loads(token)
            key = None
        else:
            key = None
    return found


def model_backend(model_dir: Path) -> str | None:
    """The backend a model folder needs: its config's `backend`, else its
    `platform`'s, else the one Triton infers from a default file name; None
    when none can be told (Triton then reports what it makes of it)."""
    config = model_dir / "config.pbtxt"
    fields = config_fields(config.read_text(errors="replace")) if config.is_file() else {}
    if fields.get("backend"):
        return fields["backend"]
    if "platform" in fields:
        return PLATFORM_BACKENDS.get(fields["platform"], fields["platform"])
    for version in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        for file_name, backend in DEFAULT_MODEL_FILES.items():
            if (version / file_name).exists():
                return backend
    return None


def unsupported_models(
    repositories: Iterable[Path], available: frozenset[str] = AVAILABLE_BACKENDS
) -> list[UnsupportedModel]:
    """Every model in `repositories` whose backend this Triton lacks, found before
    the start so the caller hears which model, which backend and the fix."""
    problems = []
    for repository in repositories:
        for model_dir in sorted(p for p in Path(repository).iterdir() if p.is_dir()):
            backend = model_backend(model_dir)
            if backend is not None and backend not in available:
                problems.append(
                    UnsupportedModel(model_dir.name, model_dir / "config.pbtxt", backend)
                )
    return problems


_GLOG = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]+\] (.*)$")
# Errors Triton logs on every CPU-only start, and its summary of model failures
# (each failure has its own line): never the cause worth naming.
_HARMLESS = (
    "CudaDriverHelper has not been initialized",
    "Failed to initialize NVML",
    "failed to load all models",
)


def failure_cause(log_text: str) -> str | None:
    """The line of Triton's log that says why it failed: its last error ("E..." or
    "F..."), else the last line mentioning an error (a Python stub's traceback);
    None when the log holds neither."""
    errors, mentions = [], []
    for line in log_text.splitlines():
        line = line.strip()
        match = _GLOG.match(line)
        if match:
            if match.group(1) in "EF" and not any(h in line for h in _HARMLESS):
                errors.append(_unquote(match.group(2)))
        elif re.search(r"error|exception", line, re.IGNORECASE) and not any(
            h in line for h in _HARMLESS
        ):
            mentions.append(line)
    cause = (errors or mentions or [None])[-1]
    return None if cause is None else _shorten(cause)


def _unquote(message: str) -> str:
    """Triton 2.5x quotes and escapes its messages like JSON strings."""
    if len(message) >= 2 and message[0] == message[-1] == '"':
        try:
            return json.loads(message)
        except ValueError:
            return message[1:-1]
    return message


def _shorten(text: str, limit: int = 400) -> str:
    """One line of at most `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
