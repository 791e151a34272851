"""Load/soak test: many concurrent streaming Explain calls for minutes against a stack of
its own (Triton, Redis, gateway on free ports, so a `make up` stack is left alone).

Writes docs/results/soak.{md,json}; exit code 1 when a call failed unexpectedly, was
rejected after being accepted, or the gateway is not SERVING afterwards.

    make soak         # or: .venv/bin/python bench/soak.py --streams 48 --duration-s 300
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
from pathlib import Path

import typer

from propscope_dev import stack
from propscope_dev.soak import run_soak
from propscope_dev.validation.tables import write_results


def main(
    streams: int = typer.Option(32, help="Concurrent Explain streams."),
    duration_s: float = typer.Option(150.0, help="How long workers start new calls."),
    call_deadline_s: float = typer.Option(60.0, help="Deadline of each call."),
    seed: int = typer.Option(0, help="Seed of the request mix."),
    out: Path = typer.Option(
        stack.REPOSITORY_ROOT / "docs" / "results", help="Where soak.md and soak.json go."
    ),
) -> None:
    with tempfile.TemporaryDirectory(prefix="propscope-soak-") as run_dir:
        info = stack.up(Path(run_dir), gateway_port=stack.free_port(), use_redis=True)
        try:
            report = run_soak(
                info.gateway,
                streams,
                duration_s,
                info.pids["gateway"],
                call_deadline_s=call_deadline_s,
                seed=seed,
            )
        finally:
            stack.down(Path(run_dir))
    cache = "Redis" if info.redis_url else "the gateway's in-process cache"
    text = "\n".join(
        [
            "# Soak test (`make soak`)",
            "",
            f"{datetime.date.today().isoformat()}, {platform.system()} {platform.machine()} with "
            f"{os.cpu_count()} CPUs shared by the load driver and the stack (Triton CPU-only, "
            f"{cache}, gateway), all on loopback.",
            "",
            report.to_markdown(),
        ]
    )
    print(text)
    write_results(out, "soak", text, report.to_dict())
    if not report.passed:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
