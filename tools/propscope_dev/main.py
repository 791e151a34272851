"""`propscope-dev`: the local stack (Triton, Redis, gateway) that `make up`, `make demo` and the
tests run, and Triton alone (the CPU container of docker-compose.yml)."""

from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path

import typer

from propscope_dev import scale_out, stack
from propscope_dev.triton_launcher import (
    TritonPorts,
    start_triton,
    unsupported_models,
    wait_for_models,
)

app = typer.Typer(add_completion=False, no_args_is_help=True)
RUN_DIR = Path(".run")


@app.command()
def triton(
    model_repository: Path = typer.Option(
        stack.DEFAULT_MODEL_REPOSITORY, help="Triton model repository"
    ),
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    address: str = typer.Option(
        "127.0.0.1", help="interface to listen on (0.0.0.0 in a container)"
    ),
    cache_dir: Path = typer.Option(
        RUN_DIR / "triton-cache", help="where the backend folder is laid out"
    ),
) -> None:
    """Run tritonserver from the nvidia-pytriton wheel in the foreground."""
    for problem in unsupported_models([model_repository]):
        typer.echo(f"warning: {problem.warning()}", err=True)
    process = start_triton(
        model_repository,
        TritonPorts(http_port, grpc_port, metrics_port),
        cache_dir,
        address=address,
    )
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    try:
        models = wait_for_models(
            f"http://127.0.0.1:{http_port}", process, stack.start_timeout_s(os.environ)
        )
    except (RuntimeError, TimeoutError) as error:
        process.terminate()
        typer.echo(f"propscope-dev triton: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"Triton ready: grpc 127.0.0.1:{grpc_port}, http 127.0.0.1:{http_port}")
    _report_unavailable({m.name: m.reason for m in models if m.state != "READY"})
    raise typer.Exit(process.wait())


@app.command()
def up(
    port: int | None = typer.Option(
        None, help="gateway port (unset: PROPSCOPE_LISTEN_ADDRESS's, else 50051)"
    ),
    run_dir: Path = RUN_DIR,
    redis: bool = typer.Option(True, help="use redis-server when installed"),
    model_repository: list[Path] = typer.Option(
        [],
        exists=True,
        file_okay=False,
        help="another Triton model repository to serve (your own classifiers); repeatable",
    ),
    timeout: float | None = typer.Option(
        None,
        envvar=stack.START_TIMEOUT_VARIABLE,
        help=f"seconds the whole start may take (unset: {stack.DEFAULT_START_TIMEOUT_S:.0f})",
    ),
    restart: bool = typer.Option(False, help="restart a stack that is already running"),
    tritons: int = typer.Option(
        1, min=1, help="scaled out: this many Tritons (procedural and synth_hue only)"
    ),
    gateways: int = typer.Option(
        1, min=1, help="scaled out: this many gateways, each on every Triton"
    ),
    redis_cluster: int = typer.Option(
        0, min=0, help="scaled out: a Redis Cluster of this many masters (at least 3)"
    ),
) -> None:
    """Start Triton, Redis and the gateway in the background, or reuse the healthy
    stack already running from `run_dir` for the same settings. The caller's
    PROPSCOPE_* variables and REDIS_URL configure the gateway; up's own values only
    fill gaps. With --tritons, --gateways or --redis-cluster: a scaled-out stack on
    free ports instead (always started afresh)."""
    if tritons > 1 or gateways > 1 or redis_cluster:
        ignored = [
            name
            for name, given in (
                (f"--port {port}", port is not None),
                ("--model-repository", bool(model_repository)),
                ("--no-redis", not redis),
                ("--restart", restart),
            )
            if given
        ]
        if ignored:
            typer.echo(
                f"propscope-dev up: {', '.join(ignored)}: not for a scaled-out stack "
                "(--tritons, --gateways, --redis-cluster), which takes free loopback ports, "
                "serves procedural and synth_hue only, always starts afresh and needs its "
                "Redis Cluster; drop them, or drop the scaled-out options",
                err=True,
            )
            raise typer.Exit(2)
        _up_scaled(run_dir, tritons, gateways, redis_cluster, timeout)
        return
    repositories = tuple(model_repository)
    for problem in stack.check_models(repositories):
        typer.echo(f"warning: {problem.warning()}", err=True)
    request = stack.start_request(port, redis, None, repositories, os.environ)
    running = None if restart else stack.running(run_dir)
    if running is not None and running.request == request:
        typer.echo(f"already running (`--restart` starts it again; stop: {stop_command(run_dir)})")
        _report(running, run_dir)
        return
    if running is not None:
        typer.echo("restarting: the running stack was started with other settings")
    stack.down(run_dir)
    try:
        info = stack.up(
            run_dir,
            gateway_port=port,
            use_redis=redis,
            model_repositories=repositories,
            timeout_s=timeout,
        )
    except stack.StackStartError as error:
        typer.echo(f"propscope-dev up: {error}", err=True)
        raise typer.Exit(1) from None
    _report(info, run_dir)


def _report(info: stack.StackInfo, run_dir: Path) -> None:
    typer.echo(f"propscope gateway  {info.gateway}")
    typer.echo(f"Triton (gRPC)      {info.triton_grpc}")
    typer.echo(f"Triton (HTTP)      {info.triton_http_url or 'unknown (restart the stack)'}")
    typer.echo(f"path cache         {info.redis_url or 'in-process (redis-server not installed)'}")
    typer.echo(f"metrics            {info.metrics_url or 'off (PROPSCOPE_METRICS_PORT=0)'}")
    typer.echo(f"Triton metrics     {info.triton_metrics_url}")
    typer.echo(f"logs               {run_dir}/*.log; stop with `{stop_command(run_dir)}`")
    _report_unavailable(info.unavailable)


def stop_command(run_dir: Path) -> str:
    """What stops the stack of `run_dir`: `make down` stops only the default one."""
    if run_dir == RUN_DIR:
        return "make down"
    return f"propscope-dev down --run-dir {shlex.quote(str(run_dir))}"


def _report_unavailable(unavailable: dict[str, str]) -> None:
    """Models Triton could not load, with its reason; the rest serves."""
    for name, reason in sorted(unavailable.items()):
        typer.echo(f"model {name} UNAVAILABLE: {reason or 'no reason given'}")


def _up_scaled(
    run_dir: Path, tritons: int, gateways: int, redis_cluster: int, timeout: float | None
) -> None:
    if redis_cluster < 3:
        typer.echo(
            f"propscope-dev up: --redis-cluster {redis_cluster}: a scaled-out stack needs a "
            "Redis Cluster of at least 3 masters (--redis-cluster 3)",
            err=True,
        )
        raise typer.Exit(2)
    stack.down(run_dir)
    scale_out.down_scaled(run_dir)
    try:
        scaled = scale_out.up_scaled(run_dir, tritons, gateways, redis_cluster, timeout_s=timeout)
    except stack.StackStartError as error:
        typer.echo(f"propscope-dev up: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"propscope gateways {','.join(scaled.gateways)}")
    typer.echo(f"gateway metrics    {' '.join(scaled.gateway_metrics)}")
    typer.echo(f"Tritons (gRPC)     {','.join(scaled.tritons)}")
    typer.echo(f"Triton metrics     {' '.join(scaled.triton_metrics)}")
    typer.echo(f"path cache         {scaled.redis_url}")
    typer.echo(f"logs               {run_dir}/*.log; stop with `{stop_command(run_dir)}`")


@app.command()
def down(run_dir: Path = RUN_DIR) -> None:
    """Stop what `up` started (a scaled-out stack too)."""
    info = stack.down(run_dir)
    scaled = scale_out.down_scaled(run_dir)
    typer.echo("stack stopped" if info or scaled else "no stack running")


scaled_app = typer.Typer(
    no_args_is_help=True,
    help="Stop or start one process of a scaled-out stack (`up --tritons N ...`), for fault "
    "drills; scaled.json keeps its pid, so `down` stops a restarted one too.",
)
app.add_typer(scaled_app, name="scaled")
SCALED_ROLES = ("triton", "redis")


@scaled_app.command("stop")
def scaled_stop(
    role: str = typer.Argument(..., metavar="triton|redis"),
    index: int = typer.Argument(..., help="0-based, in the order `up` printed them"),
    run_dir: Path = RUN_DIR,
) -> None:
    """Stop Triton INDEX (its Python stubs too) or Redis Cluster node INDEX."""
    scaled, address = _scaled_process(run_dir, role, index)
    (scaled.stop_triton if role == "triton" else scaled.stop_redis)(index)
    typer.echo(f"{role} {index} ({address}) stopped")


@scaled_app.command("start")
def scaled_start(
    role: str = typer.Argument(..., metavar="triton|redis"),
    index: int = typer.Argument(..., help="0-based, in the order `up` printed them"),
    run_dir: Path = RUN_DIR,
    timeout: float | None = typer.Option(
        None, help="seconds to wait until it serves (default PROPSCOPE_START_TIMEOUT_S or 300)"
    ),
) -> None:
    """Start a stopped Triton or Redis node again on its ports (nothing when it runs);
    returns once it serves (a node: once the cluster is whole again)."""
    scaled, address = _scaled_process(run_dir, role, index, timeout)
    try:
        (scaled.start_triton if role == "triton" else scaled.start_redis)(index)
    except stack.StackStartError as error:
        typer.echo(f"propscope-dev scaled start: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{role} {index} ({address}) serving")


def _scaled_process(
    run_dir: Path, role: str, index: int, timeout: float | None = None
) -> tuple[scale_out.ScaledStack, str]:
    """The recorded stack and the address of process `role` `index`; exit 2 naming what
    is wrong."""
    if role not in SCALED_ROLES:
        typer.echo(f"propscope-dev scaled: {role!r}: name triton or redis", err=True)
        raise typer.Exit(2)
    try:
        scaled = scale_out.load_scaled(run_dir, timeout)
    except (stack.StackStartError, ValueError, KeyError) as error:
        typer.echo(f"propscope-dev scaled: {run_dir}/scaled.json: {error}", err=True)
        raise typer.Exit(2) from None
    if scaled is None:
        typer.echo(
            f"propscope-dev scaled: no scaled-out stack in {run_dir} "
            "(start one with `propscope-dev up --tritons 2 --gateways 2 --redis-cluster 3 "
            f"--run-dir {run_dir}`)",
            err=True,
        )
        raise typer.Exit(2)
    addresses = scaled.tritons if role == "triton" else scaled.redis_nodes
    if not 0 <= index < len(addresses):
        typer.echo(
            f"propscope-dev scaled: {role} {index}: the stack has {len(addresses)} "
            f"(0 to {len(addresses) - 1})",
            err=True,
        )
        raise typer.Exit(2)
    return scaled, addresses[index]


if __name__ == "__main__":
    app()
