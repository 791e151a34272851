"""The ``propscope`` command line: ``propscope explain``, ``propscope attribute``, ``propscope
evaluate``, ``propscope graph``, ``propscope repair``, ``propscope models``, ``propscope
review``, ``propscope interactions`` and ``propscope explore``.

Exit codes (``EXIT_CODES``): 0 success; 1 ``review``: a rule failed; 2 an error the user can fix
(bad option, unreadable image, malformed --property or review spec, a model or editor the
gateway does not serve, a call the server refused or failed, an unreachable server); 3
``explain``: a property failed (the others are still shown); 4 ``review``: a rule was
inconclusive and the spec sets fail_on_inconclusive; 130 interrupted.

``--format table|plain|json``: a table when it fits the terminal, else a block per row (never a
cut number or name); ``plain`` one ``key=value`` line per result, in request order (model,
then property) once each model is done, for grep and diffable CI logs; ``json``
(also ``--json``) one JSON object per line and event: the event's ``to_dict()`` plus
``"event"`` (the class name: Accepted, Progress, PropertyResult, Done) and ``"model"``;
``models --format json`` writes one ``ModelInfo.to_dict()`` per line.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as ProgressBar
from rich.text import Text

from propscope import repair as repair_module
from propscope._attribution import (
    BASELINES,
    BOUNDS,
    ESTIMATORS,
    METHODS,
    METRICS,
    PERTURBATIONS,
    TARGET_SCORES,
    Attribution,
    AttributionProgress,
    Evaluation,
)
from propscope._cli_graph import print_graph, write_graph_report
from propscope._cli_output import (
    ExplainOutput,
    OutputFormat,
    eva_lines,
    eva_pairs,
    in_cli_terms,
    note,
    plain_line,
    print_evaluation,
    print_models,
    stdout_console,
    write_json,
)
from propscope._cli_progress import ProgressMode, eta, explain_progress
from propscope._client import Client
from propscope._errors import PropscopeError
from propscope._events import Accepted, Event, PropertyResult
from propscope._graph import GraphResult, graphviz_problem
from propscope._images import encode_image, folder_images
from propscope._maps import DEFAULT_ALPHA, DEFAULT_COLORMAP, read_map, write_attribution
from propscope._preflight import Classifier, PreflightError, preflight
from propscope._preprocessing import (
    OUTPUT_KINDS,
    RESIZE_MODES,
    Preprocessing,
    parse_triple,
    read_class_labels,
)
from propscope._properties import Property, parse_property
from propscope._requests import normalize_properties

__all__ = ["EXIT_CODES", "app", "run_attribute", "run_evaluate"]

logger = logging.getLogger(__name__)

EXIT_RULE_FAILED = 1
EXIT_USAGE = 2
# review: a rule the image set cannot decide, with the spec's fail_on_inconclusive set.
EXIT_INCONCLUSIVE = 4
EXIT_INTERRUPTED = 130
# explain: a property failed on the server or got no result.
EXIT_PROPERTY_FAILED = 3
# --report's path images: the longer side the server shrinks them to, the report's thumbnail
# size (propscope.review.report.html.THUMBNAIL_PX): full-size PNGs made a report of a large
# image several times slower than the explanation.
REPORT_PATH_IMAGE_PX = 160
EXIT_CODES = """\b
Exit codes:
  0    success
  1    review: a rule failed
  2    usage error, a model or editor not served, a call the server refused
       or failed, an unreachable server
  3    explain: a property failed (the others are still shown)
  4    review: a rule inconclusive, with fail_on_inconclusive set
  130  interrupted"""
DEFAULT_TARGET = "localhost:50051"
TARGET_ENVVAR = "PROPSCOPE_TARGET"

# Click's plain help (rich_markup_mode=None): it wraps long option names and examples
# instead of cutting them with an ellipsis as rich's panels do at 80 columns.
app = typer.Typer(
    name="propscope",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

TargetOption = Annotated[
    str,
    typer.Option(
        "--target",
        metavar="HOST:PORT",
        envvar=TARGET_ENVVAR,
        help=f"Gateway address HOST:PORT (default: ${TARGET_ENVVAR} or {DEFAULT_TARGET}); "
        "several gateways: IP:PORT,IP:PORT or dns:///NAME:PORT (calls round-robin).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Same as --format json.")]
FormatOption = Annotated[
    OutputFormat,
    typer.Option(
        "--format",
        help="table: a table when it fits the terminal, else a block per row (nothing cut); "
        "plain: one key=value line per result, in request order once each model is done "
        "(grep, diffable CI logs); json: one object per event as it comes.",
    ),
]
# graph and repair print once the graph is done, not per event as explain does.
GraphFormatOption = Annotated[
    OutputFormat,
    typer.Option(
        "--format",
        help="table: tables that fit the terminal, else a block per row (nothing cut); "
        "plain: one key=value line per node, edge, task-graph item, repair channel and "
        "warning, then a `graph` summary line (grep, diffable CI logs); json: one object "
        "(the GraphResult and image_files).",
    ),
]
# Options graph and repair share.
TargetClassOption = Annotated[
    int | None,
    typer.Option(min=0, help="Class to explain (default: each image's predicted one)."),
]
ReferenceOption = Annotated[
    list[Path] | None,
    typer.Option(
        metavar="DIR|FILE",
        help="Reference images for the mean baseline (8..256; a folder or files; "
        "repeatable), when the model declares no channel means.",
        show_default=False,
    ),
]
GraphStepsOption = Annotated[int, typer.Option(min=0, help="Intervention steps (0: 10).")]
GraphSeedOption = Annotated[int, typer.Option(min=0, help="Seeds the tests and the bootstrap.")]
TimeoutOption = Annotated[
    float | None,
    typer.Option("--timeout", min=0.0, help="Deadline of each call in seconds (default: none)."),
]

# --progress: a bar; --no-progress: log lines; unset: a bar on a terminal outside CI.
ProgressOption = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="A progress bar (default: on a terminal outside CI; log lines otherwise).",
        show_default=False,
    ),
]
# The preprocessing override of explain, attribute and evaluate: field by field over the
# model's own declaration.
MeanOption = Annotated[
    str | None,
    typer.Option(
        metavar="R,G,B",
        help="Per-channel mean the model subtracts after scaling to [0, 1], e.g. "
        "0.485,0.456,0.406 (default: the model's config, then the gateway's).",
        show_default=False,
    ),
]
StdOption = Annotated[
    str | None,
    typer.Option(
        metavar="R,G,B",
        help="Per-channel std the model divides by, e.g. 0.229,0.224,0.225 (positive).",
        show_default=False,
    ),
]
OutputKindOption = Annotated[
    str | None,
    typer.Option(
        metavar="|".join(OUTPUT_KINDS),
        help="What the model outputs (default: declared by the model, else detected).",
        show_default=False,
    ),
]
ResizeOption = Annotated[
    str | None,
    typer.Option(
        metavar="|".join(RESIZE_MODES),
        help="How an image of another size becomes the model's input (default: the "
        "model's, else squash).",
        show_default=False,
    ),
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
        try:
            return Client(target, credentials=credentials, token=self.token, timeout=timeout)
        except ValueError as error:  # the target: no channel could be opened
            _fail(f"--target (or ${TARGET_ENVVAR}): {error}")


def _versions() -> str:
    """The client's version and the version of the propscope.v1 stubs it was built with."""

    def version(distribution: str) -> str:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown (not installed)"

    return f"propscope {version('propscope')} (API propscope.v1, propscope-api {version('propscope-api')})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_versions())
        raise typer.Exit()


