"""End-to-end time of one explanation, cold (the editor runs) and warm (the
path is cached; a different classifier), measured side by side in one run on
the real stack (Triton, Redis, gateway) started for the benchmark.

    make bench        # or: .venv/bin/python bench/explain_cold_warm.py --repeats 7
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import typer

import propscope
from propscope_server import stack
from propscope_server.synthetic.world import Scene, render

PROPERTIES = [
    "object_hue=procedural:operation=hue,region=object",
    "patch=procedural:operation=blend",
    "background_brightness=procedural:operation=brightness,region=background,amount=0.2",
    "blur=procedural:operation=blur",
]


def timed_explain(client: propscope.Client, image, model: str, steps: int, samples: int, seed: int):
    started = time.perf_counter()
    events = list(client.explain(image, model, PROPERTIES, steps=steps, samples=samples, seed=seed))
    elapsed = time.perf_counter() - started
    results = [e for e in events if isinstance(e, propscope.PropertyResult)]
    assert all(r.ok for r in results), [r.error for r in results]
    return elapsed, sum(r.cache_hits for r in results), sum(r.cache_misses for r in results)


def main(repeats: int = 5, steps: int = 16, samples: int = 2) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        info = stack.up(Path(run_dir), gateway_port=stack.free_port())
        try:
            with propscope.Client(info.gateway, timeout=600) as client:
                image = render(Scene(0, 10.0, 13.0, 0.5, False, (32.0, 32.0)))
                timed_explain(
                    client, image, "synth_unbiased", steps, samples, seed=10_000
                )  # warm-up
                cold, warm = [], []
                for repeat in range(repeats):
                    cold_s, hits, _ = timed_explain(
                        client, image, "synth_unbiased", steps, samples, repeat
                    )
                    assert hits == 0
                    warm_s, _, misses = timed_explain(
                        client, image, "synth_hue", steps, samples, repeat
                    )
                    assert misses == 0
                    cold.append(cold_s)
                    warm.append(warm_s)
        finally:
            stack.down(Path(run_dir))
    cold_ms, warm_ms = statistics.median(cold) * 1e3, statistics.median(warm) * 1e3
    print(
        f"explanation: {len(PROPERTIES)} properties x {samples} samples x {steps} steps "
        f"({len(PROPERTIES) * samples * steps} edits), cache {info.redis_url and 'redis' or 'memory'}"
    )
    print(f"cold (editor runs)         median {cold_ms:8.1f} ms  over {repeats} runs")
    print(f"warm (path cached, 2nd model) median {warm_ms:8.1f} ms")
    print(f"cold / warm ratio          {cold_ms / warm_ms:8.2f}x")


if __name__ == "__main__":
    typer.run(main)
