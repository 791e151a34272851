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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from propscope_dev.triton_launcher import (
    TritonPorts,
    UnsupportedModel,
    failure_cause,
    start_triton,
    unsupported_models,
    wait_for,
    wait_for_models,
)
from propscope_server.health import health_status

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPOSITORY_ROOT / "deploy" / "triton" / "models"
# Models the stack does not load at Triton's start: the gateway loads one when a request
# first names it (setting load_on_demand). The four versions of the MeGe/ReCo fold model
# are four workers importing torch, which would lengthen every start by ~20 s on 2 cores;
# synth_conjunction (the interaction indices' red-AND-patch model) is one more.
ON_DEMAND_MODELS = ("synth_patch_folds", "synth_conjunction")
DEFAULT_PREPROCESSING = REPOSITORY_ROOT / "deploy" / "gateway" / "preprocessing.json"
DEFAULT_GATEWAY_PORT = 50051
# Seconds a whole start (Triton's models, Redis, the gateway) may take; a loaded
# 2-core machine needs minutes, not seconds.
DEFAULT_START_TIMEOUT_S = 300.0
START_TIMEOUT_VARIABLE = "PROPSCOPE_START_TIMEOUT_S"


class StackStartError(RuntimeError):
    """The stack did not start; the message is one line naming the cause."""


@dataclass
class StackInfo:
    gateway: str
    triton_grpc: str
    redis_url: str | None
    metrics_url: str | None
    pids: dict[str, int]
    triton_metrics_url: str | None = None
    # Models Triton could not load -> its reason; the rest of the stack serves.
    unavailable: dict[str, str] = field(default_factory=dict)
    # What the caller asked for (see `start_request`): a running stack is reused
    # only for the same request.
    request: dict[str, Any] = field(default_factory=dict)
    # Triton's HTTP endpoint: `propscope repair --triton-url` loads a new version through it.
    triton_http_url: str | None = None


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


def redis_command(binary: str, port: int, *extra: str) -> list[str]:
    """A dev redis-server on loopback: no persistence (a cache), and an LRU cap, the
    eviction policy the gateway expects of its Redis; `extra` adds arguments (cluster
    mode)."""
    return [
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
        *extra,
    ]


