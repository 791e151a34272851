"""A scaled-out local stack: several Tritons, several gateways and a three-node Redis
Cluster, as local processes on loopback. What the scale-out integration tests
(`scaled_stack`), `propscope-dev up --tritons N` and bench/scale_out.py run.

Each gateway reaches every Triton (PROPSCOPE_TRITON_URL="h:a,h:b") and the cluster
through one seed node (REDIS_URL="redis+cluster://h:p"). Tritons serve a small
repository of links to a few models of deploy/triton/models: every Python-backend
stub imports torch, which costs seconds of a start on 2 cores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
from grpc_health.v1 import health_pb2

from propscope_dev.stack import (
    COMMAND_MARKERS,
    DEFAULT_MODEL_REPOSITORY,
    DEFAULT_PREPROCESSING,
    StackStartError,
    _alive,
    _command_line,
    _stop_groups,
    free_port,
    redis_command,
    start_gateway,
    start_timeout_s,
    wait_for_port,
)
from propscope_dev.triton_launcher import TritonPorts, start_triton, wait_for, wait_for_models
from propscope_server.health import health_status

# The editor the tests edit with and one classifier: a start of two Tritons takes ~5 s.
SCALE_OUT_MODELS = ("procedural", "synth_hue")
CLUSTER_SLOTS = 16384
# How long a cluster node may be silent before the others mark it failed: short, so
# that a stopped node is noticed in seconds (Redis's default is 15 s).
CLUSTER_NODE_TIMEOUT_MS = 2000
STOP_TIMEOUT_S = 15.0
# What `up` records of a scaled stack in its run dir, and `down` and `scaled` read.
STATE_FILE = "scaled.json"


@dataclass(frozen=True)
class _Recorded:
    """A process an earlier `propscope-dev` run started, known by its pid from
    scaled.json (not our child: stopped by its group, never waited for)."""

    pid: int


@dataclass
class _Process:
    """One process of the stack and what restarts it on the same ports."""

    name: str
    log_file: Path
    process: subprocess.Popen | _Recorded | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and _alive(self.process.pid)


@dataclass
class ScaledStack:
    """Addresses of a running scaled-out stack, and the faults tests inject into it:
    `stop_*(i)` stops one process (its Python stubs included), `start_*(i)` starts it
    again on the same ports and returns once it serves again."""

    gateways: list[str]  # host:port
    gateway_metrics: list[str]  # http://.../metrics
    tritons: list[str]  # gRPC host:port
    triton_metrics: list[str]  # http://.../metrics
    redis_nodes: list[str]  # host:port
    redis_url: str  # redis+cluster://<first node>
    triton_http: list[str]  # http://host:port (repository index, model loads)
    run_dir: Path
    _triton_ports: list[TritonPorts] = field(repr=False)
    _redis_bus_ports: list[int] = field(repr=False)
    _tritons: list[_Process] = field(repr=False)
    _redis: list[_Process] = field(repr=False)
    _gateways: list[_Process] = field(repr=False)
    timeout_s: float = 300.0
    models: tuple[str, ...] = SCALE_OUT_MODELS

    def stop_triton(self, index: int) -> None:
        """Stop Triton `index` (SIGTERM, SIGKILL after STOP_TIMEOUT_S) and its stubs."""
        _stop(self._tritons[index])
        self.save()

    def start_triton(self, index: int) -> None:
        """Start Triton `index` again on its ports (a no-op when it runs); returns when
        its models are loaded and its gRPC port accepts."""
        entry = self._tritons[index]
        if not entry.running:
            entry.process = _launch_triton(
                self.run_dir, index, self._triton_ports[index], self.models
            )
            self.save()
        _wait_for_triton(entry, self._triton_ports[index], self.timeout_s)

    def stop_redis(self, index: int) -> None:
        """Stop cluster node `index`; its keys are lost (no persistence), its slots stay
        assigned to it, so the other nodes keep serving theirs."""
        _stop(self._redis[index])
        self.save()

    def start_redis(self, index: int) -> None:
        """Start cluster node `index` again on its port (a no-op when it runs); it rejoins
        from its nodes.conf with its slots. Returns when every node sees all of it and
        reports cluster_state:ok."""
        entry = self._redis[index]
        if not entry.running:
            entry.process = _launch_redis(
                self.run_dir, _port(self.redis_nodes[index]), self._redis_bus_ports[index]
            )
            self.save()
        _wait_for_cluster(self.redis_nodes, [entry], self.timeout_s)

    def add_gateway(self, **settings: str) -> int:
        """One more gateway on this stack, `settings` (PROPSCOPE_* variables) over the
        usual wiring (PROPSCOPE_TRITON_URL="<one Triton>" to compare with one endpoint);
        returns its index once it reports SERVING."""
        _add_gateway(self, settings)
        _wait_serving(self.gateways[-1], self._gateways[-1], self.timeout_s)
        return len(self.gateways) - 1

    def close(self) -> None:
        """Stop every process the stack started (all at once, each with its group)."""
        _stop_groups(
            [
                entry.process.pid
                for entry in (*self._gateways, *self._tritons, *self._redis)
                if entry.process is not None
            ],
            STOP_TIMEOUT_S,
        )
        for entry in (*self._gateways, *self._tritons, *self._redis):
            entry.process = None

    def save(self) -> None:
        """Records the stack in run_dir/scaled.json: addresses, the ports and models a
        restart needs, and the pids of what runs now (what `down` stops)."""
        (self.run_dir / STATE_FILE).write_text(
            json.dumps(
                {
                    "gateways": self.gateways,
                    "gateway_metrics": self.gateway_metrics,
                    "tritons": self.tritons,
                    "triton_metrics": self.triton_metrics,
                    "redis_nodes": self.redis_nodes,
                    "redis_url": self.redis_url,
                    "pids": self.pids(),
                    "triton_http": self.triton_http,
                    "triton_ports": [asdict(ports) for ports in self._triton_ports],
                    "redis_bus_ports": self._redis_bus_ports,
                    "models": list(self.models),
                    "processes": {
                        role: [_pid(entry) for entry in entries]
                        for role, entries in self._roles().items()
                    },
                },
                indent=2,
            )
        )

    def _roles(self) -> dict[str, list[_Process]]:
        return {"triton": self._tritons, "redis": self._redis, "gateway": self._gateways}

    def pids(self) -> list[int]:
        """The running processes' ids (their groups hold the Python stubs)."""
        return [
            entry.process.pid
            for entry in (*self._gateways, *self._tritons, *self._redis)
            if entry.running and entry.process is not None
        ]


