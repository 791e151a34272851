"""What the model sees, validated through the running service (issue 18, part 5): CRAFT
concepts, MACO pictures and MeGe/ReCo across retrainings, in one table.

Each part's checks live in its own module (tools/propscope_dev/validation/{craft,maco,
consistency}.py, each `validate(address, quick) -> rows`); this script runs them in turn
and writes docs/results/concepts.{md,json}. A row's `met` is recorded, not gating, where
the row says `informational`; exit code 1 when a gating row is not met.

    make validate     # or, with the stack up: .venv/bin/python bench/validate_concepts.py
    .venv/bin/python bench/validate_concepts.py --quick
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer

from propscope_dev.validation import consistency, craft, maco
from propscope_dev.validation.tables import checks_markdown, row_check, write_results

app = typer.Typer(add_completion=False)
PARTS = {"CRAFT": craft, "MACO": maco, "MeGe/ReCo": consistency}


@app.command()
def main(
    target: str = typer.Option("localhost:50051", help="The gateway."),
    quick: bool = typer.Option(False, help="Small settings: a few minutes."),
    out: Path = typer.Option(Path("docs/results"), help="Where the results go."),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows, seconds = [], {}
    for part, module in PARTS.items():
        started = time.monotonic()
        rows += module.validate(target, quick=quick)
        seconds[part] = time.monotonic() - started
        logging.info("%s: %.0f s", part, seconds[part])
    checks = [row_check(row) for row in rows]
    timing = ", ".join(f"{part} {s:.0f} s" for part, s in seconds.items())
    text = "\n\n".join(
        [
            "# What the model sees: concepts, pictures, stability across retrainings",
            f"Through the running service, issue 18 part 5. Written by "
            f"`bench/validate_concepts.py{' --quick' if quick else ''}` ({timing}). "
            "Rows marked met / not met are recorded, not gating; pass / FAIL rows gate "
            "`make validate`. Each measurement is what this run gave, on the synthetic world's "
            "models (deploy/triton/models/synth_*).",
            checks_markdown(checks),
        ]
    )
    write_results(out, "concepts", text, {"quick": quick, "seconds": seconds, "rows": rows})
    print(text)
    if not all(check.passed or check.informational for check in checks):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
