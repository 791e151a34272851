"""`propscope-server`: run the gateway, Triton, or the whole local stack."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import typer
from grpc_health.v1 import health_pb2

from propscope_server import logs, stack
from propscope_server.api.server import serve as serve_gateway
from propscope_server.config import Settings
from propscope_server.triton_launcher import TritonPorts, start_triton, wait_until_ready

app = typer.Typer(add_completion=False, no_args_is_help=True)
RUN_DIR = Path(".run")


@app.command()
def serve() -> None:
    """Run the gateway in the foreground (configuration: PROPSCOPE_* variables, REDIS_URL)."""
    settings = Settings()
    logs.configure(settings.log_format)
    asyncio.run(serve_gateway(settings))


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
    process = start_triton(
        model_repository,
        TritonPorts(http_port, grpc_port, metrics_port),
        cache_dir,
        address=address,
    )
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    wait_until_ready(f"127.0.0.1:{grpc_port}", process)
    typer.echo(f"Triton ready: grpc 127.0.0.1:{grpc_port}, http 127.0.0.1:{http_port}")
    raise typer.Exit(process.wait())


@app.command()
def health(
    target: str = typer.Argument("127.0.0.1:50051", help="gateway address"),
    service: str = typer.Option("", help="health service name; empty: the whole gateway"),
    timeout_s: float = 3.0,
) -> None:
    """Exit 0 when the gateway reports SERVING (a container health check)."""
    status = stack.health_status(target, service, timeout_s)
    name = (
        "no answer" if status is None else health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    )
    typer.echo(f"{target} {service or '(gateway)'}: {name}")
    raise typer.Exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)


@app.command()
def up(
    port: int = typer.Option(50051, help="gateway port"),
    run_dir: Path = RUN_DIR,
    redis: bool = typer.Option(True, help="use redis-server when installed"),
    model_repository: list[Path] = typer.Option(
        [],
        exists=True,
        file_okay=False,
        help="another Triton model repository to serve (your own classifiers); repeatable",
    ),
) -> None:
    """Start Triton, Redis and the gateway in the background."""
    stack.down(run_dir)
    info = stack.up(
        run_dir, gateway_port=port, use_redis=redis, model_repositories=tuple(model_repository)
    )
    typer.echo(f"propscope gateway  {info.gateway}")
    typer.echo(f"Triton (gRPC)      {info.triton_grpc}")
    typer.echo(f"path cache         {info.redis_url or 'in-process (redis-server not installed)'}")
    typer.echo(f"metrics            {info.metrics_url}")
    typer.echo(f"Triton metrics     {info.triton_metrics_url}")
    typer.echo(f"logs               {run_dir}/*.log; stop with `make down`")


@app.command()
def down(run_dir: Path = RUN_DIR) -> None:
    """Stop what `up` started."""
    info = stack.down(run_dir)
    typer.echo("stack stopped" if info else "no stack running")


if __name__ == "__main__":
    app()