@app.callback(epilog=EXIT_CODES)
def main(
    context: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the client's and the API's versions and exit.",
        ),
    ] = False,
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
    """Explain image classifiers by gradual interventions.

    \b
    Examples:
      propscope models
      propscope explain cat.png -m resnet50 -p 'hue=procedural:operation=hue'
      propscope explain --help     (property syntax, regions, more examples)
      propscope attribute cat.png -m resnet50 --out maps/
      propscope graph cat.png -m synth_hue --layers features.1,features.2
      propscope review review.yaml --out report/

    The gateway is --target HOST:PORT of each command, else $PROPSCOPE_TARGET,
    else localhost:50051. Several gateways: IP:PORT,IP:PORT or dns:///NAME:PORT
    (every address of the name); calls round-robin over them.
    """
    context.obj = Connection(token, ca_cert, client_cert, client_key)
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )


@app.command(short_help="Which properties drive --model's prediction on IMAGE.", epilog=EXIT_CODES)
def explain(
    context: typer.Context,
    image: Annotated[
        Path,
        typer.Argument(
            metavar="IMAGE",
            help="The image: PNG or JPEG (other formats are converted to PNG); RGB only: "
            "transparent pixels show their stored colour (a warning says so).",
        ),
    ],
    models: Annotated[
        list[str],
        typer.Option(
            "--model",
            "-m",
            metavar="NAME[:VERSION]",
            help="Classifier to explain (default version: the latest ready one); repeat to "
            "explain the same image against each in turn.",
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
    mean: MeanOption = None,
    std: StdOption = None,
    output_kind: OutputKindOption = None,
    resize: ResizeOption = None,
    labels: Annotated[
        str | None,
        typer.Option(
            metavar="FILE|A,B,...",
            help="Class names by index: a file (a JSON list, or one name per line) or a "
            "comma-separated list (default: the model's propscope.class_labels).",
            show_default=False,
        ),
    ] = None,
    output_format: FormatOption = OutputFormat.TABLE,
    as_json: JsonOption = False,
    progress: ProgressOption = None,
    report: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            help="Also write an HTML report (curves, path thumbnails, served versions, "
            "durations) to this file.",
            show_default=False,
        ),
    ] = None,
    timeout: TimeoutOption = None,
) -> None:
    """Explain IMAGE's prediction by each --model for each --property.

    Every --model, editor and editor parameter is checked against what the
    gateway serves before any work starts. Progress: a bar per property on a
    terminal (--progress), else a few lines on stderr (--no-progress).

    \b
    --property NAME=EDITOR[@VERSION][:key=value,...][;REGION]
        an editor (propscope models lists them and their parameters) edits the
        image more and more strongly along a path
    --property NAME=@FOLDER
        your own path: the folder's images in natural order (x_2 before x_10)
        as x_1..x_N
    REGION limits an editor's edit:
        mask=FILE                     PNG/JPEG, any size; its alpha, else its
                                      grey level: 0 keeps, 255 edits
        box=LEFT,TOP,RIGHT,BOTTOM     fractions of the image
        box_px=LEFT,TOP,RIGHT,BOTTOM  pixels

    \b
    Examples:
      propscope explain cat.png -m resnet50 -p 'hue=procedural:operation=hue'
      propscope explain cat.png -m resnet50 -m vit:2 \\
          -p 'hue=procedural:operation=hue,region=object' \\
          -p 'patch=procedural:operation=blend;box_px=10,10,74,74'
      propscope explain cat.png -m resnet50 \\
          -p 'hue=procedural:operation=hue;mask=cat-mask.png' --format plain
      propscope explain cat.png -m resnet50 -p 'rain=@paths/rain/' --json
      propscope explain cat.png -m resnet50 -p 'hue=procedural:operation=hue' \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \\
          --output-kind logits --resize center_crop --labels labels.txt

    Preprocessing (--mean, --std, --output-kind, --resize, --labels) overrides
    the model's own declaration field by field.

    Timings under each table: total is the call's wall time; the edit, classify
    and score times are summed over the properties run in parallel, so they may
    add up to more than the total.
    """
    try:
        with _warnings_on_stderr():  # a provided path's images with transparent pixels
            properties = normalize_properties([parse_property(spec) for spec in property_specs])
        preprocessing = _preprocessing_option(mean, std, output_kind, resize)
        class_labels = _labels_option(labels)
    except ValueError as error:
        _fail(str(error))
    if fixed_steps and max_steps:
        _fail("--max-steps applies to adaptive paths; leave out --fixed-steps or --max-steps")
    image_bytes = _read_image_option(image)
    if report is not None:
        _review_package()  # the review extra renders it: say it is missing before any work
    classifiers = [Classifier.parse(text) for text in dict.fromkeys(models)]
    output_format = OutputFormat.JSON if as_json else output_format
    options: dict[str, Any] = {
        "steps": steps,
        "samples": samples,
        "seed": seed,
        "permutations": permutations,
        "alpha": alpha,
        "min_probability_change": min_probability_change,
        "target_class": target_class,
        "return_path_images": report is not None,
        "path_image_max_side_px": REPORT_PATH_IMAGE_PX,
        "preprocessing": preprocessing,
        "class_labels": class_labels,
        "path_mode": "fixed" if fixed_steps else None,
        "max_steps": max_steps,
    }
    recorded: dict[str, list[Event]] = {c.label: [] for c in classifiers}
    seconds: dict[str, float] = {}
    output = ExplainOutput(output_format)
    mode = _explain_progress_mode(progress, output_format)
    try:
        with context.obj.client(target, timeout) as client:
            preflight(
                client,
                classifiers=classifiers,
                properties=properties,
                steps=steps,
                samples=samples,
                permutations=permutations,
                alpha=alpha,
                max_steps=max_steps,
                path_mode="fixed" if fixed_steps else "adaptive",
            )
            for classifier in classifiers:
                model = classifier.label
                started = time.monotonic()
                stream = client.explain(
                    image_bytes,
                    classifier.name,
                    properties,
                    model_version=classifier.version,
                    **options,
                )
                with explain_progress(mode, len(classifiers) > 1) as shown:
                    for event in stream:
                        recorded[model].append(event)
                        shown.update(model, event)
                        output.event(model, event)
                seconds[model] = time.monotonic() - started
                output.finish(model)
    except PreflightError as error:
        _fail_lines(f"{target}: {error}")
    except PropscopeError as error:
        for classifier in classifiers:
            if recorded[classifier.label]:
                output.finish(classifier.label)  # what arrived before the failure
        _call_failed(target, error, context)
    except ValueError as error:  # arguments the SDK rejects
        _fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if report is not None:
        _write_explain_report(report, str(image), target, seed, target_class, recorded, seconds)
    if output.failed:
        raise typer.Exit(EXIT_PROPERTY_FAILED)


def _explain_progress_mode(progress: bool | None, output_format: OutputFormat) -> ProgressMode:
    """table: a bar on a terminal outside CI, else log lines (--progress/--no-progress
    choose); plain: log lines unless --no-progress; json: none unless --progress (log lines:
    stdout carries the Progress events already)."""
    if output_format is OutputFormat.TABLE:
        return "bar" if _show_bar(progress) else "log"
    if output_format is OutputFormat.PLAIN:
        return "off" if progress is False else "log"
    return "log" if progress else "off"


