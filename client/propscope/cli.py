"""The ``propscope`` command line: ``propscope explain`` and ``propscope models``.

Exit codes: 0 success, 2 an error the user can fix (unreachable or failing server, unreadable
image, malformed --property, bad option), 130 interrupted. 1 is reserved. A property that fails
on the server is reported in its row (or its JSON event) and is not an error of the command.

``--json`` writes one JSON object per line and event: the event's ``to_dict()`` plus ``"event"``
(the class name: Accepted, Progress, PropertyResult, Done) and ``"model"``; ``models --json``
writes one ``ModelInfo.to_dict()`` per line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from propscope._client import Client
from propscope._errors import PropscopeError
from propscope._events import Accepted, Done, Event, ModelInfo, Progress, PropertyResult
from propscope._images import encode_image
from propscope._properties import PROPERTY_SYNTAX, Property, parse_property
from propscope._requests import normalize_properties

__all__ = ["app"]

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_TARGET = "localhost:50051"
TARGET_ENVVAR = "PROPSCOPE_TARGET"

app = typer.Typer(
    name="propscope",
    help="Explain image classifiers by gradual interventions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

TargetOption = Annotated[
    str,
    typer.Option(
        "--target",
        metavar="HOST:PORT",
        envvar=TARGET_ENVVAR,
        help=f"Gateway address HOST:PORT (default: ${TARGET_ENVVAR} or {DEFAULT_TARGET}).",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Write one JSON object per line instead of a table.")
]
TimeoutOption = Annotated[
    float | None,
    typer.Option("--timeout", min=0.0, help="Deadline of each call in seconds (default: none)."),
]


@dataclass(frozen=True)
class Connection:
    """How to reach a gateway that requires a token or TLS (options before the command)."""

    token: str | None = None
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def client(self, target: str, timeout: float | None) -> Client:
        credentials = None
        if self.ca_cert or self.client_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.ca_cert.read_bytes() if self.ca_cert else None,
                private_key=self.client_key.read_bytes() if self.client_key else None,
                certificate_chain=self.client_cert.read_bytes() if self.client_cert else None,
            )
        return Client(target, credentials=credentials, token=self.token, timeout=timeout)


@app.callback()
def main(
    context: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log the SDK's debug messages to stderr.")
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="PROPSCOPE_TOKEN",
            help="Bearer token of the gateway (default: $PROPSCOPE_TOKEN).",
            show_default=False,
        ),
    ] = None,
    ca_cert: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="CA certificate (PEM): connect with TLS."),
    ] = None,
    client_cert: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Client certificate (PEM) for mutual TLS."),
    ] = None,
    client_key: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Client private key (PEM) for mutual TLS."),
    ] = None,
) -> None:
    """Explain image classifiers by gradual interventions."""
    context.obj = Connection(token, ca_cert, client_cert, client_key)
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )


@app.command()
def explain(
    context: typer.Context,
    image: Annotated[
        Path,
        typer.Argument(
            metavar="IMAGE", help="The image: PNG or JPEG (other formats are converted to PNG)."
        ),
    ],
    models: Annotated[
        list[str],
        typer.Option(
            "--model",
            "-m",
            metavar="NAME",
            help="Classifier to explain; repeat to explain the same image against each in turn.",
            show_default=False,
        ),
    ],
    property_specs: Annotated[
        list[str],
        typer.Option(
            "--property",
            "-p",
            metavar="SPEC",
            help=f"Property to intervene on, {PROPERTY_SYNTAX}; repeatable.",
            show_default=False,
        ),
    ],
    target: TargetOption = DEFAULT_TARGET,
    steps: Annotated[
        int, typer.Option(min=0, help="Edited images per path (0: server default).")
    ] = 0,
    samples: Annotated[int, typer.Option(min=0, help="Paths per property (0: default).")] = 0,
    seed: Annotated[int, typer.Option(min=0, help="Seed for editing and the test.")] = 0,
    permutations: Annotated[
        int, typer.Option(min=0, help="Permutations of the test (0: server default).")
    ] = 0,
    alpha: Annotated[
        float, typer.Option(min=0.0, help="Significance level (0: server default).")
    ] = 0.0,
    min_probability_change: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Smallest change of the target probability that makes a significant "
            "property relevant (default: the server's, 0.05).",
        ),
    ] = None,
    target_class: Annotated[
        int | None,
        typer.Option(min=0, help="Class whose probability to follow (default: predicted class)."),
    ] = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """Explain IMAGE's prediction by each --model for each --property."""
    try:
        properties = normalize_properties([parse_property(spec) for spec in property_specs])
    except ValueError as error:
        _fail(str(error))
    try:
        image_bytes = encode_image(image)
    except OSError as error:
        _fail(f"cannot read image {str(image)!r}: {error.strerror or error}")
    except ValueError as error:
        _fail(f"cannot use image {str(image)!r}: {error}")
    unique_models = list(dict.fromkeys(models))
    options: dict[str, Any] = {
        "steps": steps,
        "samples": samples,
        "seed": seed,
        "permutations": permutations,
        "alpha": alpha,
        "min_probability_change": min_probability_change,
        "target_class": target_class,
    }
    try:
        with context.obj.client(target, timeout) as client:
            if as_json:
                _explain_json(client, image_bytes, unique_models, properties, options)
            else:
                _explain_table(client, image_bytes, unique_models, properties, options)
    except PropscopeError as error:
        _fail(f"{target}: {error}")
    except ValueError as error:  # arguments the SDK rejects
        _fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command()
