"""The paper's Table 1 on the synthetic world, through the running service.

Explains held-out images (unbiased world, no patch) with each synthetic
classifier for four properties and writes docs/results/bias_table.{md,json}
with the pass/fail checks of the expected pattern. Exit code 1 if a check fails.

    make validate     # or, with the stack up: .venv/bin/python bench/validate_bias.py
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer

import propscope
from propscope_server.validation import bias_table
from propscope_server.validation.runner import SHORTCUTS, explain_all, test_set
from propscope_server.validation.tables import checks_markdown, write_results

app = typer.Typer(add_completion=False)


@app.command()
def main(
    target: str = typer.Option("localhost:50051", help="The gateway."),
    per_class: int = typer.Option(50, help="Test images per class."),
    steps: int = typer.Option(
        50, help="Edited images per path (N); at 10, a step near either end cannot reach p < 0.01."
    ),
    workers: int = typer.Option(4, help="Requests in flight."),
    out: Path = typer.Option(Path("docs/results"), help="Where the tables go."),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    images, labels = test_set(per_class)
    with propscope.Client(target, timeout=600) as client:
        runs = explain_all(client, images, labels, SHORTCUTS, steps=steps, workers=workers)
    table = bias_table.cells(runs, list(SHORTCUTS))
    checks = bias_table.expected_pattern(table)
    seconds = time.monotonic() - started
    text = "\n\n".join(
        [
            "# Bias table (the paper's Table 1), synthetic world",
            f"{len(images)} held-out images ({per_class} circles, {per_class} squares; unbiased "
            f"world, no patch), N = {steps} steps, K = 10 000 permutations, alpha = 0.01, "
            "relevant = significant and the target probability changes by >= 0.05. "
            f"Written by `bench/validate_bias.py` in {seconds:.0f} s.",
            bias_table.markdown(table),
            "## Expected pattern",
            checks_markdown(checks),
        ]
    )
    data = {
        "config": {"per_class": per_class, "steps": steps, "seconds": seconds},
        "cells": [cell.__dict__ for cell in table],
        "checks": checks,
    }
    write_results(out, "bias_table", text, data)
    print(text)
    if not all(check.passed for check in checks):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