# Request fields (whole, last part or first part) the server names in its messages whose option
# is not named after them.
_OPTIONS_OF_FIELDS = {
    "model.name": "--model",
    "model.version": "--model NAME:VERSION",
    "model.target_class": "--target-class",
    "model.class_labels": "--labels",
    "model.preprocessing": "--mean/--std/--output-kind/--resize",
    "properties": "--property",
    "path_mode": "--fixed-steps",
    "explanation": "--map",
    "max_percentage_perturbed": "--max-fraction",
    "reference_images": "--reference",
    "repair_property": "--property",
    "repair_max_share": "--max-share",
    "second_order_pair": "--pair",
}


def _options_named(error: PropscopeError, context: typer.Context) -> str:
    """`` (option --steps)`` for the request fields the error names that an option of this
    command sets (one of ``_OPTIONS_OF_FIELDS``, or a field whose last part names the option:
    steps, sobol.nb_design), so the message says what to change on the command line."""
    options = {
        param.name: param.opts[0]
        for param in context.command.params
        if param.param_type_name == "option" and param.name
    }
    named: list[str] = []
    for violation in error.field_violations:
        field = re.sub(r"\[\d+\]", "", violation.field)
        last = field.rpartition(".")[2]
        option = (
            _OPTIONS_OF_FIELDS.get(field)
            or _OPTIONS_OF_FIELDS.get(last)
            or options.get(last)
            or _OPTIONS_OF_FIELDS.get(field.partition(".")[0])
        )
        if option and option not in named:
            named.append(option)
    return f" (option {', '.join(named)})" if named else ""


# What gRPC says when no connection to the target could be made (refused, unknown host), as
# opposed to an UNAVAILABLE the gateway itself returns (a sick model, Triton down).
_NOT_CONNECTED = re.compile(
    r"failed to connect|errors resolving|DNS resolution failed|Connection refused"
)


def _call_failed(target: str, error: PropscopeError, context: typer.Context) -> NoReturn:
    """The server's error in the command line's words: the options to change, or how to reach
    a gateway; exit code 2."""
    _fail(
        f"{target}: {in_cli_terms(str(error))}{_options_named(error, context)}"
        f"{_unreachable_hint(error, target)}"
    )


def _unreachable_hint(error: Exception, target: str) -> str:
    """A hint after an error that says no connection could be made to ``target``."""
    if not _NOT_CONNECTED.search(str(error)):
        return ""
    return (
        f"; is the gateway running at {target}? Start one with `make up` in the propscope "
        f"checkout, or pass --target HOST:PORT (or set ${TARGET_ENVVAR})"
    )


def _choice(value: str, choices: Sequence[str], option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"must be one of {', '.join(choices)}", param_hint=option)
    return value


@app.command(short_help="Where --model looks on IMAGE: an attribution map.")
def attribute(
    context: typer.Context,
    image: Annotated[
        Path,
        typer.Argument(metavar="IMAGE", help="The image: PNG or JPEG (others become PNG)."),
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", metavar="NAME[:VERSION]", help="The classifier.")
    ],
    method: Annotated[str, typer.Option(metavar="|".join(METHODS), help="The method.")] = "sobol",
    target: TargetOption = DEFAULT_TARGET,
    grid_size: Annotated[
        int, typer.Option(min=0, help="Cells per side (0: default, Sobol 8, RISE 7, EVA 8).")
    ] = 0,
    nb_design: Annotated[
        int, typer.Option(min=0, help="Sobol: N, a power of two (0: 32); N(g²+2) passes.")
    ] = 0,
    estimator: Annotated[
        str, typer.Option(metavar="|".join(ESTIMATORS), help="Sobol's total-order estimator.")
    ] = "jansen",
    per_channel: Annotated[
        bool, typer.Option("--per-channel", help="Sobol: one factor per cell and channel.")
    ] = False,
    scrambled: Annotated[
        bool, typer.Option("--scrambled", help="Sobol: Owen-scrambled design seeded by --seed.")
    ] = False,
    samples: Annotated[
        int,
        typer.Option(
            min=0, help="RISE: masks (0: 4000). EVA: points sampled in the ball (0: 256)."
        ),
    ] = 0,
    preservation_probability: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="RISE: probability a cell is kept (default 0.5)."),
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option(help="EVA: the l-inf radius, a fraction of the pixel range (8/255)."),
    ] = None,
    bound: Annotated[
        str | None,
        typer.Option(metavar="|".join(BOUNDS), help="EVA: bound propagation (crown)."),
    ] = None,
    hybrid_layer: Annotated[
        str,
        typer.Option(
            metavar="LAYER", help="EVA: verify from this declared layer (NOT guaranteed)."
        ),
    ] = "",
    target_class: Annotated[
        int | None, typer.Option(min=0, help="Class to explain (default: the predicted one).")
    ] = None,
    target_score: Annotated[
        str,
        typer.Option(
            metavar="|".join(TARGET_SCORES),
            help="What is attributed (auto: the logit of a logits model, else the log-odds).",
        ),
    ] = "auto",
    perturbation: Annotated[
        str, typer.Option(metavar="|".join(PERTURBATIONS), help="How masked pixels change.")
    ] = "inpainting",
    baseline: Annotated[
        str, typer.Option(metavar="|".join(BASELINES), help="What masked pixels become.")
    ] = "input_zero",
    blur_sigma: Annotated[
        float, typer.Option(min=0.0, help="Blur radius in input pixels (0: 2% of the side).")
    ] = 0.0,
    seed: Annotated[
        int, typer.Option(min=0, help="Seeds RISE's masks and a scrambled design.")
    ] = 0,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Folder for the PNG and JSON.")
    ] = Path("."),
    alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Opacity of the heat map over the image.")
    ] = DEFAULT_ALPHA,
    colormap: Annotated[str, typer.Option(help="matplotlib colormap.")] = DEFAULT_COLORMAP,
    labels: Annotated[
        str | None,
        typer.Option(
            metavar="FILE|A,B,...",
            help="Class names by index (as for explain).",
            show_default=False,
        ),
    ] = None,
    progress: ProgressOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    output_kind: OutputKindOption = None,
    resize: ResizeOption = None,
    output_format: FormatOption = OutputFormat.TABLE,
    timeout: TimeoutOption = None,
) -> None:
    """Compute where --model looks on IMAGE: an attribution map.

    Sobol and RISE are black-box; EVA bounds the logit margins over an
    --epsilon ball on an open model (docs/eva.md) and says whether its map is
    guaranteed. Writes OUT/<stem>.<method>.png (the heat map over the image)
    and OUT/<stem>.<method>.json (the map, its grid, the plan and the figures;
    `propscope evaluate --map` reads it), then a summary (--format plain: one
    key=value line; json: the JSON file's figures without the map).

    \b
    Examples:
      propscope attribute cat.png -m resnet50 --out maps/
      propscope attribute cat.png -m resnet50 --method rise --samples 2000
      propscope attribute cat.png -m resnet50 --grid-size 12 --scrambled
      propscope attribute cat.png -m synth_patch --method eva --epsilon 0.01
    """
    _choice(method, METHODS, "--method")
    if bound is not None:
        _choice(bound, BOUNDS, "--bound")
    _choice(estimator, ESTIMATORS, "--estimator")
    _choice(target_score, TARGET_SCORES, "--target-score")
    _choice(perturbation, PERTURBATIONS, "--perturbation")
    _choice(baseline, BASELINES, "--baseline")
    try:
        class_labels = _labels_option(labels)
        preprocessing = _preprocessing_option(mean, std, output_kind, resize)
    except ValueError as error:
        _fail(str(error))
    image_bytes = _read_image_option(image)
    options: dict[str, Any] = {
        "method": method,
        "grid_size": grid_size,
        "preprocessing": preprocessing,
        "target_class": target_class,
        "target_score": target_score,
        "perturbation": perturbation,
        "baseline": baseline,
        "blur_sigma": blur_sigma,
        "seed": seed,
        "class_labels": class_labels,
    }
    # Every option goes to the SDK, which refuses one of the other method (exit 2).
    options.update(
        nb_design=nb_design,
        estimator=estimator,
        per_channel=per_channel,
        scrambled=scrambled,
        preservation_probability=preservation_probability,
        epsilon=epsilon,
        bound=bound,
        hybrid_layer=hybrid_layer,
    )
    # --samples: RISE's masks, EVA's sampled points.
    options["samples" if method == "eva" else "nb_samples"] = samples
    classifier = _classifier_option(model, (method,))
    options["model_version"] = classifier.version
    try:
        with context.obj.client(target, timeout) as client:
            preflight(client, classifiers=[classifier])
            png_path, json_path, found = run_attribute(
                client,
                image_bytes,
                classifier.name,
                out,
                image.stem,
                show_bar=_show_bar(progress),
                alpha=alpha,
                colormap=colormap,
                image_name=str(image),
                **options,
            )
    except PreflightError as error:
        _fail_lines(f"{target}: {error}")
    except PropscopeError as error:
        _call_failed(target, error, context)
    except (ValueError, ImportError) as error:
        _fail(str(error))
    except OSError as error:
        _fail(f"cannot write to {str(out)!r}: {error.strerror or error}")
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if output_format is OutputFormat.JSON:
        write_json(
            {"model": model, "image": str(image), "png": str(png_path), "json": str(json_path)}
            | found.plan_dict()
        )
        return
    if output_format is OutputFormat.PLAIN:
        figures = [
            ("model", model),
            ("method", found.method),
            ("target_class", found.target_class),
            ("target_score", found.target_score),
            ("original_score", found.original_score),
            ("forward_passes", found.forward_passes),
            ("cache_hit", found.cache_hit),
            ("total_ms", round(found.total_ms)),
            *(eva_pairs(found.eva) if found.eva is not None else []),
            ("png", str(png_path)),
            ("json", str(json_path)),
        ]
        plain_line("attribution", figures)
        for warning in found.warnings:
            plain_line("warning", [("model", model), ("message", warning)])
        return
    console = stdout_console()
    for line in _attribution_summary(model, found, png_path, json_path):
        # Words wrap at a terminal's width; the written paths stay whole on one line.
        console.print(line, soft_wrap=True if line.plain.startswith("wrote ") else None)


