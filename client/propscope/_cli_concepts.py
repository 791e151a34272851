"""``propscope concepts fit|show|map``: CRAFT concept banks from the command line
(docs/concepts.md). Registered on the main app by cli.py; uses its options and failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from PIL import Image

from propscope import cli
from propscope._attribution import AttributionProgress
from propscope._cli_layout import Column, number, print_rows
from propscope._cli_output import OutputFormat, plain_line, stdout_console
from propscope._concepts import ConceptBank, ConceptMaps
from propscope._errors import PropscopeError

__all__ = ["concepts_app"]

concepts_app = typer.Typer(
    name="concepts",
    no_args_is_help=True,
    help="CRAFT concepts of an open model's class: fit a bank, show it, map an image.",
    rich_markup_mode=None,
)

CONCEPT_COLUMNS = (
    Column("concept"),
    Column("importance", numeric=True),
    Column("logit share", numeric=True),
    Column("mean u", numeric=True),
    Column("top crops (image@left,top)", wraps=True),
)
ConceptsFormatOption = Annotated[
    OutputFormat,
    typer.Option(
        "--format",
        help="table: the concepts ranked by importance; plain: one key=value line per concept "
        "then a `bank` line; json: the ConceptBank (crops as their byte counts).",
    ),
]
CropsOption = Annotated[
    Path | None,
    typer.Option(
        "--crops", file_okay=False, help="Write each concept's top crops as PNGs into this folder."
    ),
]


def _calling(context: typer.Context, target: str, timeout: float | None, call: Callable) -> Any:
    """The SDK call with the CLI's failures (exit 2 with the server's words)."""
    try:
        with context.obj.client(target, timeout) as client:
            return call(client)
    except PropscopeError as error:
        cli._call_failed(target, error, context)
    except ValueError as error:
        cli._fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(cli.EXIT_INTERRUPTED) from None


@concepts_app.command("fit", short_help="Fit a concept bank on a class's images.")
def fit(
    context: typer.Context,
    images: Annotated[
        list[Path], typer.Argument(metavar="IMAGE", help="The class's images (PNG or JPEG).")
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="An open classifier.")],
    version: Annotated[str, typer.Option("--version", help="Its version (default: latest).")] = "",
    target_class: Annotated[
        int | None,
        typer.Option(min=0, help="The class (default: the one most images are predicted as)."),
    ] = None,
    layer: Annotated[
        str, typer.Option(help="The layer g ends at (default: the last declared one).")
    ] = "",
    rank: Annotated[int, typer.Option(min=0, help="Concepts (0: 10).")] = 0,
    patch_size: Annotated[
        int, typer.Option(min=0, help="Crop side in pixels (0: 0.3 of the shorter side).")
    ] = 0,
    nb_design: Annotated[
        int, typer.Option(min=0, help="Sobol design size, a power of two (0: 32).")
    ] = 0,
    top_crops: Annotated[int, typer.Option(min=0, help="Crops shown per concept (0: 6).")] = 0,
    seed: Annotated[int, typer.Option(min=0, help="Seeds NMF and the Sobol design.")] = 0,
    crops: CropsOption = None,
    target: cli.TargetOption = cli.DEFAULT_TARGET,
    progress: cli.ProgressOption = None,
    output_format: ConceptsFormatOption = OutputFormat.TABLE,
    timeout: cli.TimeoutOption = None,
) -> None:
    """Fit CRAFT concepts of --model's class on IMAGE... and store the bank.

    \b
    Examples:
      propscope concepts fit squares/*.png -m synth_patch --target-class 1
      propscope concepts fit imgs/*.png -m synth_hue --rank 6 --crops crops/
    """
    encoded = cli._graph_images(images)

    def call(client: Any) -> ConceptBank:
        with cli._attribution_progress(cli._show_bar(progress), "concept passes") as report:
            return client.fit_concepts(
                encoded,
                model,
                target_class=target_class,
                layer=layer,
                rank=rank,
                patch_size=patch_size,
                nb_design=nb_design,
                top_crops=top_crops,
                seed=seed,
                model_version=version,
                on_progress=lambda update: report(
                    AttributionProgress(update.request_id, update.passes_done, update.passes_total)
                ),
            )

    bank = _calling(context, target, timeout, call)
    _write_crops(bank, crops)
    print_bank(bank, output_format)


@concepts_app.command("show", short_help="Show a stored concept bank.")
def show(
    context: typer.Context,
    bank_id: Annotated[str, typer.Argument(help="The id `concepts fit` printed.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Check the bank against this model's version.")
    ] = "",
    version: Annotated[str, typer.Option("--version", help="That model's version.")] = "",
    crops: CropsOption = None,
    target: cli.TargetOption = cli.DEFAULT_TARGET,
    output_format: ConceptsFormatOption = OutputFormat.TABLE,
    timeout: cli.TimeoutOption = None,
) -> None:
    """Show the stored bank BANK_ID (refused as stale when --model's version is not its own)."""
    bank = _calling(
        context,
        target,
        timeout,
        lambda client: client.concept_bank(bank_id, model=model, model_version=version),
    )
    _write_crops(bank, crops)
    print_bank(bank, output_format)


@concepts_app.command("map", short_help="An image's concept maps.")
def concept_map(
    context: typer.Context,
    image: Annotated[Path, typer.Argument(help="The image (PNG or JPEG).")],
    bank_id: Annotated[str, typer.Option("--bank", help="The bank's id.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", dir_okay=False, help="Write the maps as JSON (values per pixel)."
        ),
    ] = None,
    png_prefix: Annotated[
        str | None,
        typer.Option(
            "--png", metavar="PREFIX", help="Write each map as PREFIX<concept>.png (grey levels)."
        ),
    ] = None,
    target: cli.TargetOption = cli.DEFAULT_TARGET,
    timeout: cli.TimeoutOption = None,
) -> None:
    """IMAGE's coefficient of each concept of --bank per position, resized to the image."""
    encoded = cli._graph_images([image])[0]
    maps: ConceptMaps = _calling(
        context, target, timeout, lambda client: client.concept_maps(encoded, bank_id)
    )
    for one in maps.maps:
        values = np.asarray(one.values)
        plain_line(
            "map",
            [
                ("concept", one.concept),
                ("max", number(float(values.max()))),
                ("mean", number(float(values.mean()))),
            ],
        )
        if png_prefix is not None:
            scaled = values / values.max() if values.max() > 0 else values
            path = Path(f"{png_prefix}{one.concept}.png")
            Image.fromarray((np.clip(scaled, 0, 1) * 255).astype(np.uint8)).save(path)
            typer.echo(f"propscope: wrote {path}", err=True)
    if output is not None:
        output.write_text(maps.to_json(), encoding="utf-8")
        typer.echo(f"propscope: wrote {output}", err=True)


def _write_crops(bank: ConceptBank, folder: Path | None) -> None:
    if folder is not None:
        written = bank.write_crops(str(folder))
        typer.echo(f"propscope: wrote {len(written)} crops into {folder}", err=True)


def print_bank(bank: ConceptBank, output_format: OutputFormat) -> None:
    if output_format is OutputFormat.JSON:
        typer.echo(bank.to_json())
        return
    if output_format is OutputFormat.PLAIN:
        for concept in bank.concepts:
            plain_line(
                "concept",
                [
                    ("index", concept.index),
                    ("importance", number(concept.sobol_total_importance)),
                    ("logit_share", number(concept.logit_share)),
                    ("mean_coefficient", number(concept.mean_coefficient)),
                ],
            )
        for warning in bank.warnings:
            plain_line("warning", [("message", warning)])
        plain_line("bank", _summary(bank))
        return
    console = stdout_console()
    label = f" ({bank.target_label})" if bank.target_label else ""
    rows = [
        [
            str(concept.index),
            number(concept.sobol_total_importance),
            number(concept.logit_share),
            number(concept.mean_coefficient),
            " ".join(f"{c.image}@{c.left},{c.top}" for c in concept.top_crops),
        ]
        for concept in bank.concepts
    ]
    print_rows(
        console,
        f"concepts of {bank.model} (version {bank.model_version}), class {bank.target_class}"
        f"{label}, layer {bank.layer}",
        CONCEPT_COLUMNS,
        rows,
    )
    for warning in bank.warnings:
        console.print(f"warning: {warning}")
    console.print(" ".join(f"{key}={value}" for key, value in _summary(bank)))


def _summary(bank: ConceptBank) -> list[tuple[str, object]]:
    return [
        ("bank_id", bank.bank_id),
        ("rank", bank.rank),
        ("images", bank.images),
        ("crops", bank.crops),
        ("reconstruction_error", number(bank.reconstruction_error)),
        ("logit_share_exact", str(bank.logit_share_exact).lower()),
        ("g_passes", bank.g_passes),
        ("h_passes", bank.h_passes),
        ("ms", number(bank.total_ms)),
    ]
