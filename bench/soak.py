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
from propscope_dev.hostile import (
    compressible_png,
    large_image_flood,
    large_message_flood,
    slow_reader_attack,
)
from propscope_dev.soak import run_soak
from propscope_dev.validation.tables import markdown_table, write_results
from propscope_server.config import derived_memory_budget

# deploy/k8s/gateway-deployment.yaml's memory limit.
K8S_MEMORY_LIMIT_BYTES = 4 * 2**30


def hostile_clients(info: stack.StackInfo, run_dir: Path) -> list[tuple[str, str]]:
    """32 never-reading streams beside a well-behaved caller (default settings); then,
    on a gateway with auth on and the memory budget the k8s manifest's 4 GiB limit
    gives: 16 callers sending 63 MiB each at once, without and with a token, and 16
    concurrent 4096 x 4096 compressible PNGs."""
    slow = slow_reader_attack(
        info.gateway, streams=32, idle_calls=30, loaded_calls=30, settle_s=5, read_after_s=40
    )
    budget = derived_memory_budget(K8S_MEMORY_LIMIT_BYTES)
    settings = dict(
        PROPSCOPE_AUTH__TOKENS=json.dumps({"soak-token": "soak"}),
        PROPSCOPE_MEMORY_BUDGET_BYTES=str(budget),
    )
    with stack.extra_gateway(info, run_dir, **settings) as gateway:
        pid = gateway.process.pid
        floods = {
            token: large_message_flood(gateway.target, pid, callers=16, mib=63, token=token)
            for token in (None, "soak-token")
        }
        image = compressible_png(4096)
        outcomes, rss = large_image_flood(gateway.target, pid, image, 16, "soak-token")
    rows = slow.rows()
    for token, (codes, added_mib) in floods.items():
        who = "authenticated" if token else "unauthenticated"
        rows.append(
            (
                f"16 concurrent {who} 63 MiB calls (budget {budget >> 20} MiB)",
                f"{_counts(codes)}; gateway peak RSS +{added_mib:.0f} MiB",
            )
        )
    rows.append(
        (
            f"16 concurrent 4096 x 4096 PNGs of {len(image) // 1000} KB (budget {budget >> 20} MiB)",
            f"{_counts([o.code for o in outcomes])}; gateway peak RSS "
            f"+{(rss.peak - rss.before) / 2**20:.0f} MiB",
        )
    )
    return rows


def _counts(codes: list[str]) -> str:
    return ", ".join(f"{code} {codes.count(code)}" for code in sorted(set(codes)))


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
            "The same stack after the load: default settings (send_timeout_s 30 s, "
            "max_streams_per_connection 16, max_streams_per_peer 32), then a second gateway "
            "with auth on and the memory budget of the k8s manifest's 4 GiB limit.",
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