def _classifier_option(text: str, methods: Sequence[str]) -> Classifier:
    """--model NAME[:VERSION] of attribute and evaluate, to be checked for ``methods``."""
    return dataclasses.replace(Classifier.parse(text), methods=tuple(methods))


def run_attribute(
    client: Client,
    image: bytes,
    model: str,
    out: Path,
    stem: str,
    *,
    show_bar: bool = False,
    alpha: float = DEFAULT_ALPHA,
    colormap: str = DEFAULT_COLORMAP,
    image_name: str = "",
    **options: Any,
) -> tuple[Path, Path, Attribution]:
    """``propscope attribute`` without the command line: computes the map (``options`` are
    ``Client.attribute``'s), with progress on stderr, and writes the PNG and JSON files."""
    with _attribution_progress(show_bar, f"{options.get('method', 'sobol')} passes") as report:
        found = client.attribute(image, model, on_progress=report, **options)
    png_path, json_path = write_attribution(
        found,
        image,
        out,
        stem,
        alpha=alpha,
        colormap=colormap,
        extra={"image": image_name or stem, "model": model},
    )
    return png_path, json_path, found


def _attribution_summary(
    model: str, found: Attribution, png_path: Path, json_path: Path
) -> list[Text]:
    label = f" ({found.target_label})" if found.target_label else ""
    version = f" version {found.model_version}" if found.model_version else ""
    cache = "from the cache" if found.cache_hit else f"{found.forward_passes} forward passes"
    lines = [
        Text(
            f"propscope attribute: {model}{version}, {found.method} ({found.options.describe()})",
            style="bold",
        ),
        Text(
            f"target class {found.target_class}{label}, {found.target_score} "
            f"{found.original_score:.4g}; {cache}, {found.total_ms:.0f} ms"
        ),
    ]
    kind = found.perturbation.kind if found.perturbation is not None else ""
    if found.perturbation_description or kind:  # EVA masks no pixels: its ball, if said
        lines.append(Text(f"perturbation: {found.perturbation_description or kind}"))
    if found.eva is not None:
        lines += eva_lines(found.eva)
    lines += [note("", "warning: ", warning, "yellow") for warning in found.warnings]
    lines += [Text(f"wrote {png_path}"), Text(f"wrote {json_path}")]
    return lines


