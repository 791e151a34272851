"""What one interaction estimate costs (Interactions, docs/interactions.md): composed
images, edits and editor calls per estimate for 2 and 3 properties, and the time of an
estimate cold (the editor composes every image) against warm (a second classifier on the
same image, design and seed: every composed image comes from the cache), side by side in
one run on the real stack (Triton, Redis, gateway) started for the benchmark.

    make bench        # or: .venv/bin/python bench/interactions.py --repeats 5
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import tritonclient.grpc as triton_grpc
import typer

import propscope
from propscope_dev import stack
from propscope_server.synthetic.world import Scene, render

PROPERTIES = (
    "hue=procedural:operation=hue,region=object",
    "patch=procedural:operation=blend",
    "background=procedural:operation=brightness,region=background,amount=0.2",
)
EDITOR = "procedural"
COLD_MODEL, WARM_MODEL = "synth_hue", "synth_unbiased"


def editor_calls(triton: triton_grpc.InferenceServerClient) -> int:
    """Requests the editor answered (each edits one image along a vector of strengths)."""
    stats = triton.get_inference_statistics(EDITOR, as_json=True)
    return sum(
        int(s.get("inference_stats", {}).get("success", {}).get("count", 0))
        for s in stats.get("model_stats", [])
    )


def settled_calls(triton: triton_grpc.InferenceServerClient) -> int:
    """editor_calls once it stops moving: Triton's statistics may trail a response."""
    count = editor_calls(triton)
    for _ in range(20):
        time.sleep(0.1)
        again = editor_calls(triton)
        if again == count:
            break
        count = again
    return count


def timed(
    client: propscope.Client,
    triton: triton_grpc.InferenceServerClient,
    model: str,
    properties: int,
    design_size: int,
    seed: int,
) -> tuple[float, propscope.InteractionsResult, int]:
    """(seconds, result, editor calls) of one estimate."""
    image = render(Scene(seed % 2, 5.0, 12.5, 0.5, False, (32.0, 32.0)))
    before = settled_calls(triton)
    started = time.perf_counter()
    result = client.interactions(
        image, model, list(PROPERTIES[:properties]), design_size=design_size, seed=seed
    )
    elapsed = time.perf_counter() - started
    return elapsed, result, settled_calls(triton) - before


# (properties, design size): the default N for 2 and 3 properties, and the validation's N.
CASES = ((2, 32), (3, 32), (2, 128))


def main(repeats: int = 5) -> None:
    """Cold and warm estimates for each of CASES, `repeats` of each, interleaved."""
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        info = stack.up(Path(run_dir), gateway_port=stack.free_port())
        try:
            triton = triton_grpc.InferenceServerClient(info.triton_grpc)
            with propscope.Client(info.gateway, timeout=600) as client:
                timed(client, triton, COLD_MODEL, 2, 32, seed=10_000)  # warm-up
                timed(client, triton, WARM_MODEL, 2, 32, seed=10_000)
                for properties, design_size in CASES:
                    cold, warm = [], []
                    for repeat in range(repeats):
                        seed = 1000 * properties + design_size + repeat
                        seconds, result, calls = timed(
                            client, triton, COLD_MODEL, properties, design_size, seed
                        )
                        assert result.cache_hits == 0, "a cold estimate found images cached"
                        cold.append(seconds)
                        cold_result, cold_calls = result, calls
                        seconds, result, calls = timed(
                            client, triton, WARM_MODEL, properties, design_size, seed
                        )
                        assert result.cache_misses == 0 and calls == 0, "a warm estimate edited"
                        warm.append(seconds)
                    rows.append((properties, design_size, cold_result, cold_calls, cold, warm))
        finally:
            stack.down(Path(run_dir))
    print(
        f"interaction estimates: cold {COLD_MODEL} then warm {WARM_MODEL} "
        f"(same image, design and seed), {repeats} of each interleaved, cache "
        f"{'redis' if info.redis_url else 'memory'}"
    )
    print(
        f"{'P':>2} {'N':>4} {'images':>7} {'edits':>6} {'editor calls':>13} {'passes':>7} "
        f"{'cold ms':>9} {'warm ms':>9} {'cold/warm':>10}"
    )
    for properties, design_size, result, calls, cold, warm in rows:
        cold_ms, warm_ms = statistics.median(cold) * 1e3, statistics.median(warm) * 1e3
        print(
            f"{properties:>2} {design_size:>4} {result.planned_images:>7} {result.edits:>6} {calls:>13} "
            f"{result.forward_passes:>7} {cold_ms:>9.0f} {warm_ms:>9.0f} "
            f"{cold_ms / warm_ms:>9.1f}x"
        )


if __name__ == "__main__":
    typer.run(main)