def model_repository(run_dir: Path, models: tuple[str, ...] = SCALE_OUT_MODELS) -> Path:
    """A repository of links to `models` of deploy/triton/models. A classifier finds its
    weights relative to its folder, which the link resolves to the real one."""
    repository = run_dir / "models"
    repository.mkdir(parents=True, exist_ok=True)
    for name in models:
        source = DEFAULT_MODEL_REPOSITORY / name
        if not source.is_dir():
            raise StackStartError(f"no model {name!r} in {DEFAULT_MODEL_REPOSITORY}")
        link = repository / name
        if not link.is_symlink():
            link.symlink_to(source.resolve(), target_is_directory=True)
    return repository


def up_scaled(
    run_dir: Path,
    tritons: int = 2,
    gateways: int = 2,
    redis_nodes: int = 3,
    gateway_env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    models: tuple[str, ...] = SCALE_OUT_MODELS,
) -> ScaledStack:
    """Start `tritons` Tritons, a Redis Cluster of `redis_nodes` masters and `gateways`
    gateways wired to all of them, on free loopback ports; returns once every gateway
    reports SERVING, or raises StackStartError after `timeout_s` (default:
    PROPSCOPE_START_TIMEOUT_S or 300 s). However it fails, nothing it started is left
    running."""
    timeout_s = start_timeout_s(os.environ) if timeout_s is None else timeout_s
    if tritons < 1 or gateways < 1:
        raise StackStartError("a scaled stack needs at least one Triton and one gateway")
    if redis_nodes < 3:
        raise StackStartError(
            f"a Redis Cluster needs at least 3 masters (redis-cli --cluster create), "
            f"got redis_nodes={redis_nodes}"
        )
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise StackStartError("a scaled stack needs redis-server and redis-cli (make setup)")
    run_dir.mkdir(parents=True, exist_ok=True)
    model_repository(run_dir, models)
    deadline = time.monotonic() + timeout_s
    ports = [TritonPorts(free_port(), free_port(), free_port()) for _ in range(tritons)]
    redis_ports = [free_port() for _ in range(redis_nodes)]
    bus_ports = [free_port() for _ in range(redis_nodes)]
    stack = ScaledStack(
        gateways=[],
        gateway_metrics=[],
        tritons=[f"127.0.0.1:{p.grpc}" for p in ports],
        triton_metrics=[f"http://127.0.0.1:{p.metrics}/metrics" for p in ports],
        redis_nodes=[f"127.0.0.1:{port}" for port in redis_ports],
        redis_url=f"redis+cluster://127.0.0.1:{redis_ports[0]}",
        triton_http=[f"http://127.0.0.1:{p.http}" for p in ports],
        run_dir=run_dir,
        _triton_ports=ports,
        _redis_bus_ports=bus_ports,
        _tritons=[_Process(f"triton-{i}", _triton_log(run_dir, i)) for i in range(tritons)],
        _redis=[_Process(f"redis-{p}", run_dir / f"redis-{p}.log") for p in redis_ports],
        _gateways=[],
        timeout_s=timeout_s,
        models=models,
    )
    try:
        for index, entry in enumerate(stack._tritons):
            entry.process = _launch_triton(run_dir, index, ports[index], models)
        for entry, port, bus_port in zip(stack._redis, redis_ports, bus_ports, strict=True):
            entry.process = _launch_redis(run_dir, port, bus_port)
        for entry, port in zip(stack._redis, redis_ports, strict=True):
            wait_for_port(port, entry.process, _left(deadline), f"redis-server on port {port}")
        _create_cluster(stack.redis_nodes, run_dir / "cluster-create.log")
        _wait_for_cluster(stack.redis_nodes, stack._redis, _left(deadline))
        for index, entry in enumerate(stack._tritons):
            _wait_for_triton(entry, ports[index], _left(deadline))
        for _ in range(gateways):
            _add_gateway(stack, gateway_env or {})
        for entry, target in zip(stack._gateways, stack.gateways, strict=True):
            _wait_serving(target, entry, _left(deadline))
    except BaseException:
        stack.close()
        raise
    stack.save()
    return stack