@app.command(short_help="Score an attribution map with fidelity metrics.")
def evaluate(
    context: typer.Context,
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The image the map explains.")],
    model: Annotated[
        str, typer.Option("--model", "-m", metavar="NAME[:VERSION]", help="The classifier.")
    ],
    map_file: Annotated[
        Path | None,
        typer.Option(
            "--map",
            dir_okay=False,
            metavar="FILE",
            help="The map: a .npy HxW array or the JSON `propscope attribute` writes.",
            show_default=False,
        ),
    ] = None,
    metrics: Annotated[
        str, typer.Option(metavar="A,B,...", help=f"Some of {','.join(METRICS)}.")
    ] = "deletion,insertion,mu_fidelity",
    target: TargetOption = DEFAULT_TARGET,
    steps: Annotated[int, typer.Option(min=0, help="Deletion/insertion steps (0: 10).")] = 0,
    max_fraction: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Deletion/insertion: fraction perturbed at the end."),
    ] = None,
    baseline: Annotated[
        str, typer.Option(metavar="|".join(BASELINES), help="What removed pixels become.")
    ] = "input_zero",
    grid_size: Annotated[int, typer.Option(min=0, help="MuFidelity cells per side (0: 9).")] = 0,
    subset_percent: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="MuFidelity subset fraction (0.2).")
    ] = None,
    samples: Annotated[int, typer.Option(min=0, help="MuFidelity subsets (0: 200).")] = 0,
    radius: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Stability noise radius (0.1).")
    ] = None,
    stability_samples: Annotated[
        int, typer.Option(min=0, help="Stability: noisy images (0: 20).")
    ] = 0,
    stability_method: Annotated[
        str, typer.Option(metavar="|".join(METHODS), help="Stability: the method it reruns.")
    ] = "sobol",
    target_class: Annotated[
        int | None,
        typer.Option(min=0, help="Class to score (default: the map file's, else predicted)."),
    ] = None,
    target_score: Annotated[
        str,
        typer.Option(
            metavar="|".join(TARGET_SCORES),
            help="auto (the logit of a logits model, else the log-odds), probability, logit, log_odds.",
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(min=0, help="Seeds the random subsets and noise.")] = 0,
    as_json: JsonOption = False,
    progress: ProgressOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    output_kind: OutputKindOption = None,
    resize: ResizeOption = None,
    output_format: FormatOption = OutputFormat.TABLE,
    timeout: TimeoutOption = None,
) -> None:
    """Score an attribution map of --model on IMAGE with fidelity metrics.

    Lower deletion and higher insertion and mu_fidelity mean a more faithful
    map; lower stability a more stable method. stability needs no --map.

    \b
    Examples:
      propscope evaluate cat.png -m resnet50 --map maps/cat.sobol.json
      propscope evaluate cat.png -m resnet50 --map maps/cat.sobol.json \\
          --metrics deletion,insertion --steps 20 --format plain
      propscope evaluate cat.png -m resnet50 --metrics stability \\
          --stability-method rise
    """
    chosen = [name.strip() for name in metrics.split(",") if name.strip()]
    for name in chosen:
        _choice(name, METRICS, "--metrics")
    _choice(baseline, BASELINES, "--baseline")
    _choice(target_score, TARGET_SCORES, "--target-score")
    _choice(stability_method, METHODS, "--stability-method")
    explanation = None
    if map_file is not None:
        try:
            explanation, stored = read_map(map_file)
        except OSError as error:
            _fail(f"cannot read the map {str(map_file)!r}: {error.strerror or error}")
        except ValueError as error:
            _fail(str(error))
        if target_class is None and isinstance(stored.get("target_class"), int):
            target_class = stored["target_class"]  # the class the map was computed for
    elif chosen != ["stability"]:
        _fail(f"--map is required for {', '.join(name for name in chosen if name != 'stability')}")
    try:
        preprocessing = _preprocessing_option(mean, std, output_kind, resize)
    except ValueError as error:
        _fail(str(error))
    image_bytes = _read_image_option(image)
    if as_json:
        output_format = OutputFormat.JSON
    methods = chosen + ([stability_method] if "stability" in chosen else [])
    classifier = _classifier_option(model, methods)
    try:
        with context.obj.client(target, timeout) as client:
            preflight(client, classifiers=[classifier])
            found = run_evaluate(
                client,
                image_bytes,
                classifier.name,
                explanation,
                show_bar=_show_bar(progress) and output_format is OutputFormat.TABLE,
                model_version=classifier.version,
                metrics=chosen,
                steps=steps,
                max_percentage_perturbed=max_fraction,
                baseline=baseline,
                grid_size=grid_size,
                subset_percent=subset_percent,
                nb_samples=samples,
                radius=radius,
                stability_samples=stability_samples,
                stability_method=stability_method,
                target_class=target_class,
                target_score=target_score,
                seed=seed,
                preprocessing=preprocessing,
            )
    except PreflightError as error:
        _fail_lines(f"{target}: {error}")
    except PropscopeError as error:
        _call_failed(target, error, context)
    except ValueError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    print_evaluation(model, str(image), found, output_format)


def run_evaluate(
    client: Client,
    image: bytes,
    model: str,
    explanation: Any,
    *,
    show_bar: bool = False,
    **options: Any,
) -> Evaluation:
    """``propscope evaluate`` without the command line: ``options`` are
    ``Client.evaluate_attribution``'s; progress on stderr."""
    with _attribution_progress(show_bar, "metric passes") as report:
        return client.evaluate_attribution(image, model, explanation, on_progress=report, **options)


def _show_bar(progress: bool | None) -> bool:
    """--progress/--no-progress, else a bar on a terminal outside CI."""
    if progress is not None:
        return progress
    return sys.stderr.isatty() and not os.environ.get("CI")


def _read_image_option(image: Path) -> bytes:
    try:
        with _warnings_on_stderr():
            return encode_image(image)
    except OSError as error:
        _fail(f"cannot read image {str(image)!r}: {error.strerror or error}")
    except ValueError as error:
        _fail(f"cannot use image {str(image)!r}: {error}")


@contextmanager
def _warnings_on_stderr() -> Iterator[None]:
    """The SDK's warnings in the block (an image's alpha channel dropped) as one
    ``propscope: warning: ...`` line each, once the block is done."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        typer.echo(f"propscope: warning: {warning.message}", err=True)


@contextmanager
def _attribution_progress(
    show_bar: bool, description: str
) -> Iterator[Callable[[AttributionProgress], None]]:
    """A progress callback for forward passes: a rich bar (passes done / total, elapsed, ETA;
    narrow enough for 80 columns) on a terminal, else a line on stderr per tenth of the work
    with its ETA, for CI logs."""
    if show_bar:
        with ProgressBar(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task(description, total=None)

            def advance(update: AttributionProgress) -> None:
                bar.update(task, completed=update.done, total=update.total or None)

            yield advance
        return
    started = time.monotonic()
    reported = -1

    def log_line(update: AttributionProgress) -> None:
        nonlocal reported
        if not update.total:
            return
        tenth = 10 * update.done // update.total
        if tenth == reported:
            return
        reported = tenth
        elapsed = time.monotonic() - started
        typer.echo(
            f"propscope: {update.done}/{update.total} {description} "
            f"({update.done / update.total:.0%}, "
            f"{elapsed:.0f} s{eta(elapsed, update.done, update.total)})",
            err=True,
        )

    yield log_line


def _graph_images(images: Sequence[Path]) -> list[bytes]:
    return [_read_image_option(image) for image in images]


def _reference_images(references: Sequence[Path], option: str = "--reference") -> list[bytes]:
    """``option``'s paths: folders (their images in natural order) and image files."""
    files: list[Path] = []
    for reference in references:
        if reference.is_dir():
            try:
                files += folder_images(reference)
            except ValueError as error:
                _fail(f"{option} {str(reference)!r}: {error}")
        else:
            files.append(reference)
    return [_read_image_option(path) for path in files]


def _layers_option(layers: str | None) -> list[str]:
    names = [name.strip() for name in (layers or "").split(",") if name.strip()]
    if layers is not None and not names:
        _fail("--layers names no layer; give module paths such as features.1,features.2")
    return names


GRAPH_EXIT = """\b
Exit codes:
  0    success
  2    usage error, a model not served or not open (no interventions), a
       call the server refused or failed, an unreachable server
  130  interrupted"""