def start_redis(port: int, log_file: Path) -> subprocess.Popen | None:
    """A private redis-server with an LRU policy, or None when none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    process = subprocess.Popen(
        redis_command(binary, port),
        stdout=open(log_file, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, process, 10.0, f"redis-server on port {port} (log {log_file})")
    except (RuntimeError, TimeoutError):
        process.kill()
        raise
    return process


def start_gateway(
    env: Mapping[str, str], log_file: Path, defaults: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """The gateway process. `env` wins over the caller's environment, which wins
    over `defaults` (values that only fill gaps)."""
    return subprocess.Popen(
        [sys.executable, "-m", "propscope_server.main", "serve"],
        env=gateway_environment(os.environ, env, defaults or {}),
        stdout=open(log_file, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def gateway_environment(
    caller: Mapping[str, str], env: Mapping[str, str], defaults: Mapping[str, str]
) -> dict[str, str]:
    """`env` over `caller` over `defaults`. A default is dropped when the caller set
    the same variable in any case (the gateway's settings ignore case), so a
    caller's `propscope_metrics_port` is not shadowed by ours either."""
    set_by_caller = {name.upper() for name in (*caller, *env)}
    return {
        **{k: v for k, v in defaults.items() if k.upper() not in set_by_caller},
        **caller,
        **env,
    }


def caller_settings(caller: Mapping[str, str]) -> dict[str, str]:
    """The caller's PROPSCOPE_* variables and REDIS_URL: what configures the gateway."""
    return {
        name: value
        for name, value in caller.items()
        if name.upper().startswith("PROPSCOPE_") or name.upper() == "REDIS_URL"
    }


def _setting(caller: Mapping[str, str], name: str) -> str | None:
    """A variable the caller set, whatever its case (as the gateway reads it)."""
    for key, value in caller.items():
        if key.upper() == name:
            return value
    return None


def _local_target(address: str) -> str:
    """Where a local client reaches a gateway listening on `address`."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("", "0.0.0.0", "[::]", "::") else address


def start_timeout_s(caller: Mapping[str, str] = os.environ) -> float:
    """PROPSCOPE_START_TIMEOUT_S when set, else the default."""
    value = caller.get(START_TIMEOUT_VARIABLE)
    return float(value) if value else DEFAULT_START_TIMEOUT_S


def start_request(
    gateway_port: int | None,
    use_redis: bool,
    gateway_env: Mapping[str, str] | None,
    model_repositories: tuple[Path, ...],
    caller: Mapping[str, str],
) -> dict[str, Any]:
    """What a start depends on, as stored in stack.json: a running stack started for
    the same request is reused instead of restarted."""
    return {
        "gateway_port": gateway_port,
        "use_redis": use_redis,
        "gateway_env": dict(gateway_env or {}),
        "model_repositories": [str(Path(p).resolve()) for p in model_repositories],
        "settings": caller_settings(caller),
    }


def check_models(model_repositories: tuple[Path, ...] = ()) -> list[UnsupportedModel]:
    """The models of propscope's repository and `model_repositories` that this
    Triton cannot load (a backend it lacks), found before starting anything."""
    return unsupported_models((DEFAULT_MODEL_REPOSITORY, *model_repositories))


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
    gateway_port: int | None = None,
    use_redis: bool = True,
    gateway_env: dict[str, str] | None = None,
    model_repositories: tuple[Path, ...] = (),
    timeout_s: float | None = None,
) -> StackInfo:
    """Start Triton, Redis (when installed) and the gateway in the background.

    The gateway's settings, strongest first: `gateway_env`, then `gateway_port`,
    then the caller's PROPSCOPE_* variables and REDIS_URL, then up's own defaults
    (port 50051, a free metrics port, deploy/gateway/preprocessing.json). The
    Triton URL is always the Triton started here; a caller's REDIS_URL means no
    Redis is started. `model_repositories` serve the caller's own models beside
    propscope's; a model that fails to load is listed in `unavailable` while
    the rest serves. Raises StackStartError (one line: the cause) after
    `timeout_s` (default: PROPSCOPE_START_TIMEOUT_S or 300 s) or when a process
    exits; however it fails (Ctrl-C included), nothing it started is left running."""
    started: list[subprocess.Popen] = []
    try:
        return _start(
            run_dir, gateway_port, use_redis, gateway_env, model_repositories, timeout_s, started
        )
    except BaseException:
        _stop_groups([process.pid for process in started])
        raise


def _start(
    run_dir: Path,
    gateway_port: int | None,
    use_redis: bool,
    gateway_env: dict[str, str] | None,
    model_repositories: tuple[Path, ...],
    timeout_s: float | None,
    started: list[subprocess.Popen],
) -> StackInfo:
    """`up`'s work; each process is added to `started` as it starts."""
    caller = dict(os.environ)
    timeout_s = start_timeout_s(caller) if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    run_dir.mkdir(parents=True, exist_ok=True)
    request = start_request(gateway_port, use_redis, gateway_env, model_repositories, caller)
    ports = TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port())
    triton_log = run_dir / "triton.log"
    triton = start_triton(
        DEFAULT_MODEL_REPOSITORY,
        ports,
        run_dir / "triton-cache",
        triton_log,
        extra_args=tuple(f"--model-repository={path.resolve()}" for path in model_repositories),
        new_session=True,
        models=startup_models((DEFAULT_MODEL_REPOSITORY, *model_repositories)),
    )
    started.append(triton)
    pids = {"triton": triton.pid}
    triton_url = f"127.0.0.1:{ports.grpc}"
    redis_url = _setting({**caller, **(gateway_env or {})}, "REDIS_URL")
    try:
        if use_redis and redis_url is None:
            redis_port = free_port()
            redis = start_redis(redis_port, run_dir / "redis.log")
            if redis is not None:
                started.append(redis)
                pids["redis"] = redis.pid
                redis_url = f"redis://127.0.0.1:{redis_port}/0"
        models = wait_for_models(
            f"http://127.0.0.1:{ports.http}", triton, _left(deadline, "Triton", triton_log)
        )
    except (RuntimeError, TimeoutError) as error:
        raise StackStartError(_cause("Triton", error, triton_log)) from None
    defaults = {
        "PROPSCOPE_LISTEN_ADDRESS": f"127.0.0.1:{DEFAULT_GATEWAY_PORT}",
        "PROPSCOPE_METRICS_PORT": str(free_port()),
        "PROPSCOPE_PREPROCESSING_FILE": str(DEFAULT_PREPROCESSING),
        "PROPSCOPE_LOAD_ON_DEMAND": json.dumps(ON_DEMAND_MODELS),
    }
    wiring = {"PROPSCOPE_TRITON_URL": triton_url}
    if gateway_port is not None:
        host = (_setting(caller, "PROPSCOPE_LISTEN_ADDRESS") or "127.0.0.1:").rpartition(":")[0]
        wiring["PROPSCOPE_LISTEN_ADDRESS"] = f"{host or '127.0.0.1'}:{gateway_port}"
    if redis_url and "redis" in pids:
        wiring["REDIS_URL"] = redis_url
    env = {**wiring, **(gateway_env or {})}
    effective = gateway_environment(caller, env, defaults)
    gateway_log = run_dir / "gateway.log"
    gateway = start_gateway(env, gateway_log, defaults)
    started.append(gateway)
    pids["gateway"] = gateway.pid
    target = _local_target(_setting(effective, "PROPSCOPE_LISTEN_ADDRESS") or "")
    try:
        wait_for_gateway(target, gateway, _left(deadline, "the gateway", gateway_log))
    except (RuntimeError, TimeoutError) as error:
        raise StackStartError(_cause("the gateway", error, gateway_log)) from None
    metrics_port = int(_setting(effective, "PROPSCOPE_METRICS_PORT") or 0)
    metrics_host = _setting(effective, "PROPSCOPE_METRICS_ADDRESS") or "127.0.0.1"
    info = StackInfo(
        target,
        triton_url,
        _setting(effective, "REDIS_URL"),
        f"http://{metrics_host}:{metrics_port}/metrics" if metrics_port else None,
        pids,
        f"http://127.0.0.1:{ports.metrics}/metrics",
        unavailable={
            m.name: m.reason
            for m in models
            if m.state != "READY" and m.name not in ON_DEMAND_MODELS
        },
        request=request,
        triton_http_url=f"http://127.0.0.1:{ports.http}",
    )
    (run_dir / "stack.json").write_text(json.dumps(asdict(info), indent=2))
    return info


