"""Start and stop the whole stack (Triton, Redis, gateway) as local processes:
what `make up`, `make demo` and the integration tests run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from propscope_server.triton_launcher import TritonPorts, start_triton, wait_for, wait_until_ready

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPOSITORY_ROOT / "deploy" / "triton" / "models"
DEFAULT_PREPROCESSING = REPOSITORY_ROOT / "deploy" / "gateway" / "preprocessing.json"


@dataclass
class StackInfo:
    gateway: str
    triton_grpc: str
    redis_url: str | None
    metrics_url: str | None
    pids: dict[str, int]
    triton_metrics_url: str | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(
    port: int, process: subprocess.Popen, timeout_s: float = 60.0, what: str = ""
) -> None:
    wait_for(lambda: port_accepts(port), process, what or f"port {port}", timeout_s, 0.1)


def start_redis(port: int, log_file: Path) -> subprocess.Popen | None:
    """A private redis-server with an LRU policy, or None when none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    command = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxmemory",
        "256mb",
        "--maxmemory-policy",
        "allkeys-lru",
    ]
    process = subprocess.Popen(
        command, stdout=open(log_file, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for_port(port, process, 10.0, f"redis-server on port {port} (log {log_file})")
    except (RuntimeError, TimeoutError):
        process.kill()
        raise
    return process


def start_gateway(env: dict[str, str], log_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "propscope_server.main", "serve"],
        env={**os.environ, **env},
        stdout=open(log_file, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def health_status(target: str, service: str = "", timeout_s: float = 5.0) -> int | None:
    """The gateway's plaintext gRPC health status of `service`; None when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s).status
        except grpc.RpcError:
            return None


def wait_for_gateway(target: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Until the gateway answers its health check (SERVING or NOT_SERVING)."""
    wait_for(
        lambda: health_status(target, timeout_s=1.0) is not None,
        process,
        f"the gateway at {target}",
        timeout_s,
        0.2,
    )


def up(
    run_dir: Path,
    gateway_port: int = 50051,
    use_redis: bool = True,
    gateway_env: dict[str, str] | None = None,
    model_repositories: tuple[Path, ...] = (),
) -> StackInfo:
    """Start Triton, Redis (when installed) and the gateway in the background;
    `gateway_env` adds PROPSCOPE_* settings for the gateway, `model_repositories`
    serve the caller's own models beside propscope's (a model review's candidates)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port())
    triton = start_triton(
        DEFAULT_MODEL_REPOSITORY,
        ports,
        run_dir / "triton-cache",
        run_dir / "triton.log",
        extra_args=tuple(f"--model-repository={path.resolve()}" for path in model_repositories),
        new_session=True,
    )
    pids = {"triton": triton.pid}
    triton_url = f"127.0.0.1:{ports.grpc}"
    redis_url = None
    try:
        if use_redis:
            redis_port = free_port()
            redis = start_redis(redis_port, run_dir / "redis.log")
            if redis is not None:
                pids["redis"] = redis.pid
                redis_url = f"redis://127.0.0.1:{redis_port}/0"
        wait_until_ready(triton_url, triton)
    except Exception:
        _terminate(pids)
        raise
    metrics_port = free_port()
    env = {
        "PROPSCOPE_LISTEN_ADDRESS": f"127.0.0.1:{gateway_port}",
        "PROPSCOPE_TRITON_URL": triton_url,
        "PROPSCOPE_METRICS_PORT": str(metrics_port),
        "PROPSCOPE_PREPROCESSING_FILE": str(DEFAULT_PREPROCESSING),
    }
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(gateway_env or {})
    gateway = start_gateway(env, run_dir / "gateway.log")
    pids["gateway"] = gateway.pid
    target = f"127.0.0.1:{gateway_port}"
    try:
        wait_for_gateway(target, gateway)
    except Exception:
        _terminate(pids)
        raise
    info = StackInfo(
        target,
        triton_url,
        redis_url,
        f"http://127.0.0.1:{metrics_port}/metrics",
        pids,
        f"http://127.0.0.1:{ports.metrics}/metrics",
    )
    (run_dir / "stack.json").write_text(json.dumps(asdict(info), indent=2))
    return info


def down(run_dir: Path) -> StackInfo | None:
    state = run_dir / "stack.json"
    if not state.exists():
        return None
    info = StackInfo(**json.loads(state.read_text()))
    _terminate(info.pids)
    state.unlink()
    return info


# What each process's command line contains: a recorded pid reused by some other
# program since is never signalled.
COMMAND_MARKERS = {"triton": "tritonserver", "redis": "redis-server", "gateway": "propscope_server"}


def _is_ours(name: str, pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return COMMAND_MARKERS[name] in command


def _terminate(pids: dict[str, int], timeout_s: float = 15.0) -> None:
    pids = {name: pid for name, pid in pids.items() if _is_ours(name, pid)}
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout_s
    for pid in pids.values():
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # reap our own children so they do not linger as zombies
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:
        return True