def load_scaled(run_dir: Path, timeout_s: float | None = None) -> ScaledStack | None:
    """The scaled stack recorded in run_dir/scaled.json, to stop or start one of its
    processes from another command (`propscope-dev scaled`); None when none is."""
    state = run_dir / STATE_FILE
    if not state.exists():
        return None
    recorded = json.loads(state.read_text())
    if "processes" not in recorded:
        raise StackStartError(f"{state} predates `propscope-dev scaled`; start the stack again")
    processes = recorded["processes"]

    def entries(role: str, names: list[str], logs: list[Path]) -> list[_Process]:
        pids = processes[role]
        return [
            _Process(name, log, _Recorded(pid) if pid is not None and _ours(pid) else None)
            for name, log, pid in zip(names, logs, pids, strict=True)
        ]

    redis_ports = [_port(node) for node in recorded["redis_nodes"]]
    gateway_ports = [_port(gateway) for gateway in recorded["gateways"]]
    count = len(recorded["tritons"])
    return ScaledStack(
        gateways=recorded["gateways"],
        gateway_metrics=recorded["gateway_metrics"],
        tritons=recorded["tritons"],
        triton_metrics=recorded["triton_metrics"],
        redis_nodes=recorded["redis_nodes"],
        redis_url=recorded["redis_url"],
        triton_http=recorded["triton_http"],
        run_dir=run_dir,
        _triton_ports=[TritonPorts(**ports) for ports in recorded["triton_ports"]],
        _redis_bus_ports=recorded["redis_bus_ports"],
        _tritons=entries(
            "triton",
            [f"triton-{i}" for i in range(count)],
            [_triton_log(run_dir, i) for i in range(count)],
        ),
        _redis=entries(
            "redis",
            [f"redis-{p}" for p in redis_ports],
            [run_dir / f"redis-{p}.log" for p in redis_ports],
        ),
        _gateways=entries(
            "gateway",
            [f"gateway-{p}" for p in gateway_ports],
            [run_dir / f"gateway-{p}.log" for p in gateway_ports],
        ),
        timeout_s=start_timeout_s(os.environ) if timeout_s is None else timeout_s,
        models=tuple(recorded["models"]),
    )


