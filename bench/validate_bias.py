"""The paper's Table 1 on the synthetic world, through the running service.

Explains held-out images (unbiased world, no patch) with each synthetic
classifier for four properties, on fixed paths of N = 100 and again on adaptive
paths at the service's default settings, and writes docs/results/bias_table.{md,json}
with the pass/fail checks of the expected pattern and of the adaptive paths'
agreement with the fixed ones. Exit code 1 if a check fails.

    make validate     # or, with the stack up: .venv/bin/python bench/validate_bias.py
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import typer

import propscope
from propscope_dev.validation import bias_table
from propscope_dev.validation.runner import (
    ALPHA,
    PERMUTATIONS,
    SHORTCUTS,
    explain_all,
    held_out_images,
)
from propscope_dev.validation.tables import (
    Check,
    checks_markdown,
    markdown_table,
    percent,
    write_results,
)
from propscope_server.scoring.property_gradient import DEFAULT_MIN_PROBABILITY_CHANGE

app = typer.Typer(add_completion=False)
# The targets for adaptive paths against the fixed reference.
MIN_AGREEMENT = 0.99
MIN_EDIT_RATIO = 2.0


def agreement_section(
    reference: list, adaptive: list, reference_steps: int, informational: bool
) -> tuple[str, dict, list[Check]]:
    """How often adaptive paths decide as the fixed reference does, what they cost,
    and every image where they do not."""
    models = list(SHORTCUTS)
    per_cell = bias_table.agreement(reference, adaptive, models)
    summary = bias_table.summarise(reference, adaptive)
    differing = bias_table.disagreements(reference, adaptive)
    checks = [
        Check(
            f"adaptive vs fixed N = {reference_steps}: decisions agree",
            f">= {percent(MIN_AGREEMENT)} of {summary.images} image x property results",
            f"{100 * summary.decision_agreement:.2f}% (relevant yes/no: "
            f"{100 * summary.relevant_agreement:.2f}%)",
            summary.decision_agreement >= MIN_AGREEMENT,
        ),
        Check(
            "adaptive vs fixed: edits saved",
            f">= {MIN_EDIT_RATIO:g}x fewer edited images on average",
            f"{summary.edit_ratio:.2f}x ({summary.mean_edits_reference:.1f} vs "
            f"{summary.mean_edits_adaptive:.2f} per result)",
            summary.edit_ratio >= MIN_EDIT_RATIO,
        ),
    ]
    rows = [
        (
            d.model,
            d.property_name,
            d.image_index,
            f"{d.reference_decision} (p = {d.reference_p_value:.2g})",
            f"{d.adaptive_decision} (p = {d.adaptive_p_value:.2g}, N = {d.adaptive_steps})",
            f"{d.reference_probability_change:.3g}",
        )
        for d in differing
    ]
    parts = [
        bias_table.agreement_markdown(per_cell),
        checks_markdown(checks, informational=informational),
    ]
    if rows:
        parts += [
            f"The {len(rows)} results whose decisions differ:",
            markdown_table(
                (
                    "model",
                    "property",
                    "image",
                    f"fixed N = {reference_steps}",
                    "adaptive",
                    "Δp (max−min)",
                ),
                rows,
            ),
        ]
    data = {"cells": per_cell, "summary": summary, "disagreements": differing}
    return "\n\n".join(parts), data, checks


@app.command()
def main(
    target: str = typer.Option("localhost:50051", help="The gateway."),
    per_class: int = typer.Option(50, help="Test images per class."),
    reference_steps: int = typer.Option(
        100, help="N of the fixed reference paths (the bias table's own figures)."
    ),
    adaptive_steps: int = typer.Option(
        10, help="Starting N of the adaptive paths (max_steps: the service's default)."
    ),
    workers: int = typer.Option(4, help="Requests in flight."),
    out: Path = typer.Option(Path("docs/results"), help="Where the tables go."),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    tables, agreements, timings = {}, {}, {}
    with propscope.Client(target, timeout=600) as client:
        for hues in ("trained", "uniform"):
            images, _ = held_out_images(per_class, hues=hues)
            clock = time.monotonic()
            reference = explain_all(
                client, images, SHORTCUTS, steps=reference_steps, workers=workers
            )
            middle = time.monotonic()
            adaptive = explain_all(
                client,
                images,
                SHORTCUTS,
                steps=adaptive_steps,
                workers=workers,
                path_mode="adaptive",
            )
            timings[hues] = {"fixed_s": middle - clock, "adaptive_s": time.monotonic() - middle}
            tables[hues] = {
                "fixed": bias_table.cells(reference, list(SHORTCUTS)),
                "adaptive": bias_table.cells(adaptive, list(SHORTCUTS)),
            }
            agreements[hues] = agreement_section(
                reference, adaptive, reference_steps, informational=hues == "uniform"
            )
    checks = bias_table.expected_pattern(tables["trained"]["fixed"])
    adaptive_checks = bias_table.expected_pattern(tables["trained"]["adaptive"])
    uniform_checks = bias_table.expected_pattern(tables["uniform"]["fixed"])
    all_checks = [
        *checks,
        *(replace(c, name=f"adaptive paths: {c.name}") for c in adaptive_checks),
        *agreements["trained"][2],
    ]
    seconds = time.monotonic() - started
    trained_time = timings["trained"]
    text = "\n\n".join(
        [
            "# Bias table (the paper's Table 1), synthetic world",
            f"{2 * per_class} held-out images ({per_class} circles, {per_class} squares; no patch, "
            "so that pasting it always changes the image; hues from the two ranges the "
            "hue-biased model was trained on, drawn independently of the class), "
            f"fixed paths of N = {reference_steps} steps, K = {PERMUTATIONS} permutations, "
            f"alpha = {ALPHA}, relevant = significant and the target probability changes by >= "
            f"{DEFAULT_MIN_PROBABILITY_CHANGE} (the default). "
            f"Written by `bench/validate_bias.py` in {seconds:.0f} s (this set: fixed paths "
            f"{trained_time['fixed_s']:.0f} s, adaptive {trained_time['adaptive_s']:.0f} s).",
            bias_table.markdown(tables["trained"]["fixed"]),
            "## Expected pattern",
            "At fixed N, then with adaptive paths at the service's default settings.",
            checks_markdown(
                [*checks, *(replace(c, name=f"adaptive paths: {c.name}") for c in adaptive_checks)]
            ),
            "## Adaptive paths against fixed N = " + str(reference_steps),
            f"The same images and properties again at the service's default: adaptive paths "
            f"starting at N = {adaptive_steps}, doubled while the curve's values, even sorted "
            "into a monotone path, could not reach alpha, up to max_steps (default 80). A result "
            "agrees when its decision "
            f"(relevant / not significant / change too small / cannot reach alpha) is the "
            f"fixed N = {reference_steps} path's; edits are edited images per result, every "
            "length tried included.",
            agreements["trained"][0],
            "## The same images with hues the hue-biased model never saw",
            "Hues uniform on the circle (the unbiased world as it is), everything else as "
            "above. Not part of the pass/fail: off its training hues the hue-biased model is "
            "unsure, and there the background and the patch really move its prediction "
            "(the relevant and flipped columns of its background and patch rows). The "
            "relevance decision reports this sensitivity; it is the model's, not the test's.",
            bias_table.markdown(tables["uniform"]["fixed"]),
            checks_markdown(uniform_checks, informational=True),
            "Adaptive paths against fixed N = " + str(reference_steps) + " on these images "
            "(informational). The results that differ (listed below, if any) are curves the "
            "adaptive rule does not extend because their values, sorted, could reach alpha at "
            "this N: it reads the values and never their order, which is what keeps it "
            "calibrated. In the measured run they were of three kinds: a sharp single jump "
            "whose observed curve, with small wiggles in its saturated parts, sits just above "
            "alpha at N = 10 (p 0.01-0.1) while its sorted values reach p of about 0.005; a "
            "hue curve that swings back near the end of the path (the hue passes through both "
            "trained ranges), disorderly at N = 10-20 and resolved into steps at N = 100; and "
            "small rise-and-fall effects of the background or the size (Δp 0.06-0.15); plus "
            "one jump in the very first step that even N = 80 cannot decide.",
            agreements["uniform"][0],
        ]
    )
    data = {
        "config": {
            "per_class": per_class,
            "reference_steps": reference_steps,
            "adaptive_steps": adaptive_steps,
            "seconds": seconds,
            "timings": timings,
        },
        "cells": [cell.__dict__ for cell in tables["trained"]["fixed"]],
        "adaptive_cells": [cell.__dict__ for cell in tables["trained"]["adaptive"]],
        "checks": all_checks,
        "agreement": agreements["trained"][1],
        "uniform_hues": {
            "cells": [cell.__dict__ for cell in tables["uniform"]["fixed"]],
            "adaptive_cells": [cell.__dict__ for cell in tables["uniform"]["adaptive"]],
            "checks": uniform_checks,
            "agreement": agreements["uniform"][1],
        },
    }
    write_results(out, "bias_table", text, data)
    print(text)
    if not all(check.passed for check in all_checks):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
