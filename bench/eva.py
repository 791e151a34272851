"""EVA's cost: seconds per map through the gateway side by side with the same d + 1 bound
rows sent straight to Triton by tritonclient (the rows the gateway's loop cannot beat),
their ratio, per bound (IBP, CROWN) and for the hybrid from each declared layer, on a
stack started for the benchmark or one you name:

    make bench        # or: .venv/bin/python bench/eva.py
    .venv/bin/python bench/eva.py --address localhost:50084 --triton localhost:<Triton gRPC>
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc
import typer

import propscope
from propscope_dev import stack
from propscope_dev.validation import eva
from propscope_server.open_contract import BOUND_CODES

MODELS = ("synth_patch", "synth_hue_fp32")
EPSILON = 8 / 255
SAMPLES = 256


def direct_seconds(
    triton: triton_grpc.InferenceServerClient,
    model: str,
    found: propscope.Attribution,
    image: np.ndarray,
    layer_index: int,
) -> tuple[float, np.ndarray]:
    """The map's d + 1 bound rows (row 0 every region perturbed, row 1 + u region u held
    fixed) sent to Triton in batches of its max_batch_size, one call after the other;
    samples on row 0 only when verified, on every row for the hybrid, each row seeded as the
    gateway seeds it (the request's seed, 0, plus the row's index). Returns the seconds
    and the rows' overlap bounds, max_{c != y} BOUND_MARGIN."""
    served = eva.served_input(triton, model)
    config = triton.get_model_config(model, as_json=True)["config"]
    batch = int(config.get("max_batch_size", 1))
    mean, std = found.preprocessing.mean or (), found.preprocessing.std or ()
    centre = eva.model_input(image, served, mean, std)
    height, width = served.dims[1:] if served.channels_first else served.dims[:2]
    grid = found.grid.shape[0]
    radii = [eva.radius_elements(served, found.eva.epsilon_input)] + [
        eva.radius_elements(
            served, found.eva.epsilon_input, eva.region_pixels(u, grid, height, width)
        )
        for u in range(grid * grid)
    ]
    radius = np.stack(radii).reshape(len(radii), -1).astype(np.float32)
    rows = len(radius)
    samples = np.full(rows, SAMPLES if layer_index >= 0 else 0, np.int32)
    samples[0] = SAMPLES
    columns = {
        "BOUND_CLASS": np.full(rows, found.target_class, np.int32),
        "BOUND_METHOD": np.full(rows, BOUND_CODES[found.eva.bound], np.int32),
        "BOUND_LAYER": np.full(rows, layer_index, np.int32),
        "BOUND_SAMPLES": samples,
        "BOUND_SEED": np.arange(rows, dtype=np.int32),  # the request's seed 0 + the row
    }
    margins = []
    started = time.perf_counter()
    for start in range(0, rows, batch):
        stop = min(rows, start + batch)
        inputs = [_tensor(served.name, np.repeat(centre[None], stop - start, axis=0))]
        inputs.append(_tensor("BOUND_RADIUS", radius[start:stop]))
        inputs += [_tensor(n, v[start:stop].reshape(-1, 1)) for n, v in columns.items()]
        result = triton.infer(
            model, inputs, outputs=[triton_grpc.InferRequestedOutput("BOUND_MARGIN")]
        )
        margins.append(result.as_numpy("BOUND_MARGIN"))
    seconds = time.perf_counter() - started
    margin = np.concatenate(margins).astype(np.float64)
    others = np.delete(margin, found.target_class, axis=1)
    return seconds, others.max(axis=1)


def _tensor(name: str, array: np.ndarray) -> triton_grpc.InferInput:
    datatype = {np.uint8: "UINT8", np.int32: "INT32", np.float32: "FP32"}[array.dtype.type]
    entry = triton_grpc.InferInput(name, list(array.shape), datatype)
    entry.set_data_from_numpy(np.ascontiguousarray(array))
    return entry


def measure(address: str, triton_url: str, images: int, models: list[str]) -> None:
    triton = triton_grpc.InferenceServerClient(triton_url)
    with propscope.Client(address, timeout=600) as client:
        served = {m.name: m for m in client.list_models()}
        for model in models:
            layers = [layer.name for layer in served[model].layers]
            modes = [("ibp", ""), ("crown", ""), *(("crown", layer) for layer in layers)]
            seed = int.from_bytes(os.urandom(3), "big")
            warm, *fresh = eva.model_images(model, images + 1, seed=seed)
            eva.attribute_eva(client, warm, model, EPSILON)
            for bound, layer in modes:
                gateway, direct, agree = [], [], True
                for image in fresh:
                    found = eva.attribute_eva(client, image, model, EPSILON, bound, layer, SAMPLES)
                    if found.cache_hit:
                        raise RuntimeError("a cached map: the benchmark needs fresh images")
                    gateway.append(found.total_ms / 1000.0)
                    index = layers.index(layer) if layer else -1
                    seconds, bounds = direct_seconds(triton, model, found, image, index)
                    direct.append(seconds)
                    agree &= bool(
                        np.allclose(bounds[0], found.eva.overlap_bound, rtol=1e-6, atol=1e-6)
                        and np.allclose(
                            bounds[1:], found.eva.region_bounds.reshape(-1), rtol=1e-6, atol=1e-6
                        )
                    )
                print(
                    f"{model} eps 8/255 {eva.mode_name(bound, layer)}: "
                    f"{found.eva.bound_passes} bound rows + {found.eva.sample_passes} sampled "
                    f"passes; gateway {np.mean(gateway):.3f} s per map, direct bound rows "
                    f"{np.mean(direct):.3f} s, ratio {np.mean(gateway) / np.mean(direct):.2f}; "
                    f"overlap_bound {found.eva.overlap_bound:.3f}, sampled "
                    f"{found.eva.sampled_overlap:.3f}; direct rows give the same bounds: {agree}"
                )


def main(
    models: list[str] = typer.Option(list(MODELS), "--model", help="the models to measure"),
    address: str = typer.Option("", help="a running gateway (unset: start a stack of its own)"),
    triton: str = typer.Option("", help="its Triton's gRPC address (propscope-dev up prints it)"),
    images: int = typer.Option(3, help="fresh scenes per model and mode"),
) -> None:
    if address and triton:
        measure(address, triton, images, models)
        return
    with tempfile.TemporaryDirectory() as run_dir:
        info = stack.up(Path(run_dir), gateway_port=stack.free_port())
        try:
            measure(info.gateway, info.triton_grpc, images, models)
        finally:
            stack.down(Path(run_dir))


if __name__ == "__main__":
    typer.run(main)