def down_scaled(run_dir: Path) -> dict | None:
    """Stop the scaled stack recorded in `run_dir` (by `propscope-dev up --tritons ...`)."""
    state = run_dir / STATE_FILE
    if not state.exists():
        return None
    try:
        recorded = json.loads(state.read_text())
    except ValueError:
        recorded = {"pids": []}
    _stop_groups([pid for pid in recorded.get("pids", []) if _ours(pid)], STOP_TIMEOUT_S)
    state.unlink()
    return recorded


def _ours(pid: int) -> bool:
    """A recorded pid still runs one of the stack's programs (not a reused pid)."""
    command = _command_line(pid)
    return any(marker in command for marker in COMMAND_MARKERS.values())


def _triton_log(run_dir: Path, index: int) -> Path:
    return run_dir / f"triton-{index}.log"


def _launch_triton(
    run_dir: Path, index: int, ports: TritonPorts, models: tuple[str, ...]
) -> subprocess.Popen:
    return start_triton(
        run_dir / "models",
        ports,
        run_dir / "triton-cache",
        _triton_log(run_dir, index),
        new_session=True,
        models=models,
    )


def _wait_for_triton(entry: _Process, ports: TritonPorts, timeout_s: float) -> None:
    try:
        models = wait_for_models(f"http://127.0.0.1:{ports.http}", entry.process, timeout_s)
        wait_for_port(ports.grpc, entry.process, timeout_s, f"{entry.name} gRPC")
    except (RuntimeError, TimeoutError) as error:
        raise StackStartError(f"{entry.name}: {error} (log {entry.log_file})") from None
    failed = {m.name: m.reason for m in models if m.state != "READY"}
    if failed:
        raise StackStartError(f"{entry.name} could not load {failed} (log {entry.log_file})")


def _launch_redis(run_dir: Path, port: int, bus_port: int) -> subprocess.Popen:
    """A cluster-mode redis-server whose node state (nodes.conf) lives in its own folder,
    so a restart on the same ports rejoins with the same id and slots. The cluster bus
    port is chosen, not Redis's port + 10000, which may be taken or past 65535."""
    node_dir = run_dir / f"redis-{port}"
    node_dir.mkdir(exist_ok=True)
    command = redis_command(
        str(shutil.which("redis-server")),
        port,
        "--dir",
        str(node_dir),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-port",
        str(bus_port),
        "--cluster-node-timeout",
        str(CLUSTER_NODE_TIMEOUT_MS),
        "--cluster-require-full-coverage",
        "no",
    )
    with open(run_dir / f"redis-{port}.log", "ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _create_cluster(nodes: list[str], log_file: Path) -> None:
    """`redis-cli --cluster create`: the slots split evenly over the nodes, no replicas."""
    command = [
        str(shutil.which("redis-cli")),
        "--cluster",
        "create",
        *nodes,
        "--cluster-replicas",
        "0",
        "--cluster-yes",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    log_file.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        last = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
        raise StackStartError(f"redis-cli --cluster create failed: {last[0]} (log {log_file})")


def cluster_view(node: str) -> tuple[dict[str, str], list[list[str]]] | None:
    """A node's CLUSTER INFO fields and CLUSTER NODES lines (split on blanks); None while
    it does not answer."""
    host, port = node.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), socket_timeout=1.0, decode_responses=True)
    try:
        info = str(client.execute_command("CLUSTER", "INFO"))
        nodes = str(client.execute_command("CLUSTER", "NODES"))
    except redis.RedisError:
        return None
    finally:
        client.close()
    fields = dict(line.strip().split(":", 1) for line in info.splitlines() if ":" in line)
    return fields, [line.split() for line in nodes.splitlines() if line.strip()]


