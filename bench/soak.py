"""Load/soak test: many concurrent streaming Explain calls for minutes against a stack of
its own (Triton, Redis, gateway on free ports, so a `make up` stack is left alone).

Writes docs/results/soak.{md,json}; exit code 1 when a call failed unexpectedly, was
rejected after being accepted, or the gateway is not SERVING afterwards.

    make soak         # or: .venv/bin/python bench/soak.py --streams 48 --duration-s 300
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import typer

from propscope_dev import stack
from propscope_dev.hostile import slow_reader_attack, unauthenticated_flood
from propscope_dev.soak import run_soak
from propscope_dev.validation.tables import markdown_table, write_results


def hostile_clients(info: stack.StackInfo, run_dir: Path) -> list[tuple[str, str]]:
    """32 never-reading streams beside a well-behaved caller; 16 callers without a token
    sending 63 MiB each at once (against a gateway with auth on)."""
    slow = slow_reader_attack(
        info.gateway, streams=32, idle_calls=30, loaded_calls=30, settle_s=5, read_after_s=40
    )
    tokens = json.dumps({"soak-token": "soak"})
    with stack.extra_gateway(info, run_dir, PROPSCOPE_AUTH__TOKENS=tokens) as gateway:
        codes, added_mib = unauthenticated_flood(
            gateway.target, gateway.process.pid, callers=16, mib=63
        )
    refused = sum(code == "UNAUTHENTICATED" for code in codes)
    return [
        *slow.rows(),
        (
            "16 concurrent unauthenticated 63 MiB calls",
            f"{refused} UNAUTHENTICATED; gateway peak RSS +{added_mib:.0f} MiB",
        ),
    ]


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
            hostile = hostile_clients(info, Path(run_dir))
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
            "",
            "## Hostile clients (issue 15), at full size",
            "",
            "The same stack after the load, default settings (send_timeout_s 30 s, "
            "max_streams_per_connection 16, max_streams_per_peer 32).",
            "",
            markdown_table(("figure", "value"), hostile),
        ]
    )
    print(text)
    write_results(out, "soak", text, {**report.to_dict(), "hostile_clients": dict(hostile)})
    if not report.passed:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
