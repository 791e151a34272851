"""Past one machine: explanation throughput through one gateway with one Triton behind it
vs two, side by side in one run, with direct concurrent tritonclient calls as the limit,
and the per-image costs of a real review (edited images, classifications, cache bytes)
that docs/operations.md ("Sizing a 100 000-image review") scales to a GPU cluster.

On a 2-core machine every process shares the same two cores: a second Triton adds no
compute, so the 1 vs 2 ratio shows the balancing (calls spread over both endpoints),
not a speed-up. On separate machines or GPUs the second Triton adds its throughput.

    make bench        # or: .venv/bin/python bench/scale_out.py --rounds 3
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc
import typer

import propscope
from propscope_dev import scale_out
from propscope_server.synthetic.world import Scene, render

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
REVIEW_SPEC = REPOSITORY_ROOT / "examples" / "review" / "hue-shortcut.yaml"
MODELS = ("procedural", "synth_hue", "synth_unbiased")
CLASSIFIER = "synth_hue"
PROPERTIES = [
    "object_hue=procedural:operation=hue,region=object",
    "patch=procedural:operation=blend",
    "background_brightness=procedural:operation=brightness,region=background,amount=0.2",
]
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus endpoint as exposed: (name, sorted labels) -> value.
    Read line by line: prometheus_client's parser renames Triton's counters (adds _total)."""
    with _LOCAL.open(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = tuple(sorted(LABEL.findall(match.group(2) or "")))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and labels.items() <= dict(sample_labels).items()
    )


def triton_totals(stack: scale_out.ScaledStack, name: str, model: str) -> list[float]:
    return [total(scrape(url), name, model=model) for url in stack.triton_metrics]


def scenes(count: int) -> list[np.ndarray]:
    """`count` different images: shapes, hues and radii vary."""
    return [
        render(Scene(i % 2, 10.0 + 37.0 * i, 10.0 + (i % 5), 0.5, False, (32.0, 32.0)))
        for i in range(count)
    ]


def explain_all(
    target: str, images: list[np.ndarray], steps: int, samples: int, concurrency: int
) -> tuple[float, int, int]:
    """Explain every image through `target`, `concurrency` calls in flight; returns the
    wall time and the cache hits and misses."""

    def one(index: int) -> tuple[int, int]:
        events = list(
            client.explain(
                images[index], CLASSIFIER, PROPERTIES, steps=steps, samples=samples, seed=index
            )
        )
        results = [e for e in events if isinstance(e, propscope.PropertyResult)]
        assert all(r.ok for r in results), [r.error for r in results]
        return sum(r.cache_hits for r in results), sum(r.cache_misses for r in results)

    with propscope.Client(target, timeout=600) as client:
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            counts = list(pool.map(one, range(len(images))))
        elapsed = time.perf_counter() - started
    return elapsed, sum(c[0] for c in counts), sum(c[1] for c in counts)


def direct_rate(tritons: list[str], batch: int, concurrency: int, seconds: float) -> float:
    """Images per second classified by `concurrency` threads calling `tritons` in turn
    directly (no gateway), each call a batch of `batch` images."""
    image = render(Scene(0, 10.0, 13.0, 0.5, False, (32.0, 32.0)))
    batch_array = np.repeat(image[None], batch, axis=0)
    done = [0] * concurrency
    deadline = time.perf_counter() + seconds

    def worker(slot: int) -> None:
        clients = [triton_grpc.InferenceServerClient(url) for url in tritons]
        tensor = triton_grpc.InferInput("IMAGE", list(batch_array.shape), "UINT8")
        tensor.set_data_from_numpy(batch_array)
        output = [triton_grpc.InferRequestedOutput("LOGITS")]
        call = slot
        try:
            while time.perf_counter() < deadline:
                clients[call % len(clients)].infer(CLASSIFIER, [tensor], outputs=output)
                done[slot] += batch
                call += 1
        finally:
            for client in clients:
                client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def review_costs(stack: scale_out.ScaledStack, target: str, out_dir: Path) -> dict[str, float]:
    """Per-image costs of examples/review/hue-shortcut.yaml run through `target` on a
    cold cache, from the gateway's and the Tritons' metrics before and after."""
    gateway_url = stack.gateway_metrics[stack.gateways.index(target)]
    before_gateway = scrape(gateway_url)
    before_tritons = [scrape(url) for url in stack.triton_metrics]
    started = time.perf_counter()
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "propscope"),
            "review",
            str(REVIEW_SPEC),
            "--out",
            str(out_dir),
            "--target",
            target,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if run.returncode not in (0, 1):  # 1: the example's rules fail, as they should
        raise RuntimeError(f"review exited {run.returncode}: {run.stderr[-2000:]}")
    after_gateway = scrape(gateway_url)
    after_tritons = [scrape(url) for url in stack.triton_metrics]
    images = sum(1 for line in (REVIEW_SPEC.parent / "manifest.csv").read_text().splitlines()[1:])

    def gateway_delta(name: str, **labels: str) -> float:
        return total(after_gateway, name, **labels) - total(before_gateway, name, **labels)

    def triton_delta(model: str, name: str) -> float:
        return sum(
            total(after, name, model=model) - total(before, name, model=model)
            for before, after in zip(before_tritons, after_tritons, strict=True)
        )

    classified = sum(triton_delta(m, "nv_inference_count") for m in MODELS if m != "procedural")
    classify_us = sum(
        triton_delta(m, "nv_inference_compute_infer_duration_us")
        for m in MODELS
        if m != "procedural"
    )
    edits = gateway_delta("propscope_edits_per_request_sum")
    return {
        "images": images,
        "explanations": gateway_delta("propscope_edits_per_request_count"),
        "seconds": seconds,
        "edits": edits,
        "edit_requests": triton_delta("procedural", "nv_inference_count"),
        "edit_us": triton_delta("procedural", "nv_inference_compute_infer_duration_us"),
        "classified": classified,
        "classify_us": classify_us,
        "cache_bytes": gateway_delta("propscope_cache_bytes_written_total"),
        "misses": gateway_delta("propscope_cache_lookups_total", result="miss"),
        "hits": gateway_delta("propscope_cache_lookups_total", result="hit"),
    }