def cluster_whole(nodes: list[str]) -> bool:
    """Every node answers, reports cluster_state:ok with all slots assigned, and sees
    every node connected and not failing."""
    for node in nodes:
        view = cluster_view(node)
        if view is None:
            return False
        info, lines = view
        if info.get("cluster_state") != "ok" or info.get("cluster_slots_assigned") != str(
            CLUSTER_SLOTS
        ):
            return False
        if len(lines) != len(nodes) or any(
            "fail" in line[2] or line[7] != "connected" for line in lines
        ):
            return False
    return True


def _wait_for_cluster(nodes: list[str], processes: list[_Process], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cluster_whole(nodes):
        for entry in processes:
            if entry.process is not None and entry.process.poll() is not None:
                raise StackStartError(
                    f"{entry.name} exited with code {entry.process.returncode} "
                    f"(log {entry.log_file})"
                )
        if time.monotonic() > deadline:
            raise StackStartError(
                f"the Redis Cluster {nodes} not whole after {timeout_s:.0f} s "
                f"(logs {processes[0].log_file.parent}/redis-*.log)"
            )
        time.sleep(0.1)


def _add_gateway(stack: ScaledStack, gateway_env: dict[str, str]) -> None:
    port, metrics_port = free_port(), free_port()
    env = {
        "PROPSCOPE_LISTEN_ADDRESS": f"127.0.0.1:{port}",
        "PROPSCOPE_TRITON_URL": ",".join(stack.tritons),
        "REDIS_URL": stack.redis_url,
        "PROPSCOPE_METRICS_PORT": str(metrics_port),
        "PROPSCOPE_PREPROCESSING_FILE": str(DEFAULT_PREPROCESSING),
        "PROPSCOPE_HEALTH_POLL_S": "0.5",
        **gateway_env,
    }
    entry = _Process(f"gateway-{port}", stack.run_dir / f"gateway-{port}.log")
    entry.process = start_gateway(env, entry.log_file)
    stack._gateways.append(entry)
    stack.gateways.append(f"127.0.0.1:{port}")
    stack.gateway_metrics.append(f"http://127.0.0.1:{metrics_port}/metrics")


def _wait_serving(target: str, entry: _Process, timeout_s: float) -> None:
    """Until the gateway's health check says SERVING (it has reached a Triton)."""
    try:
        wait_for(
            lambda: health_status(target, timeout_s=1.0) == health_pb2.HealthCheckResponse.SERVING,
            entry.process,
            f"the gateway at {target}",
            timeout_s,
            0.2,
        )
    except (RuntimeError, TimeoutError) as error:
        raise StackStartError(f"{error} (log {entry.log_file})") from None


def _stop(entry: _Process) -> None:
    if entry.process is not None:
        _stop_groups([entry.process.pid], STOP_TIMEOUT_S)
        entry.process = None


def _pid(entry: _Process) -> int | None:
    return entry.process.pid if entry.running and entry.process is not None else None


def _port(node: str) -> int:
    return int(node.rsplit(":", 1)[1])


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise StackStartError("the scaled stack did not start in time")
    return left