def models(
    context: typer.Context,
    target: TargetOption = DEFAULT_TARGET,
    as_json: JsonOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """List the classifiers and editors the gateway serves."""
    try:
        with context.obj.client(target, timeout) as client:
            infos = client.list_models()
    except PropscopeError as error:
        _fail(f"{target}: {error}")
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        for info in infos:
            _write_json(info.to_dict())
        return
    Console().print(_models_table(infos))


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit code 2."""
    one_line = " ".join(message.split())
    typer.echo(f"propscope: error: {one_line}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _write_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _explain_json(
    client: Client,
    image: bytes,
    models: Sequence[str],
    properties: Sequence[Property],
    options: dict[str, Any],
) -> None:
    for model in models:
        for event in client.explain(image, model, properties, **options):
            _write_json({"event": type(event).__name__, "model": model, **event.to_dict()})


def _explain_table(
    client: Client,
    image: bytes,
    models: Sequence[str],
    properties: Sequence[Property],
    options: dict[str, Any],
) -> None:
    view = _ExplainView(models, [prop.name for prop in properties])
    console = Console()
    with Live(view, console=console, refresh_per_second=8) as live:
        for model in models:
            for event in client.explain(image, model, properties, **options):
                view.update(model, event)
                if isinstance(event, Done):
                    live.console.print(_timings_line(model, event))
                live.refresh()


@dataclass
class _Row:
    model: str
    property_name: str
    result: PropertyResult | None = None
    status: Text | str = "waiting"


class _ExplainView:
    """The live table: one row per (model, property), filled in as events arrive."""

    def __init__(self, models: Sequence[str], property_names: Sequence[str]) -> None:
        self._rows = {
            (model, name): _Row(model, name) for model in models for name in property_names
        }

    def update(self, model: str, event: Event) -> None:
        if isinstance(event, Accepted):
            for name in event.property_names:
                self._row(model, name).status = "accepted"
        elif isinstance(event, Progress):
            row = self._row(model, event.property_name)
            if row.result is None:
                row.status = f"{event.stage} {event.completed}/{event.total}"
        elif isinstance(event, PropertyResult):
            row = self._row(model, event.property_name)
            row.result = event
            row.status = (
                Text("ok", style="green")
                if event.ok
                else Text(f"failed: {event.status_code.name}: {event.error}", style="red")
            )
        elif isinstance(event, Done):
            for (row_model, _), row in self._rows.items():
                if row_model == model and row.result is None:
                    row.status = Text("no result", style="red")

    def _row(self, model: str, property_name: str) -> _Row:
        # A property the server names but the request did not (should not happen) gets a row too.
        return self._rows.setdefault((model, property_name), _Row(model, property_name))

    def __rich__(self) -> Table:
        table = Table(title="propscope explain")
        for header in (
            "model",
            "property",
            "score (E|dp|)",
            "score/unit strength",
            "p-value",
            "significant",
            "Δp (max−min)",
            "relevant",
            "flipped",
            "target class",
            "cache (hits/misses)",
            "status",
        ):
            justify = "left" if header in ("model", "property", "status") else "right"
            table.add_column(header, justify=justify)
        for row in self._rows.values():
            table.add_row(row.model, row.property_name, *_result_cells(row.result), row.status)
        return table


def _result_cells(result: PropertyResult | None) -> list[str | Text]:
    if result is None or not result.ok:
        return [""] * 9
    flipped = "yes" if result.prediction_flipped else "no"
    if result.prediction_flipped and len(result.samples) > 1:
        flipped = f"yes ({result.flip_rate:.0%})"
    significant = Text("yes", style="bold green") if result.significant else Text("no", style="dim")
    relevant = Text("yes", style="bold green") if result.relevant else Text("no", style="dim")
    return [
        f"{result.score:.4g}",
        f"{result.score_per_unit_strength:.4g}",
        f"{result.p_value:.3g}",
        significant,
        f"{result.probability_change:.3g}",
        relevant,
        flipped,
        str(result.target_class),
        f"{result.cache_hits}/{result.cache_misses}",
    ]


def _timings_line(model: str, done: Done) -> Text:
    text = Text(
        f"{model}: total {done.total_ms:.0f} ms, edit {done.edit_ms:.0f} ms, "
        f"classify {done.classify_ms:.0f} ms, score {done.score_ms:.0f} ms"
    )
    if done.request_id:
        text.append(f" (request {done.request_id})", style="dim")
    if done.properties_failed:
        text.append(f", failed properties: {done.properties_failed}", style="red")
    return text


def _models_table(infos: Sequence[ModelInfo]) -> Table:
    table = Table(title="propscope models")
    for header in ("name", "role", "versions", "state", "inputs", "editor parameters"):
        table.add_column(header)
    for info in infos:
        inputs = "\n".join(
            f"{t.name} {t.datatype}[{','.join(str(d) for d in t.shape)}]" for t in info.inputs
        )
        parameters = "\n".join(
            f"{p.name}={p.default_value}" + (f" ({'|'.join(p.choices)})" if p.choices else "")
            for p in info.editor_parameters
        )
        state_style = "green" if info.state == "READY" else "yellow"
        table.add_row(
            info.name,
            info.role.value,
            ", ".join(info.versions),
            Text(info.state, style=state_style),
            inputs,
            parameters,
        )
    return table
