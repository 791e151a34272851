"""``propscope consistency``: MeGe and ReCo of explainers across models from the command line
(docs/consistency.md). Registered on the main app by cli.py; uses its options and failures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from propscope import cli
from propscope._attribution import AttributionProgress
from propscope._cli_layout import Column, number, print_rows
from propscope._cli_output import OutputFormat, plain_line, stdout_console
from propscope._consistency import EXPLAINERS, ConsistencyResult
from propscope._errors import PropscopeError

__all__ = ["consistency"]

COLUMNS = (
    Column("explainer"),
    Column("MeGe", numeric=True),
    Column("ReCo", numeric=True),
    Column("d agree", numeric=True),
    Column("d disagree", numeric=True),
    Column("pairs =/≠", numeric=True),
)


def consistency(
    context: typer.Context,
    images: Annotated[
        list[Path],
        typer.Argument(metavar="IMAGE", help="Images (PNG or JPEG) or folders of them."),
    ],
    models: Annotated[
        list[str],
        typer.Option(
            "--model",
            "-m",
            metavar="NAME[:VERSION]",
            help="A model to compare, repeatable (at least 2), e.g. synth_patch_folds:1.",
        ),
    ],
    explainers: Annotated[
        list[str] | None,
        typer.Option(
            "--explainer",
            "-e",
            help=f"Repeatable: {', '.join(EXPLAINERS)} (default: every one the models serve).",
            show_default=False,
        ),
    ] = None,
    labels: Annotated[
        str,
        typer.Option(
            metavar="C,C,...",
            help="The true class of each image, in order (default: the predictions decide).",
        ),
    ] = "",
    sobol_nb_design: Annotated[
        int, typer.Option(min=0, help="Sobol's N, a power of two (0: 32).")
    ] = 0,
    rise_samples: Annotated[int, typer.Option(min=0, help="RISE's masks (0: 4000).")] = 0,
    seed: Annotated[int, typer.Option(min=0, help="Seeds RISE and the random explainer.")] = 0,
    target: cli.TargetOption = cli.DEFAULT_TARGET,
    progress: cli.ProgressOption = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", help="table, plain or json.")
    ] = OutputFormat.TABLE,
    timeout: cli.TimeoutOption = None,
) -> None:
    """How stable each explainer's maps of IMAGE... are across --model... (MeGe, ReCo;
    Fel et al., WACV 2022). MeGe = 1 / (1 + mean distance of maps where two models
    agree), ReCo = how well one distance threshold tells agreeing pairs from
    disagreeing ones; n/a where no such pair exists (the warnings say why).

    \b
    Examples:
      propscope consistency imgs/ -m synth_patch_folds:1 -m synth_patch_folds:2 \\
          -m synth_patch_folds:3 -m synth_patch_folds:4
      propscope consistency a.png b.png -m synth_patch -m synth_hue -e sobol -e random
    """
    encoded = cli._reference_images(images, option="IMAGE")
    try:
        label_values = [int(v) for v in labels.split(",")] if labels else None
    except ValueError:
        cli._fail(f"--labels {labels!r}: write class indices separated by commas, e.g. 0,1,1")
    try:
        with context.obj.client(target, timeout) as client:
            with cli._attribution_progress(cli._show_bar(progress), "passes") as report:
                result = client.evaluate_consistency(
                    encoded,
                    models,
                    explainers=explainers or (),
                    labels=label_values,
                    sobol_nb_design=sobol_nb_design,
                    rise_samples=rise_samples,
                    seed=seed,
                    on_progress=lambda update: report(
                        AttributionProgress(update.request_id, update.done, update.planned)
                    ),
                )
    except PropscopeError as error:
        cli._call_failed(target, error, context)
    except (ValueError, TypeError) as error:
        cli._fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(cli.EXIT_INTERRUPTED) from None
    print_consistency(result, output_format)


def print_consistency(result: ConsistencyResult, output_format: OutputFormat) -> None:
    if output_format == OutputFormat.JSON:
        typer.echo(result.to_json(indent=None))
        return
    if output_format == OutputFormat.PLAIN:
        for row in result.explainers:
            plain_line(
                "explainer",
                [
                    ("name", row.explainer),
                    ("mege", row.mege),
                    ("reco", row.reco),
                    ("agreeing_pairs", row.agreeing_pairs),
                    ("disagreeing_pairs", row.disagreeing_pairs),
                ],
            )
        return
    models = ", ".join(f"{m.name}:{m.version}" for m in result.models)
    rows = [
        [
            row.explainer,
            number(row.mege),
            number(row.reco),
            number(row.mean_distance_agreeing),
            number(row.mean_distance_disagreeing),
            f"{row.agreeing_pairs}/{row.disagreeing_pairs}",
        ]
        for row in result.explainers
    ]
    console = stdout_console()
    # Its own line, wrapped at the console's width (a table's title wraps at the table's).
    console.print(
        Text(f"propscope consistency: {models}, {result.image_count} images", style="bold")
    )
    print_rows(console, "", COLUMNS, rows)
    console.print(
        f"{result.passes} passes, {result.total_s:.1f} s (request {result.request_id})",
        soft_wrap=True,
    )
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for row in result.explainers:
        for warning in row.warnings:
            typer.echo(f"warning: {row.explainer}: {warning}", err=True)
