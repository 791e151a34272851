"""``propscope review SPEC`` (a review, or with ``--shard I/N`` one shard of it) and
``propscope review merge PARTIAL...`` (docs/review.md). Registered on the main app by cli.py;
uses its options and failures.

``review`` is a group whose default command is ``run``: ``propscope review SPEC`` is
``propscope review run SPEC``, so the command people and CI jobs already type keeps working.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
from typer.core import TyperGroup

from propscope import cli

if TYPE_CHECKING:  # typer carries its own click; the click distribution is not a dependency
    from typer._click import Context, HelpFormatter

__all__ = ["review_app"]

logger = logging.getLogger(__name__)

# The command `propscope review ARGS` runs when ARGS does not start with a command's name.
DEFAULT_COMMAND = "run"


class _DefaultCommandGroup(TyperGroup):
    """A group that runs ``DEFAULT_COMMAND`` when the first argument names no command."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: Context, formatter: HelpFormatter) -> None:
        """Both forms: click's own usage (COMMAND [ARGS]) hides that SPEC alone runs a review."""
        formatter.write_usage(ctx.command_path, "[run] SPEC [OPTIONS] [--shard I/N]")
        formatter.write_usage(ctx.command_path, "merge PARTIAL... [OPTIONS]", prefix="       ")


review_app = typer.Typer(
    name="review",
    cls=_DefaultCommandGroup,
    rich_markup_mode=None,
    help=(
        "Gate a candidate model on a review spec's rules (CI).\n\n"
        "propscope review SPEC runs the review of SPEC (the run command). With --shard I/N "
        "it explains only the images at positions P with P % N == I and writes "
        "review-partial.json; propscope review merge then merges the N partials into the "
        "reports, verdict and exit code one run gives. See docs/review.md."
    ),
)

OutOption = Annotated[
    Path,
    typer.Option(
        "--out", "-o", file_okay=False, help="Folder for review.{md,html,json} and junit.xml."
    ),
]


def _shard(value: str | None) -> Any:
    """--shard's Shard (Any: the review package is imported on use, as the review extra
    provides it)."""
    if value is None:
        return None
    try:
        return cli._review_package().Shard.parse(value)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="'--shard'") from None


@review_app.command(
    DEFAULT_COMMAND, short_help="Review SPEC, or one shard of it (the default command)."
)
def run(
    context: typer.Context,
    spec_file: Annotated[
        Path, typer.Argument(metavar="SPEC", help="The review spec (YAML), see docs/review.md.")
    ],
    out: OutOption = Path("propscope-review"),
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            metavar="HOST:PORT",
            envvar=cli.TARGET_ENVVAR,
            help=f"Gateway address (default: ${cli.TARGET_ENVVAR}, else the spec's "
            "service.target); several: IP:PORT,IP:PORT or dns:///NAME:PORT.",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Explanations in flight (default: the spec's)."),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="I/N",
            help="Explain only shard I of N (0 <= I < N, the images at positions P with "
            "P % N == I) and write OUT/review-partial.json instead of the reports; exit 0 "
            "once written. I is 0-based, as a Kubernetes Indexed Job's JOB_COMPLETION_INDEX.",
            show_default=False,
        ),
    ] = None,
    progress: cli.ProgressOption = None,
) -> None:
    """Check a candidate model (against a baseline) by the rules of SPEC over its image set.

    Exit code 0: no rule failed (inconclusive ones are reported apart), or with --shard the
    partial was written; 1: a rule failed; 2: the review could not run; 4: a rule was
    inconclusive and the spec sets fail_on_inconclusive."""
    chosen = _shard(shard)
    _exit_with(
        lambda: _run_review(context.obj, spec_file, out, target, concurrency, progress, chosen)
    )


@review_app.command(
    "merge", short_help="Merge the partial results of a sharded review into its reports."
)
def merge(
    partials: Annotated[
        list[Path],
        typer.Argument(
            metavar="PARTIAL",
            help="Every shard's review-partial.json (or the --out folder holding it).",
        ),
    ],
    out: OutOption = Path("propscope-review"),
) -> None:
    """Merge the partials of every shard of one review (propscope review SPEC --shard I/N)
    into the reports, verdict and exit code one unsharded run gives: the rules are checked on
    the merged observations. Refused (exit 2, naming why) when a shard is missing or given
    twice, images overlap or are missing, or the partials differ in spec, shard count, model
    versions or service settings.

    Exit code 0: no rule failed; 1: a rule failed; 2: the partials cannot be merged; 4: a rule
    was inconclusive and the spec sets fail_on_inconclusive."""
    _exit_with(lambda: _merge(partials, out))


def _exit_with(work: Callable[[], int]) -> None:
    """Runs ``work``; exits with its code, and 2 on an unexpected error (never 1)."""
    try:
        exit_code = work()
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as error:
        # Exit code 1 means "a rule failed": a bug must not pass for a verdict on the model.
        logger.debug("the review failed", exc_info=True)
        cli._fail(
            f"the review failed unexpectedly: {type(error).__name__}: {error} (-v shows where)"
        )
    if exit_code:
        raise typer.Exit(exit_code)