def startup_models(repositories: tuple[Path, ...]) -> tuple[str, ...]:
    """Every model of `repositories` (a folder each) but ON_DEMAND_MODELS."""
    return tuple(
        sorted(
            {
                path.name
                for repository in repositories
                for path in repository.iterdir()
                if path.is_dir() and not path.name.startswith(".")
            }
            - set(ON_DEMAND_MODELS)
        )
    )


def _left(deadline: float, what: str, log_file: Path) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"{what} not ready in time (log {log_file})")
    return left


def _cause(what: str, error: Exception, log_file: Path) -> str:
    """One line: what failed, why (from its log when it says), where to read more."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        text = ""
    cause = failure_cause(text) if what == "Triton" else _last_error(text)
    detail = f"{error}: {cause}" if cause else str(error)
    hint = f"; more time: --timeout or {START_TIMEOUT_VARIABLE}"
    return f"{detail} (log {log_file}{hint if isinstance(error, TimeoutError) else ''})"


def _last_error(text: str) -> str | None:
    """The gateway's last logged error or exception line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line[:400]
    return lines[-1][:400] if lines else None


def _recorded(run_dir: Path) -> StackInfo | None:
    """The stack `up` recorded in `run_dir`; None when there is none or it is unreadable."""
    state = run_dir / "stack.json"
    if not state.exists():
        return None
    try:
        return StackInfo(**json.loads(state.read_text()))
    except (ValueError, TypeError):
        return None


