"""MACO's cost: seconds per 64 x 64 picture through the gateway (the paper's defaults,
256 steps x 32 crops) side by side with the bare Triton gradient calls alone (the same
256 calls of 32 crops with INPUT_GRADIENT, straight to Triton: the floor the gateway's
loop cannot beat), and their ratio, on a stack started for the benchmark or one you name:

    make bench        # or: .venv/bin/python bench/maco.py
    .venv/bin/python bench/maco.py --address localhost:50081 --triton localhost:<Triton gRPC>
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc
import typer

import propscope
from propscope_dev import stack

MODEL = "synth_hue"
STEPS = 256
CROPS = 32
SIDE = 64


def bare_triton_seconds(url: str, steps: int, crops: int) -> float:
    """`steps` INPUT_GRADIENT calls of `crops` random uint8 crops, sequential as the loop's."""
    client = triton_grpc.InferenceServerClient(url)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(crops, SIDE, SIDE, 3), dtype=np.uint8)
    image = triton_grpc.InferInput("IMAGE", list(pixels.shape), "UINT8")
    image.set_data_from_numpy(pixels)
    target = triton_grpc.InferInput("GRADIENT_CLASS", [crops, 1], "INT32")
    target.set_data_from_numpy(np.zeros((crops, 1), dtype=np.int32))
    outputs = [
        triton_grpc.InferRequestedOutput("LOGITS"),
        triton_grpc.InferRequestedOutput("INPUT_GRADIENT"),
    ]
    client.infer(MODEL, [image, target], outputs=outputs)  # warm
    started = time.perf_counter()
    for _ in range(steps):
        client.infer(MODEL, [image, target], outputs=outputs).as_numpy("INPUT_GRADIENT")
    return time.perf_counter() - started


def measure(address: str, triton: str, repeats: int) -> None:
    with propscope.Client(address) as client:
        client.visualize(MODEL, class_index=0, steps=4, crops=CROPS)  # warm
        for repeat in range(repeats):
            found = client.visualize(MODEL, class_index=0, seed=repeat)
            gateway = found.total_ms / 1000.0
            bare = bare_triton_seconds(triton, STEPS, CROPS)
            print(
                f"{MODEL} {SIDE}x{SIDE}, {STEPS} steps x {CROPS} crops: gateway {gateway:.1f} s "
                f"per picture, bare Triton gradient calls {bare:.1f} s, ratio {gateway / bare:.2f}"
            )


def main(
    address: str = typer.Option("", help="a running gateway (unset: start a stack of its own)"),
    triton: str = typer.Option("", help="its Triton's gRPC address (propscope-dev up prints it)"),
    repeats: int = typer.Option(2, help="pictures (and bare runs), alternated"),
) -> None:
    if address and triton:
        measure(address, triton, repeats)
        return
    with tempfile.TemporaryDirectory() as run_dir:
        info = stack.up(Path(run_dir), gateway_port=stack.free_port())
        try:
            measure(info.gateway, info.triton_grpc, repeats)
        finally:
            stack.down(Path(run_dir))


if __name__ == "__main__":
    typer.run(main)
