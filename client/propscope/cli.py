"""The ``propscope`` command line: ``propscope explain``, ``propscope models`` and
``propscope review``.

Exit codes: 0 success, 2 an error the user can fix (unreachable or failing server, unreadable
image, malformed --property or review spec, bad option), 130 interrupted. 1 only from
``review``: a rule failed. A property that fails on the server is reported in its row (or its
JSON event) of ``explain`` and is not an error of the command; in ``review`` it is (exit 2).

``--json`` writes one JSON object per line and event: the event's ``to_dict()`` plus ``"event"``
(the class name: Accepted, Progress, PropertyResult, Done) and ``"model"``; ``models --json``
writes one ``ModelInfo.to_dict()`` per line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as ProgressBar
from rich.table import Table
from rich.text import Text

from propscope._client import Client
from propscope._errors import PropscopeError
from propscope._events import Accepted, Done, Event, ModelInfo, Progress, PropertyResult
from propscope._images import encode_image
from propscope._properties import PROPERTY_SYNTAX, parse_property
from propscope._requests import normalize_properties

__all__ = ["app"]

logger = logging.getLogger(__name__)

EXIT_RULE_FAILED = 1
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
    report: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            help="Also write an HTML report (curves, path images) to this file.",
            show_default=False,
        ),
    ] = None,
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
        "return_path_images": report is not None,
    }
    recorded: dict[str, list[Event]] = {model: [] for model in unique_models}
    try:
        with context.obj.client(target, timeout) as client:

            def events(model: str) -> Iterator[Event]:
                for event in client.explain(image_bytes, model, properties, **options):
                    recorded[model].append(event)
                    yield event

            if as_json:
                _explain_json(events, unique_models)
            else:
                _explain_table(events, unique_models, [prop.name for prop in properties])
    except PropscopeError as error:
        _fail(f"{target}: {error}")
    except ValueError as error:  # arguments the SDK rejects
        _fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if report is not None:
        _write_explain_report(report, str(image), target, seed, target_class, recorded)


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


@app.command()
def review(
    context: typer.Context,
    spec_file: Annotated[
        Path, typer.Argument(metavar="SPEC", help="The review spec (YAML), see docs/review.md.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", file_okay=False, help="Folder for review.{md,html,json} and junit.xml."
        ),
    ] = Path("propscope-review"),
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            metavar="HOST:PORT",
            envvar=TARGET_ENVVAR,
            help=f"Gateway address (default: ${TARGET_ENVVAR}, else the spec's service.target).",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Explanations in flight (default: the spec's)."),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="A progress bar (default: on a terminal outside CI; log lines otherwise).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check a candidate model (against a baseline) by the rules of SPEC over its image set.

    Exit code 0: every rule passed; 1: a rule failed; 2: the review could not run."""
    try:
        passed = _run_review(context.obj, spec_file, out, target, concurrency, progress)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as error:
        # Exit code 1 means "a rule failed": a bug must not pass for a verdict on the model.
        logger.debug("the review failed", exc_info=True)
        _fail(f"the review failed unexpectedly: {type(error).__name__}: {error} (-v shows where)")
    if not passed:
        raise typer.Exit(EXIT_RULE_FAILED)


def _run_review(
    connection: Connection,
    spec_file: Path,
    out: Path,
    target: str | None,
    concurrency: int | None,
    progress: bool | None,
) -> bool:
    """Runs the review and writes its reports; whether every rule passed."""
    review_package = _review_package()
    try:
        spec, images = review_package.load_spec(spec_file)
    except review_package.SpecError as error:
        _fail(str(error))
    if concurrency is not None:
        spec = spec.model_copy(update={"concurrency": concurrency})
    address = target or spec.service.target
    show_bar = (
        progress if progress is not None else sys.stderr.isatty() and not os.environ.get("CI")
    )
    typer.echo(
        f"propscope review: {len(images)} images, {len(spec.properties)} properties, "
        f"{1 + (spec.baseline is not None)} models, {address}",
        err=True,
    )
    try:
        with (
            connection.client(address, spec.service.timeout_s) as client,
            _review_progress(show_bar) as report,
        ):
            result = review_package.run_review(spec, images, client, on_progress=report)
    except review_package.ReviewError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    try:
        paths = review_package.write_reports(result, out)
    except OSError as error:
        _fail(f"cannot write the reports to {str(out)!r}: {error.strerror or error}")
    sys.stdout.write(paths["markdown"].read_text(encoding="utf-8"))
    typer.echo(
        f"propscope review: {'passed' if result.passed else 'FAILED'} in {result.seconds:.0f} s; "
        f"reports in {out}/ ({', '.join(path.name for path in paths.values())})",
        err=True,
    )
    return result.passed


def _review_package() -> Any:
    """The review modules, imported on use: they need the ``review`` extra (matplotlib, ...)."""
    try:
        import propscope.review as review_package
    except ImportError as error:
        _fail(f"this command needs the review extra: pip install 'propscope[review]' ({error})")
    return review_package


@contextmanager
def _review_progress(show_bar: bool) -> Iterator[Callable[[Any], None]]:
    """A progress callback: a rich bar on a terminal, else a log line per tenth of the work."""
    if show_bar:
        with ProgressBar(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task("explaining", total=None)

            def advance(update: Any) -> None:
                bar.update(task, completed=update.completed, total=update.total)

            yield advance
        return

    def log_line(update: Any) -> None:
        step = max(1, update.total // 10)
        if update.completed % step == 0 or update.completed == update.total:
            typer.echo(
                f"propscope review: {update.completed}/{update.total} explanations "
                f"(last: {update.image}, {update.model})",
                err=True,
            )

    yield log_line


def _write_explain_report(
    report: Path,
    image: str,
    target: str,
    seed: int,
    target_class: int | None,
    recorded: dict[str, list[Event]],
) -> None:
    review_package = _review_package()
    accepted = {
        model: event
        for model, events in recorded.items()
        for event in events
        if isinstance(event, Accepted)
    }
    results = {
        model: [event for event in events if isinstance(event, PropertyResult)]
        for model, events in recorded.items()
    }
    if not accepted:
        _fail("no explanation to report")
    result = review_package.explanation_result(
        image, target, seed=seed, target_class=target_class, accepted=accepted, results=results
    )
    try:
        report.write_text(review_package.render_html(result), encoding="utf-8")
    except OSError as error:
        _fail(f"cannot write the report {str(report)!r}: {error.strerror or error}")
    typer.echo(f"propscope: report written to {report}", err=True)


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit code 2."""
    one_line = " ".join(message.split())
    typer.echo(f"propscope: error: {one_line}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _write_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


EventSource = Callable[[str], Iterator[Event]]


def _explain_json(events: EventSource, models: Sequence[str]) -> None:
    for model in models:
        for event in events(model):
            _write_json({"event": type(event).__name__, "model": model, **event.to_dict()})


def _explain_table(events: EventSource, models: Sequence[str], property_names: list[str]) -> None:
    view = _ExplainView(models, property_names)
    console = Console()
    with Live(view, console=console, refresh_per_second=8) as live:
        for model in models:
            for event in events(model):
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
