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
from rich import box
from rich.console import Console, Group
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
from propscope._events import (
    Accepted,
    Decision,
    Done,
    Event,
    ModelInfo,
    Progress,
    PropertyResult,
)
from propscope._images import encode_image
from propscope._preprocessing import (
    OUTPUT_KINDS,
    RESIZE_MODES,
    Preprocessing,
    parse_triple,
    read_class_labels,
)
from propscope._properties import parse_property
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
            help="Property to intervene on (syntax and examples above); repeatable.",
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
    fixed_steps: Annotated[
        bool,
        typer.Option(
            "--fixed-steps",
            help="Exactly --steps edited images per path. Default: adaptive paths, which the "
            "service lengthens (up to --max-steps) while the test cannot decide.",
        ),
    ] = False,
    max_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="Adaptive paths: the longest path, steps x a power of two (0: the server's).",
        ),
    ] = 0,
    mean: Annotated[
        str | None,
        typer.Option(
            metavar="R,G,B",
            help="Per-channel mean the model subtracts after scaling to [0, 1], e.g. "
            "0.485,0.456,0.406 (default: the model's config, then the gateway's).",
            show_default=False,
        ),
    ] = None,
    std: Annotated[
        str | None,
        typer.Option(
            metavar="R,G,B",
            help="Per-channel std the model divides by, e.g. 0.229,0.224,0.225 (positive).",
            show_default=False,
        ),
    ] = None,
    output_kind: Annotated[
        str | None,
        typer.Option(
            metavar="|".join(OUTPUT_KINDS),
            help="What the model outputs (default: declared by the model, else detected).",
            show_default=False,
        ),
    ] = None,
    resize: Annotated[
        str | None,
        typer.Option(
            metavar="|".join(RESIZE_MODES),
            help="How an image of another size becomes the model's input (default: the "
            "model's, else squash).",
            show_default=False,
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            metavar="FILE|A,B,...",
            help="Class names by index: a file (a JSON list, or one name per line) or a "
            "comma-separated list (default: the model's propscope.class_labels).",
            show_default=False,
        ),
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
    """Explain IMAGE's prediction by each --model for each --property.

    --property: NAME=EDITOR\\[@VERSION]\\[:key=value,...]\\[;REGION]
    or NAME=@FOLDER: your own path, the folder's images in natural order
    (x_2 before x_10) as x_1..x_N.

    REGION limits an editor's edit to mask=FILE (PNG/JPEG, any size; its alpha,
    else its grey level: 0 keeps, 255 edits), box=LEFT,TOP,RIGHT,BOTTOM
    (fractions of the image) or box_px=LEFT,TOP,RIGHT,BOTTOM (pixels):

    -p 'hue=procedural:operation=hue,degrees=90'
    -p 'hue=procedural:operation=hue;mask=cat-mask.png'
    -p 'hue=procedural:operation=hue;box=0.1,0.2,0.6,0.9'
    -p 'patch=procedural:operation=blend;box_px=10,10,74,74'
    -p 'rain=@paths/rain/'

    Preprocessing overrides the model's own declaration, field by field:
    --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --output-kind logits
    --resize center_crop --labels labels.txt
    """
    try:
        properties = normalize_properties([parse_property(spec) for spec in property_specs])
        preprocessing = _preprocessing_option(mean, std, output_kind, resize)
        class_labels = _labels_option(labels)
    except ValueError as error:
        _fail(str(error))
    if fixed_steps and max_steps:
        _fail("--max-steps applies to adaptive paths; leave out --fixed-steps or --max-steps")
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
        "preprocessing": preprocessing,
        "class_labels": class_labels,
        "path_mode": "fixed" if fixed_steps else None,
        "max_steps": max_steps,
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
    console = Console()
    console.print(_models_table(infos))
    for note in _models_notes(infos):
        console.print(note)


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


def _preprocessing_option(
    mean: str | None, std: str | None, output_kind: str | None, resize: str | None
) -> Preprocessing | None:
    """The --mean/--std/--output-kind/--resize override, or None when none is given."""
    if output_kind is not None and output_kind not in OUTPUT_KINDS:
        raise ValueError(f"--output-kind must be one of {', '.join(OUTPUT_KINDS)}")
    if resize is not None and resize not in RESIZE_MODES:
        raise ValueError(f"--resize must be one of {', '.join(RESIZE_MODES)}")
    try:
        preprocessing = Preprocessing(
            mean=parse_triple(mean, "--mean") if mean is not None else None,
            std=parse_triple(std, "--std") if std is not None else None,
            output_kind=output_kind,  # type: ignore[arg-type]
            resize=resize,  # type: ignore[arg-type]
        )
    except ValueError as error:
        raise ValueError(str(error).replace("preprocessing ", "--")) from None
    return None if preprocessing.empty else preprocessing


def _labels_option(labels: str | None) -> tuple[str, ...]:
    """--labels: a file (a JSON list of names, or one per line) or a comma-separated list."""
    if labels is None:
        return ()
    if Path(labels).is_file():
        return read_class_labels(Path(labels))
    names = tuple(name.strip() for name in labels.split(","))
    if not all(names):
        raise ValueError(f"--labels {labels!r}: empty class name")
    return names


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
                    live.console.print(_timings_line(model, event, view.cache(model)))
                live.refresh()
    if not console.is_terminal:
        console.line()  # Live ends its last frame with a newline on terminals only
    # Under the table, whole: reasons, warnings and errors never fit a cell.
    for note in view.notes():
        console.print(note)


# The table's words for each decision: short enough for 80 columns; the notes say the rest.
# Decisions whose reason is printed under the table: the ones a caller acts on (a longer
# path, or a look at the curve). The others' reasons are in --json.
_EXPLAINED_DECISIONS = (Decision.NOT_SIGNIFICANT, Decision.CANNOT_REACH_ALPHA)
_DECISION_CELLS = {
    Decision.RELEVANT: ("relevant", "bold green"),
    Decision.NOT_SIGNIFICANT: ("not signif.", "yellow"),
    Decision.CHANGE_TOO_SMALL: ("Δp too small", "dim"),
    Decision.CANNOT_REACH_ALPHA: ("undecided", "yellow"),
}


@dataclass
class _Row:
    model: str
    property_name: str
    result: PropertyResult | None = None
    status: Text | str = "waiting"


class _ExplainView:
    """The live table: one row per (model, property), filled in as events arrive; a model
    column only when several models are explained. ``notes`` are the lines for under it."""

    def __init__(self, models: Sequence[str], property_names: Sequence[str]) -> None:
        self._models = list(models)
        self._several_models = len(models) > 1
        self._rows = {
            (model, name): _Row(model, name) for model in models for name in property_names
        }
        self._accepted: dict[str, Accepted] = {}

    def update(self, model: str, event: Event) -> None:
        if isinstance(event, Accepted):
            self._accepted[model] = event
            for name in event.property_names:
                self._row(model, name).status = "accepted"
        elif isinstance(event, Progress):
            row = self._row(model, event.property_name)
            if row.result is None:
                row.status = f"{event.stage} {event.completed}/{event.total}"
        elif isinstance(event, PropertyResult):
            row = self._row(model, event.property_name)
            row.result = event
            row.status = "" if event.ok else Text("failed (below)", style="red")
        elif isinstance(event, Done):
            for (row_model, _), row in self._rows.items():
                if row_model == model and row.result is None:
                    row.status = Text("no result", style="red")

    def _row(self, model: str, property_name: str) -> _Row:
        # A property the server names but the request did not (should not happen) gets a row too.
        return self._rows.setdefault((model, property_name), _Row(model, property_name))

    def __rich__(self) -> Group:
        # One table per model (its name the title): a model column would not fit 80 columns.
        return Group(*(self._table(model) for model in self._models))

    def _table(self, model: str) -> Table:
        accepted = self._accepted.get(model)
        title = f"propscope explain: {model}"
        if accepted is not None and accepted.model_version:
            title += f" (version {accepted.model_version})"
        table = Table(
            title=title,
            box=box.SIMPLE_HEAD,
            title_justify="left",
            pad_edge=False,
            collapse_padding=True,
        )
        rows = [row for (row_model, _), row in self._rows.items() if row_model == model]
        # Names and decisions keep their width; numbers are short anyway.
        widths = {
            "property": min(21, max(len(row.property_name) for row in rows)),
            "decision": 12,
            "target": 8,
        }
        for header in ("property", "score", "p-value", "Δp", "N", "decision", "flip", "target"):
            justify = "right" if header in ("score", "p-value", "Δp", "N") else "left"
            table.add_column(header, justify=justify, overflow="fold", min_width=widths.get(header))
        for row in rows:
            table.add_row(row.property_name, *self._cells(row))
        return table

    def _cells(self, row: _Row) -> list[str | Text]:
        result = row.result
        if result is None or not result.ok:
            return ["", "", "", "", row.status, "", ""]
        word, style = _DECISION_CELLS.get(
            result.decision,
            ("relevant", "bold green") if result.relevant else ("not relevant", "dim"),
        )
        flips = "yes" if result.prediction_flipped else "no"
        if result.prediction_flipped and len(result.samples) > 1:
            flips = f"{result.flip_rate:.0%}"
        return [
            f"{result.score:.3g}",
            f"{result.p_value:.2g}",
            _change(result.probability_change),
            str(result.steps or ""),
            Text(word, style=style),
            flips,
            self._class(row.model, result.target_class, result.target_label),
        ]

    def _class(self, model: str, index: int, label: str) -> str:
        """The class name when the model has labels (its index is in --json), else the index."""
        accepted = self._accepted.get(model)
        name = label or (accepted.class_name(index) if accepted is not None else None)
        return name or str(index)

    def cache(self, model: str) -> tuple[int, int]:
        """Path cache hits and misses over the model's properties."""
        results = [
            row.result
            for (row_model, _), row in self._rows.items()
            if row_model == model and row.result is not None
        ]
        return sum(r.cache_hits for r in results), sum(r.cache_misses for r in results)

    def notes(self) -> list[Text]:
        """Per model, its Accepted warnings; per row, its decision in words, its warnings and
        its error: one line each, wrapped by the terminal rather than cut."""
        lines: list[Text] = []
        for model, accepted in self._accepted.items():
            for warning in accepted.warnings:
                lines.append(_note(f"{model}: ", "warning: ", warning, "yellow"))
        for row in self._rows.values():
            where = (
                f"{row.model}, {row.property_name}: "
                if self._several_models
                else (f"{row.property_name}: ")
            )
            result = row.result
            if result is None:
                continue
            if not result.ok:
                lines.append(
                    _note(where, "failed: ", f"{result.status_code.name}: {result.error}", "red")
                )
                continue
            if result.decision in _EXPLAINED_DECISIONS:
                lines.append(_note(where, "", result.decision_detail, ""))
            for warning in result.warnings:
                lines.append(_note(where, "warning: ", warning, "yellow"))
        return lines


def _change(value: float) -> str:
    """Δp in the table: two decimals, and "<0.01" rather than a misleading 0.00."""
    return "<0.01" if 0 < value < 0.005 else f"{value:.2f}"


def _note(where: str, kind: str, message: str, style: str) -> Text:
    text = Text(where, style="bold")
    text.append(kind, style=style)
    text.append(message)
    return text


def _timings_line(model: str, done: Done, cache: tuple[int, int] = (0, 0)) -> Text:
    text = Text(
        f"{model}: total {done.total_ms:.0f} ms, edit {done.edit_ms:.0f} ms, "
        f"classify {done.classify_ms:.0f} ms, score {done.score_ms:.0f} ms; "
        f"path cache {cache[0]} hits, {cache[1]} misses"
    )
    if done.request_id:
        text.append(f" (request {done.request_id})", style="dim")
    if done.properties_failed:
        text.append(f", failed properties: {done.properties_failed}", style="red")
    return text


def _models_table(infos: Sequence[ModelInfo]) -> Table:
    table = Table(title="propscope models")
    for header in ("name", "role", "versions", "state", "inputs", "parameters / preprocessing"):
        table.add_column(header, overflow="fold")  # never cut a name with an ellipsis
    for info in infos:
        inputs = "\n".join(
            f"{t.name} {t.datatype}[{','.join(str(d) for d in t.shape)}]" for t in info.inputs
        )
        if info.is_classifier:
            details = [] if info.preprocessing.empty else [info.preprocessing.describe()]
            if info.class_labels:
                details.append(_labels_summary(info.class_labels))
        else:
            details = [
                f"{p.name}={p.default_value}" + (f" ({'|'.join(p.choices)})" if p.choices else "")
                for p in info.editor_parameters
            ]
        state_style = "green" if info.state == "READY" else "yellow"
        table.add_row(
            info.name,
            info.role.value if info.role.value != "unspecified" else "classifier",
            ", ".join(info.versions),
            Text(info.state, style=state_style),
            inputs,
            "\n".join(details),
        )
    return table


def _labels_summary(labels: Sequence[str], shown: int = 4) -> str:
    head = ", ".join(labels[:shown])
    more = f", ... ({len(labels)} classes)" if len(labels) > shown else ""
    return f"labels: {head}{more}"


def _models_notes(infos: Sequence[ModelInfo]) -> list[Text]:
    """Why each model that is not READY is not, whole, under the table."""
    return [
        _note(f"{info.name}: ", f"{info.state}: ", info.state_reason, "yellow")
        for info in infos
        if info.state != "READY" and info.state_reason
    ]
