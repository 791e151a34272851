"""The ``propscope`` command line: ``propscope explain``, ``propscope attribute``, ``propscope
evaluate``, ``propscope models`` and ``propscope review``.

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
import time
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

from propscope._attribution import (
    BASELINES,
    ESTIMATORS,
    METHODS,
    METRICS,
    PERTURBATIONS,
    TARGET_SCORES,
    Attribution,
    AttributionProgress,
    Evaluation,
)
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
from propscope._maps import DEFAULT_ALPHA, DEFAULT_COLORMAP, read_map, write_attribution
from propscope._preprocessing import (
    OUTPUT_KINDS,
    RESIZE_MODES,
    Preprocessing,
    parse_triple,
    read_class_labels,
)
from propscope._properties import parse_property
from propscope._requests import normalize_properties

__all__ = ["app", "evaluation_table", "run_attribute", "run_evaluate"]

logger = logging.getLogger(__name__)

EXIT_RULE_FAILED = 1
EXIT_USAGE = 2
# review: a rule the image set cannot decide, with the spec's fail_on_inconclusive set.
EXIT_INCONCLUSIVE = 4
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


def _choice(value: str, choices: Sequence[str], option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"must be one of {', '.join(choices)}", param_hint=option)
    return value


@app.command()
def attribute(
    context: typer.Context,
    image: Annotated[
        Path,
        typer.Argument(metavar="IMAGE", help="The image: PNG or JPEG (others become PNG)."),
    ],
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help="The classifier.")],
    method: Annotated[str, typer.Option(metavar="|".join(METHODS), help="The method.")] = "sobol",
    target: TargetOption = DEFAULT_TARGET,
    grid_size: Annotated[
        int, typer.Option(min=0, help="Cells per side (0: default, Sobol 8, RISE 7).")
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
        int, typer.Option(min=0, help="RISE: the number of masks (0: default, 4000).")
    ] = 0,
    preservation_probability: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="RISE: probability a cell is kept (default 0.5)."),
    ] = None,
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
    timeout: TimeoutOption = None,
) -> None:
    """Compute where --model looks on IMAGE: an attribution map, black-box.

    Writes OUT/<stem>.<method>.png (the heat map over the image) and
    OUT/<stem>.<method>.json (the map, its grid, the plan and the figures;
    `propscope evaluate --map` reads it).
    """
    _choice(method, METHODS, "--method")
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
        nb_samples=samples,
        preservation_probability=preservation_probability,
    )
    try:
        with context.obj.client(target, timeout) as client:
            png_path, json_path, found = run_attribute(
                client,
                image_bytes,
                model,
                out,
                image.stem,
                show_bar=_show_bar(progress),
                alpha=alpha,
                colormap=colormap,
                image_name=str(image),
                **options,
            )
    except PropscopeError as error:
        _fail(f"{target}: {error}")
    except (ValueError, ImportError) as error:
        _fail(str(error))
    except OSError as error:
        _fail(f"cannot write to {str(out)!r}: {error.strerror or error}")
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    console = Console()
    for line in _attribution_summary(model, found, png_path, json_path):
        # Words wrap at the console's width; the written paths stay whole on one line.
        console.print(line, soft_wrap=line.plain.startswith("wrote "))


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
        Text(f"perturbation: {found.perturbation_description or found.perturbation.kind}"),
    ]
    lines += [_note("", "warning: ", warning, "yellow") for warning in found.warnings]
    lines += [Text(f"wrote {png_path}"), Text(f"wrote {json_path}")]
    return lines


@app.command()
def evaluate(
    context: typer.Context,
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The image the map explains.")],
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help="The classifier.")],
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
    as_json: Annotated[
        bool, typer.Option("--json", help="Write the evaluation as one JSON object.")
    ] = False,
    progress: ProgressOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    output_kind: OutputKindOption = None,
    resize: ResizeOption = None,
    timeout: TimeoutOption = None,
) -> None:
    """Score an attribution map of --model on IMAGE with fidelity metrics.

    Lower deletion and higher insertion and mu_fidelity mean a more faithful
    map; lower stability a more stable method. stability needs no --map.
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
    try:
        with context.obj.client(target, timeout) as client:
            found = run_evaluate(
                client,
                image_bytes,
                model,
                explanation,
                show_bar=_show_bar(progress) and not as_json,
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
    except PropscopeError as error:
        _fail(f"{target}: {error}")
    except ValueError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        _write_json({"model": model, "image": str(image), **found.to_dict()})
        return
    console = Console()
    console.print(evaluation_table(model, found))
    for warning in found.warnings:
        console.print(_note("", "warning: ", warning, "yellow"))
    for result in found.results:
        for warning in result.warnings:
            console.print(_note(f"{result.metric}: ", "warning: ", warning, "yellow"))


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


# Whether a higher value of a metric means a better map (or method), for the table's last column.
_BETTER = {
    "deletion": "lower",
    "insertion": "higher",
    "mu_fidelity": "higher",
    "stability": "lower",
}


def evaluation_table(model: str, found: Evaluation) -> Table:
    """The evaluation as a table that fits 80 columns: numbers never cut (their columns do not
    wrap), the settings folded onto more lines instead."""
    label = f" ({found.target_label})" if found.target_label else ""
    version = f" version {found.model_version}" if found.model_version else ""
    table = Table(
        title=f"propscope evaluate: {model}{version}, class {found.target_class}{label}, "
        f"{found.target_score}",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        pad_edge=False,
        collapse_padding=True,
    )
    rows = [
        (
            result.metric,
            _metric_value(result.value),
            _BETTER.get(result.metric, ""),
            str(result.forward_passes),
            result.settings,
        )
        for result in found.results
    ]
    for header, justify in (
        ("metric", "left"),
        ("value", "right"),
        ("better", "left"),
        ("passes", "right"),
    ):
        width = max([len(header)] + [len(row[len(table.columns)]) for row in rows])
        table.add_column(header, justify=justify, no_wrap=True, min_width=width)  # type: ignore[arg-type]
    table.add_column("settings", overflow="fold", ratio=1)
    for row in rows:
        table.add_row(*row)
    return table


def _metric_value(value: float) -> str:
    """Four significant digits, whole: 0.1234, -0.5, 1.235e-05; "n/a" when undefined."""
    return f"{value:.4g}" if value == value and abs(value) != float("inf") else "n/a"


def _show_bar(progress: bool | None) -> bool:
    """--progress/--no-progress, else a bar on a terminal outside CI."""
    if progress is not None:
        return progress
    return sys.stderr.isatty() and not os.environ.get("CI")


def _read_image_option(image: Path) -> bytes:
    try:
        return encode_image(image)
    except OSError as error:
        _fail(f"cannot read image {str(image)!r}: {error.strerror or error}")
    except ValueError as error:
        _fail(f"cannot use image {str(image)!r}: {error}")


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
        eta = ""
        if 0 < update.done < update.total:
            eta = f", ETA {elapsed * (update.total - update.done) / update.done:.0f} s"
        typer.echo(
            f"propscope: {update.done}/{update.total} {description} "
            f"({update.done / update.total:.0%}, {elapsed:.0f} s{eta})",
            err=True,
        )

    yield log_line


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
    progress: ProgressOption = None,
) -> None:
    """Check a candidate model (against a baseline) by the rules of SPEC over its image set.

    Exit code 0: no rule failed (inconclusive ones are reported apart); 1: a rule failed;
    2: the review could not run; 4: a rule was inconclusive and the spec sets
    fail_on_inconclusive."""
    try:
        exit_code = _run_review(context.obj, spec_file, out, target, concurrency, progress)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as error:
        # Exit code 1 means "a rule failed": a bug must not pass for a verdict on the model.
        logger.debug("the review failed", exc_info=True)
        _fail(f"the review failed unexpectedly: {type(error).__name__}: {error} (-v shows where)")
    if exit_code:
        raise typer.Exit(exit_code)


