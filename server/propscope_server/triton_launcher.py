"""Start the real `tritonserver` binary shipped in the nvidia-pytriton wheel.

PyTriton normally drives this binary itself; we launch it directly so it can
serve an ordinary model repository of python-backend models.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
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


def start_triton(
    model_repository: Path,
    ports: TritonPorts,
    cache_dir: Path,
    log_file: Path | None = None,
    extra_args: tuple[str, ...] = (),
    new_session: bool = False,
    address: str = "127.0.0.1",
) -> subprocess.Popen:
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
    """Block until Triton reports ready, failing fast if the process died."""
    client = grpcclient.InferenceServerClient(grpc_url)

    def ready() -> bool:
        try:
            return bool(client.is_server_ready(client_timeout=2.0))
        except Exception:  # noqa: BLE001 - not up yet
            return False

    try:
        wait_for(ready, process, f"Triton at {grpc_url}", timeout_s)
    finally:
        client.close()