@app.command(
    short_help="Causal graph of --model's hidden channels on the images.", epilog=GRAPH_EXIT
)
def graph(
    context: typer.Context,
    images: Annotated[
        list[Path],
        typer.Argument(metavar="IMAGE", help="One or more images (PNG or JPEG)."),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", metavar="NAME[:VERSION]", help="An open classifier (its layers)."
        ),
    ],
    version: Annotated[
        str, typer.Option("--version", help="The model's version (default: latest).")
    ] = "",
    layers: Annotated[
        str | None,
        typer.Option(
            metavar="L1,L2,...",
            help="Layers to graph, as the model declares them (`propscope models` lists "
            "them; default: all).",
            show_default=False,
        ),
    ] = None,
    target: TargetOption = DEFAULT_TARGET,
    target_class: TargetClassOption = None,
    steps: GraphStepsOption = 0,
    baseline: Annotated[
        str,
        typer.Option(
            metavar="mean|zero",
            help="What a channel moves toward: its mean (the model's, else --reference's) or 0.",
        ),
    ] = "mean",
    reference: ReferenceOption = None,
    alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Significance level (0: 0.05).")
    ] = 0.0,
    permutations: Annotated[int, typer.Option(min=0, help="Permutations per test (0: 1000).")] = 0,
    nodes_per_layer: Annotated[
        int, typer.Option(min=0, help="Channels per layer given a full path (0: 16).")
    ] = 0,
    max_edges: Annotated[int, typer.Option(min=0, help="Edges per image (0: 32).")] = 0,
    min_probability_change: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Smallest |change| of the target probability that makes a significant node "
            "relevant (kept; a tenth of it for an edge's path effect; default 0.05). Lower "
            "it for a saturated model (a warning says when).",
        ),
    ] = None,
    min_share: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Task graph: share of images (default 0.5)."),
    ] = None,
    seed: GraphSeedOption = 0,
    dot: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Write the graph as Graphviz DOT.")
    ] = None,
    svg: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="Write the graph as SVG (needs Graphviz's dot)."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Write an HTML report (drawing, tables).")
    ] = None,
    progress: ProgressOption = None,
    output_format: GraphFormatOption = OutputFormat.TABLE,
    timeout: TimeoutOption = None,
) -> None:
    """Build the causal explanatory graph of --model's hidden channels on IMAGE...

    Each channel of the chosen layers is moved gradually toward its baseline;
    the channels whose gradual intervention moves the target probability in an
    orderly way (permutation test, Benjamini-Hochberg) and by at least
    --min-probability-change are the kept (relevant) nodes, and the edges
    between kept nodes of consecutive layers are scored by clamping the
    downstream channel (arXiv 2305.08950). With several images, the task graph
    keeps what is relevant on at least --min-share of them. A saturated image
    (p near 0 or 1) keeps nothing and says so in a warning. The model must
    be open: it declares propscope.layers and takes interventions
    (`propscope models` shows its layers).

    \b
    Examples:
      propscope graph red.png -m synth_hue --layers features.1,features.2
      propscope graph imgs/*.png -m synth_hue --steps 8 --svg graph.svg
      propscope graph cat.png -m own_state_dict --baseline mean \\
          --reference calibration/ --report graph.html
    """
    _choice(baseline, ("mean", "zero"), "--baseline")
    classifier = _classifier_option(model, ("causal_graph",))
    if version:
        classifier = dataclasses.replace(classifier, version=version)
    names = _layers_option(layers)
    _check_drawings(dot, svg, report)
    encoded = _graph_images(images)
    references = _reference_images(reference or [])
    options: dict[str, Any] = {
        "layers": names,
        "target_class": target_class,
        "steps": steps,
        "baseline": baseline,
        "reference_images": references,
        "alpha": alpha,
        "permutations": permutations,
        "nodes_per_layer": nodes_per_layer,
        "max_edges": max_edges,
        "min_probability_change": min_probability_change,
        "min_share": min_share,
        "seed": seed,
        "model_version": classifier.version,
    }
    found = _run_graph(context, target, timeout, classifier, encoded, progress, options)
    image_names = [str(image) for image in images]
    _write_drawings(found, classifier.name, image_names, dot, svg, report)
    print_graph(classifier.name, image_names, found, output_format)


def _run_graph(
    context: typer.Context,
    target: str,
    timeout: float | None,
    classifier: Classifier,
    images: list[bytes],
    progress: bool | None,
    options: dict[str, Any],
) -> GraphResult:
    """The BuildGraph call with a progress bar or log lines; every failure exits 2."""
    try:
        with context.obj.client(target, timeout) as client:
            preflight(client, classifiers=[classifier])
            with _attribution_progress(_show_bar(progress), "graph passes") as report:
                return client.graph(
                    images,
                    classifier.name,
                    on_progress=lambda update: report(
                        AttributionProgress(
                            update.request_id, update.passes_done, update.passes_total
                        )
                    ),
                    **options,
                )
    except PreflightError as error:
        _fail_lines(f"{target}: {error}{_open_model_hint(error, 'causal_graph')}")
    except PropscopeError as error:
        _call_failed(target, error, context)
    except ValueError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


# After a pre-flight refusal of a black-box model: what would make it graphable.
# What each open-model method needs, for the hint a pre-flight refusal ends with (the
# gateway's own refusal names the same capabilities).
_OPEN_METHOD_NEEDS = {
    "causal_graph": "activations,interventions",
    "maco": "gradients (activations too for a channel or concept)",
}


def _open_model_hint(error: PreflightError, method: str) -> str:
    if f"cannot run {method}" not in str(error):
        return ""
    return (
        f"\n  {method} needs an open model: one whose config.pbtxt declares propscope.layers "
        f'and the capabilities {_OPEN_METHOD_NEEDS[method]} (docs/own-models.md, "Open models")'
    )


