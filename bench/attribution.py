"""Sobol attribution's cost on the real stack started for the benchmark, measured side by
side in one run: forward passes counted by Triton, the gateway's forward passes per second
against the classifier's best throughput called directly, peak gateway memory for one
large image, and the same map computed by an in-process torch loop.

    make bench        # or: .venv/bin/python bench/attribution.py
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as triton_grpc
import typer

import propscope
from propscope_dev import stack
from propscope_dev.validation.attribution import patch_images
from propscope_server.scoring import perturbation, sobol
from propscope_server.triton_models.classifiers.cnn import load_classifier, normalise_uint8_hwc

MODEL = "synth_patch"
WEIGHTS = Path(__file__).resolve().parents[1] / "deploy" / "triton" / "weights" / "patch_biased.pt"
BATCHES = (16, 32, 64)
CONCURRENCIES = (1, 2, 4, 8)
ATTRIBUTION_CONCURRENCIES = (1, 3, 8)


def inference_count(triton: triton_grpc.InferenceServerClient, model: str) -> int:
    stats = triton.get_inference_statistics(model, as_json=True)
    return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", []))


def fresh_images(count: int) -> np.ndarray:
    """Scenes the cache has not seen (a seed per run)."""
    return patch_images(count, seed=int.from_bytes(os.urandom(4), "big"))


def pass_counts(client: propscope.Client, triton, settings: list[tuple[int, int]]) -> list[dict]:
    """Triton's inference_count around one map per (grid, nb_design)."""
    rows = []
    for (grid, nb_design), image in zip(settings, fresh_images(len(settings)), strict=True):
        before = inference_count(triton, MODEL)
        found = client.attribute(image, MODEL, grid_size=grid, nb_design=nb_design)
        counted = inference_count(triton, MODEL) - before
        rows.append(
            {
                "grid": grid,
                "nb_design": nb_design,
                "design": nb_design * (grid * grid + 2),
                "counted": counted,
                "announced_total": found.planned_forward_passes_total,
            }
        )
    return rows


