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
from propscope_dev import stack
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
    done = events[-1]
    stages = (done.edit_ms, done.classify_ms, done.score_ms, done.cache_ms)
    return elapsed, sum(r.cache_hits for r in results), sum(r.cache_misses for r in results), stages


def main(repeats: int = 5, steps: int = 16, samples: int = 2) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        info = stack.up(Path(run_dir), gateway_port=stack.free_port())
        try:
            with propscope.Client(info.gateway, timeout=600) as client:
                image = render(Scene(0, 10.0, 13.0, 0.5, False, (32.0, 32.0)))
                timed_explain(
                    client, image, "synth_unbiased", steps, samples, seed=10_000
                )  # warm-up
                cold, warm, cold_stages, warm_stages = [], [], [], []
                for repeat in range(repeats):
                    cold_s, hits, _, stages = timed_explain(
                        client, image, "synth_unbiased", steps, samples, repeat
                    )
                    assert hits == 0
                    cold.append(cold_s)
                    cold_stages.append(stages)
                    warm_s, _, misses, stages = timed_explain(
                        client, image, "synth_hue", steps, samples, repeat
                    )
                    assert misses == 0
                    warm.append(warm_s)
                    warm_stages.append(stages)
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
    print("stage time summed over properties (they overlap), median ms: edit classify score cache")
    for name, stages in (("cold", cold_stages), ("warm", warm_stages)):
        medians = [statistics.median(column) for column in zip(*stages, strict=True)]
        print(f"  {name}: " + " ".join(f"{m:8.1f}" for m in medians))


if __name__ == "__main__":
    typer.run(main)
