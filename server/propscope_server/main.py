"""`propscope-server`: run the gateway, or probe one's health (the container health check).
The local stack (`up`, `down`, `triton`) is `propscope-dev`'s (tools/)."""

from __future__ import annotations

import asyncio

import typer
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from propscope_server import logs
from propscope_server.api.server import ListenError
from propscope_server.api.server import serve as serve_gateway
from propscope_server.config import Settings
from propscope_server.health import health_status

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command()
def serve() -> None:
    """Run the gateway in the foreground (configuration: PROPSCOPE_* variables, REDIS_URL)."""
    try:
        settings = Settings()
    except ValidationError as error:
        for problem in setting_problems(error):
            typer.echo(f"propscope-server: {problem}", err=True)
        raise typer.Exit(1) from None
    logs.configure(settings.log_format)
    try:
        asyncio.run(serve_gateway(settings))
    except ListenError as error:
        typer.echo(f"propscope-server: {error}", err=True)
        raise typer.Exit(1) from None


# Settings read from a variable of their own name (REDIS_URL), not PROPSCOPE_<NAME>.
_ALIASES = {
    field.validation_alias
    for field in Settings.model_fields.values()
    if isinstance(field.validation_alias, str)
}


def setting_problems(error: ValidationError) -> list[str]:
    """One line per refused setting, named as its variable is set. Pydantic's traceback
    filled a screen and hid this line, the one that says what to fix."""
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        if loc and loc[0] in _ALIASES:  # pydantic names an aliased field by its alias
            variable = loc[0]
        elif loc:
            variable = "PROPSCOPE_" + "__".join(loc).upper()
        else:
            variable = "the PROPSCOPE_* settings"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(message if message.startswith(variable) else f"{variable}: {message}")
    return problems


@app.command()
def health(
    target: str = typer.Argument("127.0.0.1:50051", help="gateway address"),
    service: str = typer.Option("", help="health service name; empty: the whole gateway"),
    timeout_s: float = 3.0,
) -> None:
    """Exit 0 when the gateway reports SERVING (a container health check)."""
    status = health_status(target, service, timeout_s)
    name = (
        "no answer" if status is None else health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    )
    typer.echo(f"{target} {service or '(gateway)'}: {name}")
    raise typer.Exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)


if __name__ == "__main__":
    app()