def _check_drawings(dot: Path | None, svg: Path | None, report: Path | None) -> None:
    """Before any pass: the files' folders exist and --svg has Graphviz, so a finished graph
    is not lost to a typo in a path."""
    for option, path in (("--dot", dot), ("--svg", svg), ("--report", report)):
        if path is not None and not path.resolve().parent.is_dir():
            _fail(f"{option} {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    if svg is not None:
        problem = graphviz_problem()
        if problem:
            _fail(f"--svg {str(svg)!r}: {problem}; or write --dot and lay it out elsewhere")


def _write_drawings(
    found: GraphResult,
    model: str,
    images: Sequence[str],
    dot: Path | None,
    svg: Path | None,
    report: Path | None,
) -> None:
    for path, write in (
        (dot, lambda p: p.write_text(found.to_dot(), encoding="utf-8")),
        (svg, lambda p: p.write_text(found.to_svg(), encoding="utf-8")),
        (report, lambda p: write_graph_report(p, model, images, found)),
    ):
        if path is None:
            continue
        try:
            write(path)
        except RuntimeError as error:  # Graphviz missing
            _fail(f"cannot write {str(path)!r}: {error}")
        except OSError as error:
            _fail(f"cannot write {str(path)!r}: {error.strerror or error}")
        typer.echo(f"propscope: wrote {path}", err=True)


def _repair_property(text: str) -> Property:
    """--property: the explain syntax, NAME= optional (the name defaults to "repair")."""
    head = re.split(r"[:@;]", text, maxsplit=1)[0]
    try:
        return parse_property(text if "=" in head else f"repair={text}")
    except (ValueError, OSError) as error:
        _fail(f"--property {text!r}: {error}")


REPAIR_EXIT = """\b
Exit codes:
  0    success: version N+1 written (and loaded with --triton-url)
  2    usage error, a repository that cannot take version N+1, a model not
       served or not open, a call the server refused or failed, no channel
       to ablate, Triton refusing the load
  130  interrupted"""


@app.command(
    short_help="Ablate the channels a property moves: a repaired model version.",
    epilog=REPAIR_EXIT,
)
def repair(
    context: typer.Context,
    images: Annotated[
        list[Path],
        typer.Argument(metavar="IMAGE", help="Images the repair is computed on."),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="The open classifier.")],
    version: Annotated[int, typer.Option("--version", min=1, help="The version to repair, N.")],
    prop: Annotated[
        str,
        typer.Option(
            "--property",
            "-p",
            metavar="[NAME=]EDITOR[:key=value,...]",
            help="The property the model should stop relying on (explain's syntax).",
        ),
    ],
    repository: Annotated[
        Path,
        typer.Option(
            file_okay=False, exists=True, help="Triton's model repository (holds MODEL/N)."
        ),
    ],
    triton_url: Annotated[
        str | None,
        typer.Option(
            metavar="http://HOST:PORT",
            help="Triton's HTTP endpoint: load the new version (default: print the command).",
            show_default=False,
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            metavar="L1,L2,...", help="Layers to graph (default: all).", show_default=False
        ),
    ] = None,
    max_share: Annotated[
        float | None,
        typer.Option(min=0.0, max=0.5, help="Largest share of channels ablated (default 0.05)."),
    ] = None,
    target_class: TargetClassOption = None,
    baseline: Annotated[
        str,
        typer.Option(
            metavar="mean|zero",
            help="What a channel moves toward, and the value it is ablated to: its mean "
            "(the model's, else --reference's) or 0.",
        ),
    ] = "mean",
    reference: ReferenceOption = None,
    steps: GraphStepsOption = 0,
    seed: GraphSeedOption = 0,
    target: TargetOption = DEFAULT_TARGET,
    progress: ProgressOption = None,
    output_format: GraphFormatOption = OutputFormat.TABLE,
    timeout: TimeoutOption = None,
) -> None:
    """Write version N+1 of --model with the channels --property moves ablated.

    Builds the causal graph of --model version N on IMAGE... with
    --property's edited path, and writes REPOSITORY/MODEL/N+1: a copy of
    version N's folder plus propscope_ablation.json (the channels set to their
    baseline in every forward pass). Refused before any work when N+1 exists or
    when config.pbtxt would not serve both versions (set
    `version_policy: { all { } }`). With --triton-url, asks Triton to load the
    model (explicit model control); else prints the command to run. A model
    that declares no channel means needs --reference images (or --baseline zero).

    \b
    Examples:
      propscope repair red.png blue.png -m synth_hue --version 1 \\
          -p 'hue=procedural:operation=hue' --repository deploy/triton/models \\
          --triton-url http://localhost:8000
      propscope repair imgs/*.png -m my_cnn --version 1 --reference calibration/ \\
          -p 'hue=procedural:operation=hue' --repository models
    """
    _choice(baseline, ("mean", "zero"), "--baseline")
    try:
        repair_module.check_repairable(repository, model, version)
    except repair_module.RepairError as error:
        _fail(str(error))
    prop_spec = _repair_property(prop)
    classifier = Classifier(model, str(version), ("causal_graph",))
    options: dict[str, Any] = {
        "layers": _layers_option(layers),
        "target_class": target_class,
        "baseline": baseline,
        "reference_images": _reference_images(reference or []),
        "steps": steps,
        "seed": seed,
        "repair_property": prop_spec,
        "repair_max_share": max_share,
        "model_version": str(version),
    }
    found = _run_graph(
        context, target, timeout, classifier, _graph_images(images), progress, options
    )
    image_names = [str(image) for image in images]
    print_graph(model, image_names, found, output_format)
    if found.repair is None or not found.repair.channels:
        _fail("the server named no channel to ablate: nothing written (see its warnings)")
    source = f"propscope repair --property {prop} of version {version} on {len(images)} images"
    try:
        written = repair_module.write_repaired_version(
            repository, model, version, found.repair.ablation()["channels"], source
        )
    except repair_module.RepairError as error:
        _fail(str(error))
    except OSError as error:
        _fail(f"cannot write version {version + 1}: {error.strerror or error}")
    typer.echo(f"propscope: wrote {written}", err=True)
    if triton_url is None:
        typer.echo(
            "propscope: load it with: "
            + repair_module.load_command("http://localhost:8000", model)
            + " (Triton's HTTP port; or pass --triton-url)",
            err=True,
        )
        return
    try:
        repair_module.load_model(triton_url, model)
    except repair_module.RepairError as error:
        _fail(
            f"{error}; version {version + 1} is written, not loaded: load it with "
            f"{repair_module.load_command(triton_url, model)} once Triton is reachable"
        )
    typer.echo(f"propscope: Triton loaded {model} (versions {version} and {version + 1})", err=True)


@app.command(short_help="A MACO picture of --model's class, channel or concept.")
def visualize(
    context: typer.Context,
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", metavar="NAME[:VERSION]", help="An open classifier (gradients)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            dir_okay=False,
            help="The picture (PNG); its map goes to <stem>.alpha.png, both together to "
            "<stem>.rgba.png.",
        ),
    ],
    class_index: Annotated[
        int | None, typer.Option("--class", min=0, help="Maximise this class's logit.")
    ] = None,
    channel: Annotated[
        str | None,
        typer.Option(
            metavar="LAYER:INDEX",
            help="Maximise a hidden channel, e.g. features.2:5 (`propscope models` lists "
            "the layers).",
            show_default=False,
        ),
    ] = None,
    concept: Annotated[
        str | None,
        typer.Option(
            metavar="BANK_ID:INDEX",
            help="Maximise a CRAFT concept of a stored bank (`propscope concepts fit`).",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=0, help="Optimisation steps (0: 256).")] = 0,
    crops: Annotated[int, typer.Option(min=0, help="Crops per step (0: 32).")] = 0,
    noise: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Crop noise (default 0.08).")
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(min=0.0, help="Nadam's learning rate (default 1.0).")
    ] = None,
    box_start: Annotated[
        float | None, typer.Option(min=0.05, max=1.0, help="First crops' side (default 0.5).")
    ] = None,
    box_end: Annotated[
        float | None, typer.Option(min=0.05, max=1.0, help="Last crops' side (default 0.05).")
    ] = None,
    placement: Annotated[
        str, typer.Option(help="Crops 'uniform' over the picture (default) or 'centred'.")
    ] = "",
    size: Annotated[
        int, typer.Option(min=0, help="The picture's side in pixels (0: the model input's).")
    ] = 0,
    spectrum: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="DIR|FILE",
            help="Images whose mean Fourier magnitude the picture keeps (default: a natural "
            "1/f spectrum); a folder or files, repeatable.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seeds the phase, crops and noise.")] = 0,
    target: TargetOption = DEFAULT_TARGET,
    progress: ProgressOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """Draw what --model sees: the MACO picture (NeurIPS 2023) that maximises a
    class's logit (--class), a hidden channel (--channel) or a CRAFT concept
    (--concept). Only the phase of the picture's Fourier transform is
    optimised; its magnitude stays a natural-image spectrum, so the picture
    keeps natural statistics. Writes --out, its transparency map (where the
    objective's gradient accumulated) and the two together.

    \b
    Examples:
      propscope visualize -m synth_hue --class 0 -o circle.png
      propscope visualize -m synth_patch --channel features.2:5 -o ch5.png
      propscope visualize -m synth_hue --class 1 --steps 64 --crops 16 -o quick.png
    """
    objectives = [given for given in (class_index, channel, concept) if given is not None]
    if len(objectives) != 1:
        _fail("give exactly one of --class, --channel LAYER:INDEX or --concept BANK_ID:INDEX")
    if not out.resolve().parent.is_dir():
        _fail(f"--out {str(out)!r}: the folder {str(out.parent)!r} does not exist")
    objective: dict[str, Any] = {"class_index": class_index}
    for option, text, names in (
        ("--channel", channel, ("layer", "channel")),
        ("--concept", concept, ("bank_id", "concept")),
    ):
        if text is not None:
            name, _, index = text.rpartition(":")
            if not name or not index.isdigit():
                _fail(f"{option} {text!r}: write {names[0].upper()}:INDEX, e.g. features.2:5")
            objective = {names[0]: name, names[1]: int(index)}
    classifier = _classifier_option(model, ("maco",))
    images = _reference_images(spectrum, "--spectrum") if spectrum else []
    try:
        with context.obj.client(target, timeout) as client:
            preflight(client, classifiers=[classifier])
            with _attribution_progress(_show_bar(progress), "visualize steps") as report:
                found = client.visualize(
                    classifier.name,
                    model_version=classifier.version,
                    steps=steps,
                    crops=crops,
                    noise=noise,
                    learning_rate=learning_rate,
                    box_start=box_start,
                    box_end=box_end,
                    placement=placement,
                    size_px=size,
                    spectrum_images=images,
                    seed=seed,
                    on_progress=lambda update: report(
                        AttributionProgress(
                            update.request_id, update.steps_done, update.steps_total
                        )
                    ),
                    **objective,
                )
    except PreflightError as error:
        _fail_lines(f"{target}: {error}{_open_model_hint(error, 'maco')}")
    except PropscopeError as error:
        _call_failed(target, error, context)
    except ValueError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    written = found.save(out)
    if as_json:
        typer.echo(json.dumps({**found.to_dict(), "files": [str(p) for p in written]}))
        return
    best = found.predicted_class
    typer.echo(
        f"propscope visualize: {found.model} (version {found.model_version}), "
        f"{found.objective_description}\n"
        f"objective {found.start_objective:.4g} -> {found.objective:.4g}; the picture is "
        f"predicted class {best} (p = {found.class_probabilities[best]:.3f}); "
        f"{found.steps} steps x {found.crops} crops, {found.passes} passes, "
        f"{found.total_ms / 1000:.1f} s\n" + "\n".join(f"wrote {p}" for p in written)
    )
    for warning in found.warnings:
        typer.echo(f"warning: {warning}", err=True)