def running(run_dir: Path) -> StackInfo | None:
    """The stack recorded in `run_dir` when all its processes are alive and its
    gateway answers health checks; None otherwise."""
    info = _recorded(run_dir)
    if info is None:
        return None
    if not all(_is_ours(name, pid) and _alive(pid) for name, pid in info.pids.items()):
        return None
    return info if health_status(info.gateway, timeout_s=2.0) is not None else None


def down(run_dir: Path) -> StackInfo | None:
    info = _recorded(run_dir)
    if info is not None:
        _terminate(info.pids)
    (run_dir / "stack.json").unlink(missing_ok=True)
    return info


# What each process's command line contains: a recorded pid reused by some other
# program since is never signalled.
COMMAND_MARKERS = {"triton": "tritonserver", "redis": "redis-server", "gateway": "propscope_server"}


def _is_ours(name: str, pid: int) -> bool:
    return COMMAND_MARKERS[name] in _command_line(pid)


def _command_line(pid: int) -> str:
    """What process `pid` runs ("" when there is none)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _terminate(pids: dict[str, int], timeout_s: float = 15.0) -> None:
    _stop_groups([pid for name, pid in pids.items() if _is_ours(name, pid)], timeout_s)


def _stop_groups(leaders: list[int], timeout_s: float = 15.0, reap_timeout_s: float = 5.0) -> None:
    """SIGTERM to the process group of each leader (each started in a session of its
    own: Triton's Python stubs are in Triton's group), then SIGKILL to whatever of a
    group is left after `timeout_s`: a stub can outlive its Triton. A killed group is
    waited for (up to `reap_timeout_s`; it takes milliseconds) and its leader reaped when
    it is our child: else it stays a zombie for as long as we run (a long pytest)."""
    for leader in leaders:
        _signal_group(leader, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_group_members(leader) for leader in leaders):
        time.sleep(0.1)
    for leader in leaders:
        _signal_group(leader, signal.SIGKILL)
    reap_deadline = time.monotonic() + reap_timeout_s
    for leader in leaders:  # a SIGKILL is delivered, not done, when killpg returns
        while (_group_members(leader) or _alive(leader)) and time.monotonic() < reap_deadline:
            time.sleep(0.01)


def _signal_group(leader: int, signal_number: int) -> None:
    try:
        os.killpg(leader, signal_number)
    except ProcessLookupError:
        pass


def _group_members(group: int) -> list[int]:
    """The live (not zombie) processes of a process group, reaping its leader when it
    is our child."""
    _alive(group)
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(entry.name))
    return members


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


@dataclass(frozen=True)
class ExtraGateway:
    target: str
    process: subprocess.Popen
    metrics_url: str
    log_file: Path


@contextmanager
def extra_gateway(live_stack: StackInfo, log_dir: Path, **settings: str) -> Iterator[ExtraGateway]:
    """A second gateway process on a running stack's Triton and Redis, configured by
    `settings` (PROPSCOPE_* variables). Waits for health to answer, or only for the
    port when the gateway speaks TLS."""
    port, metrics_port = free_port(), free_port()
    env = {
        "PROPSCOPE_LISTEN_ADDRESS": f"127.0.0.1:{port}",
        "PROPSCOPE_TRITON_URL": live_stack.triton_grpc,
        "PROPSCOPE_PREPROCESSING_FILE": str(DEFAULT_PREPROCESSING),
        "PROPSCOPE_METRICS_PORT": str(metrics_port),
        "PROPSCOPE_HEALTH_POLL_S": "0.5",
        **({"REDIS_URL": live_stack.redis_url} if live_stack.redis_url else {}),
        **settings,
    }
    log_file = log_dir / f"gateway-{port}.log"
    process = start_gateway(env, log_file)
    target = f"127.0.0.1:{port}"
    try:
        if "PROPSCOPE_TLS__CERT_FILE" in settings:
            wait_for_port(port, process)
        else:
            wait_for_gateway(target, process)
        yield ExtraGateway(target, process, f"http://127.0.0.1:{metrics_port}/metrics", log_file)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)