def main(
    rounds: int = 3,
    images: int = 8,
    steps: int = 16,
    samples: int = 2,
    concurrency: int = 4,
    direct_seconds: float = 3.0,
) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        stack = scale_out.up_scaled(Path(run_dir), tritons=2, gateways=1, models=MODELS)
        try:
            start_s = time.perf_counter() - started
            both = stack.gateways[0]
            one = stack.gateways[stack.add_gateway(PROPSCOPE_TRITON_URL=stack.tritons[0])]
            costs = review_costs(stack, both, Path(run_dir) / "review")
            pictures = scenes(images)
            explain_all(both, pictures, steps, samples, concurrency)  # the paths, cached
            rates: dict[str, list[float]] = {"1 Triton": [], "2 Tritons": []}
            per_triton = {name: [0.0, 0.0] for name in rates}
            for _ in range(rounds):
                for name, target in (("1 Triton", one), ("2 Tritons", both)):
                    counts = triton_totals(stack, "nv_inference_count", CLASSIFIER)
                    elapsed, _, misses = explain_all(target, pictures, steps, samples, concurrency)
                    assert misses == 0, f"{name}: {misses} cache misses in a warm round"
                    after = triton_totals(stack, "nv_inference_count", CLASSIFIER)
                    for index, (a, b) in enumerate(zip(after, counts, strict=True)):
                        per_triton[name][index] += a - b
                    rates[name].append(images / elapsed)
            direct = {
                (batch, threads): direct_rate(stack.tritons, batch, threads, direct_seconds)
                for batch in (16, 64)
                for threads in (1, 2, 4)
            }
        finally:
            stack.close()

    classified_per_call = sum(per_triton["2 Tritons"]) / (rounds * images)
    print(f"scaled stack (2 Tritons, 1 gateway, 3-node Redis Cluster) started in {start_s:.1f} s")
    print(
        f"warm explanations: {len(PROPERTIES)} properties x {samples} samples x {steps} steps, "
        f"{images} images, {concurrency} in flight, {rounds} rounds; ~{classified_per_call:.0f} "
        f"images classified per explanation (paths from the cache)"
    )
    for name, values in rates.items():
        median = statistics.median(values)
        split = "/".join(f"{count:.0f}" for count in per_triton[name])
        print(
            f"  {name:9}  median {median:6.2f} explanations/s  ({median * classified_per_call:7.0f} "
            f"classifications/s)  classified per Triton {split}"
        )
    ratio = statistics.median(rates["2 Tritons"]) / statistics.median(rates["1 Triton"])
    print(f"  2 / 1 Tritons ratio {ratio:.2f}x (one machine: balancing, not a speed-up)")
    print("direct tritonclient calls to both Tritons in turn, images classified per second:")
    for (batch, threads), rate in direct.items():
        print(f"  batch {batch:3}  {threads} in flight  {rate:8.0f} images/s")
    best = max(direct, key=direct.__getitem__)
    print(f"  limit: {direct[best]:.0f} images/s at batch {best[0]}, {best[1]} in flight")
    n = costs["images"]
    print(
        f"per-image costs of examples/review/hue-shortcut.yaml ({n:.0f} images, "
        f"{costs['explanations']:.0f} explanations, cold cache, {costs['seconds']:.1f} s):"
    )
    lookups = max(costs["misses"] + costs["hits"], 1)
    edited = costs["edits"] * costs["misses"] / lookups
    print(
        f"  edited images        {costs['edits'] / n:8.1f} per image planned (both models; a "
        f"cached path counts again), ~{edited / n:.1f} run (the share of paths missed)"
    )
    print(f"  editor calls (paths) {costs['edit_requests'] / n:8.1f} per image")
    print(f"  classified images    {costs['classified'] / n:8.1f} per image")
    print(f"  cache bytes written  {costs['cache_bytes'] / n:8.0f} per image")
    print(f"  cache lookups        {costs['misses'] / n:8.1f} misses, {costs['hits'] / n:.1f} hits")
    print(
        f"  Triton compute (CPU) {costs['edit_us'] / max(edited, 1):8.0f} us per edited image, "
        f"{costs['classify_us'] / max(costs['classified'], 1):.0f} us per classified image"
    )


if __name__ == "__main__":
    typer.run(main)