def direct_throughput(target: str, batch: int, concurrency: int, seconds: float) -> float:
    """Images per second of `concurrency` threads each calling Triton with `batch` images
    back to back for `seconds` (what perf_analyzer does), one gRPC client per thread."""
    images = np.random.default_rng(0).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    done = [0] * concurrency
    stop = threading.Event()

    def worker(index: int) -> None:
        client = triton_grpc.InferenceServerClient(target)
        tensor = triton_grpc.InferInput("IMAGE", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        while not stop.is_set():
            client.infer(MODEL, [tensor])
            done[index] += batch
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # warm-up, not counted
    start_counts, started = sum(done), time.perf_counter()
    time.sleep(seconds)
    images_done, elapsed = sum(done) - start_counts, time.perf_counter() - started
    stop.set()
    for thread in threads:
        thread.join()
    return images_done / elapsed


def gateway_throughput(
    client: propscope.Client, triton, maps: int, workers: int, nb_design: int = 32
) -> dict:
    """Forward passes per second (Triton's count) while `workers` Sobol maps run at once."""
    images = fresh_images(maps)
    before, started = inference_count(triton, MODEL), time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        found = list(
            pool.map(
                lambda image: client.attribute(image, MODEL, grid_size=8, nb_design=nb_design),
                images,
            )
        )
    elapsed = time.perf_counter() - started
    passes = inference_count(triton, MODEL) - before
    assert not any(f.cache_hit for f in found)
    return {
        "maps": maps,
        "in_flight": workers,
        "passes": passes,
        "seconds": elapsed,
        "per_second": passes / elapsed,
        "seconds_per_map": elapsed * workers / maps,
    }


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


@contextmanager
def fresh_gateway(info: stack.StackInfo, log_dir: Path, **settings: str) -> Iterator[tuple]:
    """(target, process) of a new gateway process on the stack's Triton and Redis."""
    port = stack.free_port()
    env = {
        "PROPSCOPE_LISTEN_ADDRESS": f"127.0.0.1:{port}",
        "PROPSCOPE_TRITON_URL": info.triton_grpc,
        "PROPSCOPE_PREPROCESSING_FILE": str(stack.DEFAULT_PREPROCESSING),
        "PROPSCOPE_METRICS_PORT": str(stack.free_port()),
        **({"REDIS_URL": info.redis_url} if info.redis_url else {}),
        **settings,
    }
    process = stack.start_gateway(env, log_dir / f"gateway-{port}.log")
    target = f"127.0.0.1:{port}"
    try:
        stack.wait_for_gateway(target, process)
        yield target, process
    finally:
        process.terminate()
        process.wait(30)


def peak_memory(info: stack.StackInfo, log_dir: Path) -> dict:
    """VmHWM of a fresh gateway process: idle, after a 64 x 64 map, after a 1024 x 1024 one
    (grid 8, N 64)."""
    small, large = fresh_images(2)
    large = np.asarray(
        torch.nn.functional.interpolate(
            torch.from_numpy(large).permute(2, 0, 1)[None].float(), size=(1024, 1024)
        )[0]
        .permute(1, 2, 0)
        .round()
        .to(torch.uint8)
    )
    with fresh_gateway(info, log_dir) as (target, process):
        idle = vm_hwm_kib(process.pid)
        with propscope.Client(target, timeout=600) as client:
            client.attribute(small, MODEL, grid_size=8, nb_design=64)
            warm = vm_hwm_kib(process.pid)
            found = client.attribute(large, MODEL, grid_size=8, nb_design=64)
        after = vm_hwm_kib(process.pid)
    assert found.map.shape == (1024, 1024) and not found.cache_hit
    return {"idle_kib": idle, "after_small_kib": warm, "after_large_kib": after}


def by_concurrency(info: stack.StackInfo, triton, log_dir: Path) -> dict[int, dict]:
    """One map in flight on gateways with PROPSCOPE_ATTRIBUTION_CONCURRENCY 1, 3 and 8
    (batches of one map sent to Triton at once)."""
    found = {}
    for concurrency in ATTRIBUTION_CONCURRENCIES:
        settings = {"PROPSCOPE_ATTRIBUTION_CONCURRENCY": str(concurrency)}
        with fresh_gateway(info, log_dir, **settings) as (target, _):
            with propscope.Client(target, timeout=600) as client:
                found[concurrency] = gateway_throughput(client, triton, maps=2, workers=1)
    return found


def in_process(nb_design: int, grid: int, image: np.ndarray, batch: int, threads: int) -> dict:
    """The same design on the same weights, as a Captum or Xplique user runs it: masks,
    perturbations and torch forward passes in batches in one process."""
    torch.set_num_threads(threads)
    model = load_classifier(WEIGHTS)
    started = time.perf_counter()
    design = sobol.sobol_design(nb_design, grid * grid)
    pixels = image.astype(np.float32)
    baseline = np.zeros_like(pixels)
    with torch.inference_mode():
        target = int(model(normalise_uint8_hwc(image[None])).argmax())
    scores, perturb_s, forward_s = [], 0.0, 0.0
    for start in range(0, len(design), batch):
        tick = time.perf_counter()
        masks = sobol.upsample_masks(design[start : start + batch], grid, 64, 64)
        perturbed = perturbation.perturb(pixels, masks, "inpainting", baseline)
        inputs = np.round(perturbed).astype(np.uint8)
        tock = time.perf_counter()
        with torch.inference_mode():
            logits = model(normalise_uint8_hwc(inputs))
            scores.append(torch.softmax(logits, dim=1)[:, target].numpy())
        perturb_s += tock - tick
        forward_s += time.perf_counter() - tock
    sobol.total_order(np.concatenate(scores), nb_design, grid * grid)
    total = time.perf_counter() - started
    return {
        "threads": threads,
        "seconds": total,
        "perturb_seconds": perturb_s,
        "forward_seconds": forward_s,
        "passes_per_second": len(design) / total,
    }


def main(sweep_seconds: float = 3.0, maps: int = 6) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        info = stack.up(Path(run_dir), gateway_port=stack.free_port())
        triton = triton_grpc.InferenceServerClient(info.triton_grpc)
        try:
            with propscope.Client(info.gateway, timeout=600) as client:
                client.attribute(fresh_images(1)[0], MODEL, grid_size=4, nb_design=8)  # warm-up
                counts = pass_counts(client, triton, [(8, 32), (4, 16), (8, 64), (12, 8)])
                sweep = {
                    (batch, concurrency): direct_throughput(
                        info.triton_grpc, batch, concurrency, sweep_seconds
                    )
                    for batch in BATCHES
                    for concurrency in CONCURRENCIES
                }
                single = gateway_throughput(client, triton, maps=3, workers=1)
                concurrent = gateway_throughput(client, triton, maps=maps, workers=3)
                sweep_after = {
                    best: direct_throughput(info.triton_grpc, *best, sweep_seconds)
                    for best in [max(sweep, key=sweep.__getitem__)]
                }
            memory = peak_memory(info, Path(run_dir))
            settings = by_concurrency(info, triton, Path(run_dir))
        finally:
            triton.close()
            stack.down(Path(run_dir))
    image = fresh_images(1)[0]
    local = [in_process(32, 8, image, 64, threads) for threads in (1, torch.get_num_threads())]
    report(counts, sweep, sweep_after, single, concurrent, memory, local, settings)


def report(counts, sweep, sweep_after, single, concurrent, memory, local, settings) -> None:
    print("forward passes per map (Triton's inference_count):")
    for row in counts:
        print(
            f"  grid {row['grid']:2d}, N {row['nb_design']:3d}: N (g^2 + 2) = {row['design']:5d}, "
            f"counted {row['counted']:5d} (design + 1 on the original; Accepted announced "
            f"{row['announced_total']})"
        )
    print("classifier called directly (images/s), batch x concurrency:")
    print("  batch " + "".join(f"{c:>9d}" for c in CONCURRENCIES))
    for batch in BATCHES:
        print(f"  {batch:5d} " + "".join(f"{sweep[batch, c]:9.0f}" for c in CONCURRENCIES))
    best = max(sweep, key=sweep.__getitem__)
    limit = max(sweep[best], *sweep_after.values())
    print(
        f"  best: batch {best[0]}, concurrency {best[1]}: {sweep[best]:.0f}/s "
        f"(again after the maps: {next(iter(sweep_after.values())):.0f}/s)"
    )
    for name, run in (("1 map in flight", single), ("3 maps in flight", concurrent)):
        print(
            f"gateway, {name}: {run['passes']} passes in {run['seconds']:.1f} s = "
            f"{run['per_second']:.0f}/s, {100 * run['per_second'] / limit:.0f}% of the best "
            f"direct throughput ({run['seconds_per_map']:.2f} s per map)"
        )
    for concurrency, run in settings.items():
        print(
            f"  fresh gateway, PROPSCOPE_ATTRIBUTION_CONCURRENCY={concurrency}, 1 map in flight: "
            f"{run['per_second']:.0f}/s ({100 * run['per_second'] / limit:.0f}%)"
        )
    growth = (memory["after_large_kib"] - memory["idle_kib"]) / 1024
    marginal = (memory["after_large_kib"] - memory["after_small_kib"]) / 1024
    print(
        f"gateway peak RSS (VmHWM), fresh process: idle {memory['idle_kib'] / 1024:.0f} MiB, "
        f"after a 64x64 map {memory['after_small_kib'] / 1024:.0f} MiB, after a 1024x1024 map "
        f"(grid 8, N 64) {memory['after_large_kib'] / 1024:.0f} MiB: +{growth:.0f} MiB from "
        f"idle, +{marginal:.0f} MiB over the small map"
    )
    gateway_map_s = single["seconds_per_map"]
    for run in local:
        print(
            f"in-process torch loop ({run['threads']} thread(s), batch 64): {run['seconds']:.2f} s "
            f"per map ({run['passes_per_second']:.0f} passes/s; perturbation "
            f"{run['perturb_seconds']:.2f} s, forward {run['forward_seconds']:.2f} s); "
            f"gateway / in-process time: {gateway_map_s / run['seconds']:.2f}x"
        )


if __name__ == "__main__":
    typer.run(main)
