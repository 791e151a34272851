"""CRAFT's cost on a stack started for the benchmark, measured side by side in one run
(synth_patch, class 1, the 12 squares of examples/concepts, the service's defaults: r = 10,
N = 32, crop 0.3 of the side): passes counted by Triton against the plan and the formula
(g: crops + images; h: N (r + 2) per image + r + 2), seconds per fit, how full Triton's
batches are, and the gateway's passes per second against the classifier's best throughput
called directly with the same replacement inputs (REPLACE_LAYER + REPLACE_ACTIVATION at
features.2, max_batch_size rows, the best concurrency), measured just before and after
each fit.

    make bench        # or: .venv/bin/python bench/concepts.py
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc
import typer

import propscope
from propscope_dev import stack

MODEL = "synth_patch"
CLASS = 1
LAYER_INDEX, LAYER_VALUES = 2, 64 * 8 * 8  # features.2: 64 channels of 8 x 8
IMAGES = sorted(
    (Path(__file__).parents[1] / "examples" / "concepts" / "images").glob("*square.png")
)
CONCURRENCIES = (1, 2, 3)


def counts(triton: triton_grpc.InferenceServerClient) -> np.ndarray:
    """[inference_count, execution_count] of the model, every version together."""
    stats = triton.get_inference_statistics(MODEL, as_json=True).get("model_stats", [])
    return np.array(
        [
            sum(int(s.get("inference_count", 0)) for s in stats),
            sum(int(s.get("execution_count", 0)) for s in stats),
        ]
    )


def direct_throughput(target: str, batch: int, concurrency: int, seconds: float) -> float:
    """Passes per second of `concurrency` threads calling Triton back to back with `batch`
    rows, each replacing features.2 (what a fit's h passes send), one client per thread."""
    rng = np.random.default_rng(0)
    tensors = {
        "IMAGE": (rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8), "UINT8"),
        "REPLACE_LAYER": (np.full((batch, 1), LAYER_INDEX, np.int32), "INT32"),
        "REPLACE_ACTIVATION": (rng.random((batch, LAYER_VALUES), dtype=np.float32), "FP32"),
    }
    done = [0] * concurrency
    stop = threading.Event()

    def worker(index: int) -> None:
        client = triton_grpc.InferenceServerClient(target)
        inputs = []
        for name, (value, dtype) in tensors.items():
            tensor = triton_grpc.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        outputs = [triton_grpc.InferRequestedOutput("LOGITS")]
        while not stop.is_set():
            client.infer(MODEL, inputs, outputs=outputs)
            done[index] += batch
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # warm-up, not counted
    start_count, started = sum(done), time.perf_counter()
    time.sleep(seconds)
    passes, elapsed = sum(done) - start_count, time.perf_counter() - started
    stop.set()
    for thread in threads:
        thread.join()
    return passes / elapsed


def fit(client: propscope.Client, triton, seed: int) -> dict:
    before, started = counts(triton), time.perf_counter()
    bank = client.fit_concepts(
        [path.read_bytes() for path in IMAGES], MODEL, target_class=CLASS, seed=seed
    )
    seconds = time.perf_counter() - started
    passes, batches = (int(v) for v in counts(triton) - before)
    return {"bank": bank, "seconds": seconds, "passes": passes, "batches": batches}


def main(sweep_seconds: float = 3.0, repeats: int = 3) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        info = stack.up(Path(run_dir), gateway_port=stack.free_port())
        triton = triton_grpc.InferenceServerClient(info.triton_grpc)
        try:
            config = triton.get_model_config(MODEL, as_json=True)["config"]
            batch = int(config["max_batch_size"])
            with propscope.Client(info.gateway, timeout=1200) as client:
                fit(client, triton, seed=99)  # warm-up
                sweep = {
                    c: direct_throughput(info.triton_grpc, batch, c, sweep_seconds)
                    for c in CONCURRENCIES
                }
                best = max(sweep, key=sweep.__getitem__)
                runs = []
                for repeat in range(repeats):
                    limit_before = direct_throughput(info.triton_grpc, batch, best, sweep_seconds)
                    run = fit(client, triton, seed=repeat)
                    limit_after = direct_throughput(info.triton_grpc, batch, best, sweep_seconds)
                    run["limit"] = (limit_before + limit_after) / 2
                    runs.append(run)
        finally:
            triton.close()
            stack.down(Path(run_dir))
    report(batch, sweep, best, runs)


def report(batch: int, sweep: dict, best: int, runs: list[dict]) -> None:
    bank = runs[0]["bank"]
    r, images = bank.rank, bank.images
    print(
        f"{MODEL}, class {CLASS}, {images} images, r = {r}, layer {bank.layer}: classifier "
        f"called directly (passes/s, batch {batch}, REPLACE_* in, LOGITS out), by concurrency: "
        + ", ".join(f"{c}: {v:.0f}" for c, v in sweep.items())
        + f"; best {best}, measured again around every fit"
    )
    for index, run in enumerate(runs):
        found = run["bank"]
        per_second = run["passes"] / run["seconds"]
        print(
            f"fit {index + 1}: Triton counted {run['passes']} passes (bank: g {found.g_passes} "
            f"+ h {found.h_passes} = {found.g_passes + found.h_passes}; crops {found.crops}); "
            f"{run['seconds']:.2f} s; {per_second:.0f} passes/s = "
            f"{100 * per_second / run['limit']:.0f}% of the direct limit around it "
            f"({run['limit']:.0f}/s); {run['passes'] / max(run['batches'], 1):.1f} rows per "
            f"batch (max_batch_size {batch})"
        )
    shares = [run["passes"] / run["seconds"] / run["limit"] for run in runs]
    print(
        f"median {float(np.median([run['seconds'] for run in runs])):.2f} s per fit, "
        f"{100 * float(np.median(shares)):.0f}% of the direct limit"
    )


if __name__ == "__main__":
    typer.run(main)
