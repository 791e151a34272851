"""``propscope interactions``: Sobol indices over semantic interventions from the command line
(docs/interactions.md). Registered on the main app by cli.py; uses its options, --property
syntax and failures.

The table has one row per property: first-order index, total-order index and their difference
(the property's share in interactions), each with its bootstrap interval, two decimals (JSON
and plain lines carry every digit); then the interaction share, the pair's second-order index
and what the estimate cost, on lines of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from propscope import cli
from propscope._attribution import TARGET_SCORES, AttributionProgress
from propscope._cli_layout import Column, print_rows
from propscope._cli_output import OutputFormat, in_cli_terms, plain_line, stdout_console
from propscope._errors import PropscopeError
from propscope._interactions import (
    InteractionsProgress,
    InteractionsResult,
    Interval,
    check_design_size,
)
from propscope._preflight import INTERACTIONS_METHOD, Classifier, PreflightError, preflight
from propscope._properties import parse_property

__all__ = ["interactions", "interval_text", "print_interactions", "warning_text"]

COLUMNS = (
    Column("property"),
    Column("first", numeric=True),
    Column("interval", numeric=True, label="±"),
    Column("total", numeric=True),
    Column("interval", numeric=True, label="±"),
    Column("interaction", numeric=True),
    Column("interval", numeric=True, label="±"),
)


def interactions(
    context: typer.Context,
    image: Annotated[
        Path,
        typer.Argument(metavar="IMAGE", help="The image: PNG or JPEG (others become PNG)."),
    ],
    models: Annotated[
        list[str],
        typer.Option(
            "--model",
            "-m",
            metavar="NAME[:VERSION]",
            help="Classifier (repeat for several: the second reuses every composed image "
            "from the cache).",
            show_default=False,
        ),
    ],
    property_specs: Annotated[
        list[str],
        typer.Option(
            "--property",
            "-p",
            metavar="SPEC",
            help="An editor property (explain's syntax: NAME=EDITOR[:key=value,...][;REGION]); "
            "at least two; they compose in the order given.",
            show_default=False,
        ),
    ],
    pair: Annotated[
        str | None,
        typer.Option(
            metavar="A,B",
            help="Also the second-order index of these two properties (N more images).",
            show_default=False,
        ),
    ] = None,
    design_size: Annotated[
        int,
        typer.Option(min=0, help="N, a power of two: N (P + 2) edited images (0: 32)."),
    ] = 0,
    bootstrap: Annotated[
        int, typer.Option(min=0, help="Bootstrap resamples of the intervals (0: 1000).")
    ] = 0,
    confidence: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Interval level in (0, 1) (0: 0.95).")
    ] = 0.0,
    target_score: Annotated[
        str,
        typer.Option(
            metavar="|".join(TARGET_SCORES),
            help="What is decomposed (auto: the target class's probability).",
        ),
    ] = "auto",
    target_class: cli.TargetClassOption = None,
    mean: cli.MeanOption = None,
    std: cli.StdOption = None,
    output_kind: cli.OutputKindOption = None,
    resize: cli.ResizeOption = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Seeds the design, the editors and the bootstrap.")
    ] = 0,
    target: cli.TargetOption = cli.DEFAULT_TARGET,
    output_format: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            help="table: a table when it fits the terminal, else a block per property; "
            "plain: one key=value line per property, then share, pair and cost lines; "
            "json: one InteractionsResult object per model.",
        ),
    ] = OutputFormat.TABLE,
    as_json: cli.JsonOption = False,
    progress: cli.ProgressOption = None,
    report: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            help="Also write an HTML report (first vs total order per property, with "
            "intervals) to this file.",
            show_default=False,
        ),
    ] = None,
    timeout: cli.TimeoutOption = None,
) -> None:
    """Which properties --model uses alone, and which together, on IMAGE: Sobol
    first- and total-order indices over the --property strengths (each design
    point's image is every property's edit in turn, in the order given), with
    bootstrap intervals. total - first is a property's share in interactions;
    their sum, the interaction share, is significant when its interval lies above 0.

    \b
    Examples:
      propscope interactions scene.png -m synth_conjunction \\
          -p 'hue=procedural:operation=hue,region=object' \\
          -p 'patch=procedural:operation=blend' --pair hue,patch
      propscope interactions scene.png -m synth_hue -m synth_conjunction \\
          -p 'hue=procedural:operation=hue' -p 'patch=procedural:operation=blend' \\
          --design-size 16 --format plain
    """
    try:
        properties = [parse_property(spec) for spec in property_specs]
    except ValueError as error:
        cli._fail(str(error))
    pair_names = _pair_option(pair)
    try:
        check_design_size(design_size)
    except ValueError as error:
        cli._fail(str(error).replace("design_size", "--design-size", 1))
    try:
        preprocessing = cli._preprocessing_option(mean, std, output_kind, resize)
    except ValueError as error:
        cli._fail(str(error))
    output_format = OutputFormat.JSON if as_json else output_format
    image_bytes = cli._read_image_option(image)
    if report is not None:
        cli._review_package()  # the review extra renders it: say it is missing before any work
    classifiers = [Classifier.parse(text) for text in dict.fromkeys(models)]
    results: list[InteractionsResult] = []
    try:
        with context.obj.client(target, timeout) as client:
            preflight(
                client,
                classifiers=[
                    Classifier(c.name, c.version, (INTERACTIONS_METHOD,)) for c in classifiers
                ],
                properties=properties,
            )
            for classifier in classifiers:
                with cli._attribution_progress(
                    cli._show_bar(progress) and output_format is OutputFormat.TABLE,
                    "edits and passes",
                ) as report_progress:
                    results.append(
                        client.interactions(
                            image_bytes,
                            classifier.name,
                            properties,
                            model_version=classifier.version,
                            design_size=design_size,
                            pair=pair_names,
                            bootstrap=bootstrap,
                            confidence=confidence,
                            target_score=target_score,
                            target_class=target_class,
                            seed=seed,
                            preprocessing=preprocessing,
                            on_progress=_stages(report_progress),
                        )
                    )
                print_interactions(results[-1], output_format)
    except PreflightError as error:
        cli._fail_lines(f"{target}: {error}")
    except PropscopeError as error:
        cli._call_failed(target, error, context)
    except (ValueError, TypeError) as error:
        cli._fail(_in_option_terms(str(error)))
    except KeyboardInterrupt:
        raise typer.Exit(cli.EXIT_INTERRUPTED) from None
    if report is not None:
        _write_report(report, str(image), target, results)


def _pair_option(pair: str | None) -> tuple[str, str] | None:
    if pair is None:
        return None
    names = [name.strip() for name in pair.split(",")]
    if len(names) != 2 or not all(names):
        cli._fail(f"--pair {pair!r}: give two property names separated by a comma, e.g. hue,patch")
    return names[0], names[1]


# The SDK's refusals name its arguments; the command line's user sets them with these options.
_SDK_ARGUMENTS = (
    ("pair:", "--pair:"),
    ("confidence must", "--confidence must"),
    ("target_score must be one of ", "--target-score must be one of auto, "),
)


def _in_option_terms(message: str) -> str:
    for argument, option in _SDK_ARGUMENTS:
        if message.startswith(argument):
            return option + message[len(argument) :]
    return message


def _stages(
    report: Callable[[AttributionProgress], None],
) -> Callable[[InteractionsProgress], None]:
    """The gateway's edit and classify stages as one count: done of the totals announced so
    far (classify's total joins once its first progress comes)."""
    totals: dict[str, int] = {}
    done: dict[str, int] = {}

    def update(progress: InteractionsProgress) -> None:
        totals[progress.stage] = progress.total
        done[progress.stage] = progress.completed
        report(AttributionProgress(progress.request_id, sum(done.values()), sum(totals.values())))

    return update


def interval_text(interval: Interval) -> str:
    """``low–high`` with two decimals: the table's interval cells."""
    return f"{interval.low:.2f}–{interval.high:.2f}"


def _value(interval: Interval) -> str:
    return f"{interval.value:.2f}"


def print_interactions(result: InteractionsResult, output_format: OutputFormat) -> None:
    """One model's result: a JSON object, plain key=value lines, or the table and its lines."""
    model = f"{result.model}:{result.model_version}" if result.model_version else result.model
    if output_format is OutputFormat.JSON:
        typer.echo(result.to_json())
        return
    if output_format is OutputFormat.PLAIN:
        for item in result.indices:
            plain_line(
                "property",
                [
                    ("model", model),
                    ("name", item.name),
                    ("first", item.first_order.value),
                    ("first_low", item.first_order.low),
                    ("first_high", item.first_order.high),
                    ("total", item.total_order.value),
                    ("total_low", item.total_order.low),
                    ("total_high", item.total_order.high),
                    ("interaction", item.interaction.value),
                    ("interaction_low", item.interaction.low),
                    ("interaction_high", item.interaction.high),
                ],
            )
        share = result.interaction_share
        plain_line(
            "share",
            [
                ("model", model),
                ("value", share.value),
                ("low", share.low),
                ("high", share.high),
                ("significant", result.interaction_significant),
                ("negligible_variance", result.negligible_variance),
                ("variance", result.variance),
                ("mean", result.mean),
            ],
        )
        if result.second_order is not None:
            index = result.second_order.index
            plain_line(
                "pair",
                [
                    ("model", model),
                    ("a", result.second_order.properties[0]),
                    ("b", result.second_order.properties[1]),
                    ("value", index.value),
                    ("low", index.low),
                    ("high", index.high),
                ],
            )
        plain_line("cost", [("model", model), *_cost_pairs(result)])
        _warnings(result)
        return
    console = stdout_console()
    level = f"{result.confidence:.0%}" if result.confidence else "95%"
    console.print(Text(f"propscope interactions: {model}", style="bold"))
    console.print(f"{_target(result)}; N {result.design_size}; {level} intervals")
    rows = [
        [
            item.name,
            _value(item.first_order),
            interval_text(item.first_order),
            _value(item.total_order),
            interval_text(item.total_order),
            _value(item.interaction),
            interval_text(item.interaction),
        ]
        for item in result.indices
    ]
    print_rows(console, "", COLUMNS, rows)
    share = result.interaction_share
    heading = Text(f"interaction share {_value(share)} ({interval_text(share)}):")
    if result.negligible_variance:
        # Its own line: the variance is what to read, and the line stays within 80 columns.
        console.print(heading)
        console.print(Text("  " + result.share_verdict, style="yellow"))
    else:
        style = "bold yellow" if result.interaction_significant else "dim"
        console.print(heading + " " + Text(result.share_verdict, style=style))
    if result.second_order is not None:
        a, b = result.second_order.properties
        index = result.second_order.index
        console.print(f"second order {a} × {b}: {_value(index)} ({interval_text(index)})")
    console.print(
        f"composed {' → '.join(result.composition_order)}; score variance {result.variance:.3g}, "
        f"mean {result.mean:.3g}"
    )
    console.print("cost: " + ", ".join(f"{k} {v}" for k, v in _cost_pairs(result)))
    _warnings(result)


def _target(result: InteractionsResult) -> str:
    name = f" ({result.target_label})" if result.target_label else ""
    return f"{result.target_score} of class {result.target_class}{name}"


def _cost_pairs(result: InteractionsResult) -> list[tuple[str, object]]:
    return [
        ("images", result.planned_images),
        ("edits", result.edits),
        ("forward_passes", result.forward_passes),
        ("cache_hits", result.cache_hits),
        ("cache_misses", result.cache_misses),
    ]


def warning_text(warning: str) -> str:
    """A gateway warning with the request fields an option sets spelt as the option (the
    interval warnings advise a larger design_size)."""
    return in_cli_terms(warning).replace("design_size", "--design-size")


def _warnings(result: InteractionsResult) -> None:
    for warning in result.warnings:
        typer.echo(f"warning: {result.model}: {warning_text(warning)}", err=True)


def _write_report(report: Path, image: str, target: str, results: list[InteractionsResult]) -> None:
    review_package = cli._review_package()
    html = review_package.render_interactions_html(image, target, results)
    try:
        report.write_text(html, encoding="utf-8")
    except OSError as error:
        cli._fail(f"cannot write the report {str(report)!r}: {error.strerror or error}")
    typer.echo(f"propscope: report written to {report}", err=True)