@app.command(short_help="List the classifiers and editors the gateway serves.")
def models(
    context: typer.Context,
    target: TargetOption = DEFAULT_TARGET,
    output_format: FormatOption = OutputFormat.TABLE,
    as_json: JsonOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """List the classifiers and editors the gateway serves: versions, state,
    inputs, each editor's parameters (default and choices) and each classifier's
    preprocessing, class names and methods."""
    try:
        with context.obj.client(target, timeout) as client:
            infos = client.list_models()
    except PropscopeError as error:
        _fail(f"{target}: {error}{_unreachable_hint(error, target)}")
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    print_models(infos, OutputFormat.JSON if as_json else output_format)


@app.command(short_help="Serve the class explorer: a web page over the gateway.")
def explore(
    context: typer.Context,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            "--address",
            metavar="HOST:PORT",
            envvar=TARGET_ENVVAR,
            help=f"Gateway address (default: ${TARGET_ENVVAR} or {DEFAULT_TARGET}).",
            show_default=False,
        ),
    ] = DEFAULT_TARGET,
    host: Annotated[str, typer.Option(help="Interface the page is served on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port of the page.")] = 8765,
    images: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            metavar="MANIFEST.csv",
            help="Class images for the concepts: a CSV with image,label columns "
            "(examples/review/manifest.csv).",
        ),
    ] = None,
    properties: Annotated[
        list[str] | None,
        typer.Option(
            "--property",
            "-p",
            metavar="NAME=EDITOR:PARAMS",
            help="A PropGrad property of the image panel (repeatable; default: the demo's three).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=0, help="PropGrad path steps.")] = 10,
    seed: Annotated[int, typer.Option(min=0, help="Seeds every call.")] = 0,
    sobol_grid: Annotated[int, typer.Option(min=0, help="Sobol grid (0: the server's).")] = 0,
    sobol_design: Annotated[int, typer.Option(min=0, help="Sobol N (0: the server's).")] = 0,
    images_per_class: Annotated[int, typer.Option(min=1, help="Images a bank is fitted on.")] = 16,
    concept_rank: Annotated[int, typer.Option(min=0, help="Concepts r (0: the server's).")] = 0,
    concept_design: Annotated[
        int, typer.Option(min=0, help="Concepts' Sobol N (0: server's).")
    ] = 0,
    pictures: Annotated[int, typer.Option(min=0, help="MACO pictures of the top concepts.")] = 5,
    maco_steps: Annotated[int, typer.Option(min=0, help="MACO steps (0: the server's).")] = 0,
    maco_crops: Annotated[int, typer.Option(min=0, help="MACO crops (0: the server's).")] = 0,
    maco_size: Annotated[int, typer.Option(min=0, help="MACO picture side (0: input's).")] = 0,
    timeout: TimeoutOption = None,
) -> None:
    """Serve the class explorer on http://HOST:PORT/: pick a model and a class and see its
    concepts ranked by importance with their MACO pictures and top crops; upload an image to
    see its PropGrad curves and path strips, its Sobol map and its concept maps. Results are
    cached per model, version, class, image and these settings (docs/explorer.md)."""
    from propscope.explorer import DEFAULT_PROPERTIES, ExplorerSettings, serve

    settings = ExplorerSettings(
        properties=tuple(properties or DEFAULT_PROPERTIES),
        steps=steps,
        seed=seed,
        sobol_grid=sobol_grid,
        sobol_design=sobol_design,
        images=images,
        images_per_class=images_per_class,
        concept_rank=concept_rank,
        concept_design=concept_design,
        pictures=pictures,
        maco_steps=maco_steps,
        maco_crops=maco_crops,
        maco_size=maco_size,
    )
    try:
        with context.obj.client(target, timeout) as client:
            serve(client, settings, host, port)
    except ValueError as error:
        _fail(str(error))
    except OSError as error:
        _fail(f"cannot serve on {host}:{port}: {error.strerror or error}")
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _review_package() -> Any:
    """The review modules, imported on use: they need the ``review`` extra (matplotlib, ...)."""
    try:
        import propscope.review as review_package
    except ImportError as error:
        _fail(f"this command needs the review extra: pip install 'propscope[review]' ({error})")
    return review_package


def _write_explain_report(
    report: Path,
    image: str,
    target: str,
    seed: int,
    target_class: int | None,
    recorded: dict[str, list[Event]],
    seconds: dict[str, float],
) -> None:
    """The one-image HTML report; ``seconds``: each model's call, end to end."""
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
        image,
        target,
        seed=seed,
        target_class=target_class,
        accepted=accepted,
        results=results,
        seconds=sum(seconds.values()),
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


def _fail_lines(message: str) -> NoReturn:
    """``message``'s lines as they are (a list of problems) on stderr, exit code 2."""
    typer.echo(f"propscope: error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


# `propscope concepts fit|show|map` (_cli_concepts.py uses this module's options and failures).
from propscope._cli_concepts import concepts_app  # noqa: E402

app.add_typer(
    concepts_app, name="concepts", short_help="CRAFT concepts of a class: fit, show, map."
)

# `propscope review SPEC` and `propscope review merge` (_cli_review.py).
from propscope._cli_review import review_app  # noqa: E402

app.add_typer(
    review_app, name="review", short_help="Gate a candidate model on a review spec's rules (CI)."
)


# `propscope consistency` (_cli_consistency.py uses this module's options and failures).
from propscope._cli_consistency import consistency  # noqa: E402

app.command(short_help="MeGe and ReCo: how stable explainers' maps are across models.")(consistency)


# `propscope interactions` (_cli_interactions.py uses this module's options and failures).
from propscope._cli_interactions import interactions  # noqa: E402

app.command(short_help="Which properties --model uses together: Sobol indices.")(interactions)