def _run_review(
    connection: cli.Connection,
    spec_file: Path,
    out: Path,
    target: str | None,
    concurrency: int | None,
    progress: bool | None,
    shard: Any,
) -> int:
    """Runs the review (or one shard of it) and writes its reports (or its partial); the exit
    code of its verdict (0 for a shard)."""
    review_package = cli._review_package()
    try:
        spec, images = review_package.load_spec(spec_file)
    except review_package.SpecError as error:
        cli._fail_lines(_spec_problems(connection, error, target))
    if concurrency is not None:
        spec = spec.model_copy(update={"concurrency": concurrency})
    address = target or spec.service.target
    show_bar = cli._show_bar(progress)
    share = f"shard {shard}: {len(shard.select(images))} of " if shard is not None else ""
    models = 1 + (spec.baseline is not None)
    typer.echo(
        f"propscope review: {share}{_counted(len(images), 'image')}, "
        f"{_counted(len(spec.properties), 'property', 'properties')}, "
        f"{_counted(models, 'model')}, {address}",
        err=True,
    )
    try:
        with (
            connection.client(address, spec.service.timeout_s) as client,
            _review_progress(show_bar) as report,
        ):
            if shard is not None:
                partial = review_package.run_shard(spec, images, client, shard, on_progress=report)
            else:
                result = review_package.run_review(spec, images, client, on_progress=report)
    except review_package.ReviewError as error:
        if error.problems:
            cli._fail_lines(str(error))
        cli._fail(f"{error}{cli._unreachable_hint(error, address)}")
    except KeyboardInterrupt:
        raise typer.Exit(cli.EXIT_INTERRUPTED) from None
    if shard is None:
        return _write_reports(result, out)
    try:
        path = partial.write(out)
    except OSError as error:
        cli._fail(f"cannot write the partial result to {str(out)!r}: {error.strerror or error}")
    typer.echo(
        f"propscope review: shard {shard} done in {partial.seconds:.0f} s; partial result in "
        f"{path} (merge every shard's with: propscope review merge PARTIAL... --out DIR)",
        err=True,
    )
    return 0


def _merge(partials: list[Path], out: Path) -> int:
    """Merges the partials and writes the reports; the exit code of the merged verdict."""
    review_package = cli._review_package()
    files = [path / review_package.PARTIAL_FILE if path.is_dir() else path for path in partials]
    try:
        found = [review_package.read_partial(path) for path in files]
        result = review_package.merge_partials(found, names=[str(path) for path in files])
    except review_package.MergeError as error:
        cli._fail(f"cannot merge the partial results: {error}")
    typer.echo(
        f"propscope review: merged {len(found)} shards, {len(result.images)} images", err=True
    )
    return _write_reports(result, out)


def _write_reports(result: Any, out: Path) -> int:
    """Writes the reports, prints the Markdown; the exit code of the verdict."""
    try:
        paths = cli._review_package().write_reports(result, out)
    except OSError as error:
        cli._fail(f"cannot write the reports to {str(out)!r}: {error.strerror or error}")
    sys.stdout.write(paths["markdown"].read_text(encoding="utf-8"))
    verdict = {"passed": "passed", "failed": "FAILED", "inconclusive": "INCONCLUSIVE"}
    typer.echo(
        f"propscope review: {verdict[result.verdict]} in {result.seconds:.0f} s; "
        f"reports in {out}/ ({', '.join(path.name for path in paths.values())})",
        err=True,
    )
    if result.failures:
        return cli.EXIT_RULE_FAILED
    return 0 if result.gate_passed else cli.EXIT_INCONCLUSIVE


def _spec_problems(connection: cli.Connection, error: Any, target: str | None) -> str:
    """The spec's problems, then what the service would refuse of its sections that are valid
    on their own: one run names them all."""
    review_package = cli._review_package()
    problems, note = list(error.problems), ""
    if error.checks is not None:
        address = target or error.checks.target
        try:
            with connection.client(address, error.checks.timeout_s) as client:
                problems += review_package.service_problems(client, error.checks)
        except review_package.ReviewError as unreachable:
            hint = cli._unreachable_hint(unreachable, address)
            note = f"\nmodels, editors and settings not checked: {unreachable}{hint}"
    return f"{review_package.SpecError(problems, file=error.file)}{note}"


# What the review's progress counts, per stage of ``ReviewProgress``.
_REVIEW_STAGES = {
    "explain": "explanations",
    "attribute": "attribution maps",
    "interactions": "interaction estimates",
}


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


def _counted(count: int, word: str, plural: str = "") -> str:
    """`1 model`, `2 models`: a review of one model read `1 models` in every CI log."""
    return f"{count} {word if count == 1 else plural or word + 's'}"