def _run_review(
    connection: Connection,
    spec_file: Path,
    out: Path,
    target: str | None,
    concurrency: int | None,
    progress: bool | None,
) -> int:
    """Runs the review and writes its reports; the exit code of its verdict."""
    review_package = _review_package()
    try:
        spec, images = review_package.load_spec(spec_file)
    except review_package.SpecError as error:
        _fail(str(error))
    if concurrency is not None:
        spec = spec.model_copy(update={"concurrency": concurrency})
    address = target or spec.service.target
    show_bar = _show_bar(progress)
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
    verdict = {"passed": "passed", "failed": "FAILED", "inconclusive": "INCONCLUSIVE"}
    typer.echo(
        f"propscope review: {verdict[result.verdict]} in {result.seconds:.0f} s; "
        f"reports in {out}/ ({', '.join(path.name for path in paths.values())})",
        err=True,
    )
    if result.failures:
        return EXIT_RULE_FAILED
    return 0 if result.gate_passed else EXIT_INCONCLUSIVE


def _review_package() -> Any:
    """The review modules, imported on use: they need the ``review`` extra (matplotlib, ...)."""
    try:
        import propscope.review as review_package
    except ImportError as error:
        _fail(f"this command needs the review extra: pip install 'propscope[review]' ({error})")
    return review_package


# What the review's progress counts, per stage of ``ReviewProgress``.
_REVIEW_STAGES = {"explain": "explanations", "attribute": "attribution maps"}


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
            task = bar.add_task("explanations", total=None)

            def advance(update: Any) -> None:
                description = _REVIEW_STAGES.get(update.stage, update.stage)
                bar.update(
                    task, completed=update.completed, total=update.total, description=description
                )

            yield advance
        return

    def log_line(update: Any) -> None:
        step = max(1, update.total // 10)
        if update.completed % step == 0 or update.completed == update.total:
            typer.echo(
                f"propscope review: {update.completed}/{update.total} "
                f"{_REVIEW_STAGES.get(update.stage, update.stage)} "
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
            if info.methods:
                details.append(f"methods: {', '.join(info.methods)}")
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
