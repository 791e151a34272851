"""Diffusion editors, measured side by side in one run on the tiny pipelines:

1. edits/s of propscope's batched path vs the reference way (one diffusers
   pipeline call per edit, pipeline already loaded), in process, N = 10 and 50;
2. one explanation through the gateway vs the editor's own raw call on Triton
   (the gateway's overhead: classification, scoring, cache, gRPC);
3. cold vs warm cache for a second classifier.

    make bench        # or: .venv/bin/python bench/editors.py --repeats 3
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import typer
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from propscope_server.editor_contract import (
    SCHEMA_PARAMETER,
    EditorSchema,
    canonical_parameters,
)
from propscope_server.synthetic.world import Scene, render
from propscope_server.triton_models.editors.diffusion.ip2p import InstructPix2PixEditor
from propscope_server.triton_models.editors.diffusion.ledits import (
    INVERSION_SCHEDULERS,
    LeditsEditor,
)
from propscope_server.triton_models.editors.diffusion.pipelines import Runtime, scheduler
from propscope_server.triton_models.editors.diffusion.sdedit import SDEditEditor
from propscope_server.triton_models.editors.diffusion.tiny_pipelines import build

if TYPE_CHECKING:  # the gateway parts import these lazily: the in-process part runs on a
    # GPU machine that has torch and diffusers but no propscope client or Triton wheel
    import tritonclient.grpc as triton_grpc

    import propscope

REPOSITORY = Path(__file__).resolve().parents[1]
IMAGE = render(Scene(0, 10.0, 13.0, 0.5, False, (32.0, 32.0)))
DENOISING_STEPS = 10
PARAMETERS = {
    "ip2p": {"instruction": "make it blue", "num_inference_steps": str(DENOISING_STEPS)},
    "sdedit": {
        "source_prompt": "a red circle",
        "target_prompt": "a blue circle in snow",
        "num_inference_steps": str(DENOISING_STEPS),
    },
    "ledits": {"editing_prompt": "snow", "num_inversion_steps": str(DENOISING_STEPS)},
}
EDITORS = {"ip2p": InstructPix2PixEditor, "sdedit": SDEditEditor, "ledits": LeditsEditor}


def cpu_config(editor: str) -> dict[str, str]:
    """The parameters of the editor's CPU config.pbtxt, the one the stack serves."""
    path = REPOSITORY / f"deploy/triton/models/{editor}/config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


def resolved(editor: str) -> dict[str, str]:
    """The editor's parameters with the CPU config's defaults filled in."""
    schema = EditorSchema.from_json(cpu_config(editor)[SCHEMA_PARAMETER])
    return schema.resolve(PARAMETERS[editor])


def reference_edit(
    name: str, editor, image: np.ndarray, parameters: dict[str, str], strength: float, seed: int
):
    """One diffusers pipeline call for one edit: the paper's loop, pipeline loaded."""
    pipe, image = editor.pipeline, Image.fromarray(image)
    generator = torch.Generator("cpu").manual_seed(seed)
    steps = int(parameters.get("num_inference_steps", DENOISING_STEPS))
    if name == "ip2p":
        low, high = float(parameters["min_text_guidance"]), float(parameters["max_text_guidance"])
        pipe.scheduler = scheduler(parameters["scheduler"], pipe.scheduler.config)
        return pipe(
            parameters["instruction"],
            image=image,
            num_inference_steps=steps,
            guidance_scale=low + strength * (high - low),
            image_guidance_scale=float(parameters["image_guidance"]),
            generator=generator,
        ).images[0]
    if name == "sdedit":
        pipe.scheduler = scheduler(parameters["scheduler"], pipe.scheduler.config)
        prompts, negatives = pipe.encode_prompt(
            [parameters["source_prompt"], parameters["target_prompt"]], pipe.device, 1, True
        )
        return pipe(
            prompt_embeds=torch.lerp(prompts[:1], prompts[1:], strength),
            negative_prompt_embeds=negatives[:1],
            image=image,
            strength=float(parameters["noise_strength"]),
            guidance_scale=float(parameters["guidance_scale"]),
            num_inference_steps=steps,
            generator=generator,
        ).images[0]
    pipe.scheduler = INVERSION_SCHEDULERS[parameters["scheduler"]](pipe.scheduler.config)
    pipe.invert(
        image=image,
        num_inversion_steps=int(parameters["num_inversion_steps"]),
        skip=float(parameters["skip"]),
        generator=generator,
    )
    return pipe(
        editing_prompt=[parameters["editing_prompt"]],
        edit_guidance_scale=strength * float(parameters["max_edit_guidance"]),
        edit_threshold=float(parameters["edit_threshold"]),
        use_cross_attn_mask=False,
        use_intersect_mask=False,
    ).images[0]


def best_of(repeats: int, run, *args) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - started)
    return min(times)


def reference_path(name: str, editor, image, parameters: dict[str, str], strengths) -> None:
    for strength in strengths:
        reference_edit(name, editor, image, parameters, float(strength), 0)


def in_process(
    repeats: int, pipelines: dict[str, Path], device: str, resolution: int, sizes: list[int]
) -> None:
    image = np.asarray(
        Image.fromarray(IMAGE).resize((resolution, resolution), Image.Resampling.BICUBIC)
    )
    print(
        f"\n1. edits/s in process on {device}, tiny pipelines {resolution}x{resolution}, "
        f"{DENOISING_STEPS} denoising steps, torch threads {torch.get_num_threads()}, "
        "max_unet_batch of the CPU config"
    )
    print(
        f"{'editor':8} {'N':>4} {'per-edit loop s':>16} {'batched path s':>15} {'loop edits/s':>13} {'ours edits/s':>13} {'speed-up':>9}"
    )
    for name, editor_class in EDITORS.items():
        folder = pipelines["tiny-ip2p" if name == "ip2p" else "tiny-sd"]
        config = cpu_config(name)
        runtime = Runtime(
            folder,
            device=device,
            resolution=resolution,
            max_unet_batch=int(config["max_unet_batch"]),
        )
        editor = editor_class(runtime)
        parameters = resolved(name)
        for n in sizes:
            strengths = np.arange(1, n + 1, dtype=np.float32) / n
            loop = best_of(1, reference_path, name, editor, image, parameters, strengths)
            ours = best_of(repeats, editor.edit, image, strengths, parameters, [0])
            print(
                f"{name:8} {n:>4} {loop:>16.2f} {ours:>15.2f} {n / loop:>13.1f} {n / ours:>13.1f} {loop / ours:>8.2f}x"
            )


def timed_explain(client: propscope.Client, model: str, prop: str, steps: int, seed: int):
    import propscope

    started = time.perf_counter()
    # Fixed paths: the editor's raw call below edits exactly `steps` images.
    events = list(client.explain(IMAGE, model, [prop], steps=steps, seed=seed, path_mode="fixed"))
    elapsed = time.perf_counter() - started
    (result,) = [e for e in events if isinstance(e, propscope.PropertyResult)]
    assert result.ok, result.error
    return elapsed, result.cache_hits


def raw_editor_call(
    triton: triton_grpc.InferenceServerClient, editor: str, steps: int, seed: int
) -> float:
    """The editor's own call for one path (a batch of one), timed from the client."""
    from propscope_dev.triton_stream import stream_path

    strengths = np.arange(1, steps + 1, dtype=np.float32) / steps
    tensors = {
        "IMAGE": IMAGE,
        "STRENGTHS": strengths,
        "PARAMETERS": np.array([canonical_parameters(resolved(editor)).encode()], dtype=np.object_),
        "SEED": np.array([seed], dtype=np.int64),
    }
    started = time.perf_counter()
    stream_path(triton, editor, {name: array[None] for name, array in tensors.items()}, 600)
    return time.perf_counter() - started


def batched_properties(client: propscope.Client, triton, repeats: int, steps: int) -> None:
    """Four InstructPix2Pix properties in one explanation (concurrent editor calls that
    Triton's dynamic batcher hands over together) vs the same four one at a time."""
    instructions = ["make it blue", "add snow", "make it darker", "add a ruler"]
    properties = [
        f"p{i}=ip2p:instruction={text},num_inference_steps={DENOISING_STEPS}"
        for i, text in enumerate(instructions)
    ]
    together, apart = [], []
    before = triton.get_inference_statistics("ip2p", as_json=True)["model_stats"][0]
    for repeat in range(repeats):
        started = time.perf_counter()
        list(
            client.explain(
                IMAGE, "synth_hue", properties, steps=steps, seed=30_000 + repeat, path_mode="fixed"
            )
        )
        together.append(time.perf_counter() - started)
        started = time.perf_counter()
        for prop in properties:
            list(
                client.explain(
                    IMAGE, "synth_hue", [prop], steps=steps, seed=40_000 + repeat, path_mode="fixed"
                )
            )
        apart.append(time.perf_counter() - started)
    after = triton.get_inference_statistics("ip2p", as_json=True)["model_stats"][0]
    requests = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    together_ms, apart_ms = (statistics.median(x) * 1e3 for x in (together, apart))
    print(f"\n4. four ip2p properties in one explanation vs one at a time, median of {repeats}")
    print(
        f"   together {together_ms:8.1f} ms   one at a time {apart_ms:8.1f} ms   ratio {apart_ms / together_ms:5.2f}x"
    )
    print(f"   Triton: {requests} editor requests in {executions} executions (dynamic batching)")


def triton_metric(url: str, name: str, model: str) -> float:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    pattern = rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, body, re.MULTILINE))


def cancellation(client: propscope.Client, metrics_url: str, repeats: int, steps: int) -> None:
    """From the client closing its stream to the editor reporting the edit cancelled."""
    units, cancelled = "propscope_editor_work_units_total", "propscope_editor_cancelled_total"
    long_edit = "blue=ip2p:instruction=make it blue,num_inference_steps=400"
    latencies = []
    deadline = time.monotonic() + 600  # a hang guard for the polling below
    for repeat in range(repeats):
        before = triton_metric(metrics_url, cancelled, "ip2p")
        started_units = triton_metric(metrics_url, units, "ip2p")
        events = client.explain(
            IMAGE, "synth_hue", [long_edit], steps=steps, seed=50_000 + repeat, path_mode="fixed"
        )
        next(events)
        while triton_metric(metrics_url, units, "ip2p") < started_units + 5:
            assert time.monotonic() < deadline, "the editor never started"
            time.sleep(0.05)
        closed = time.perf_counter()
        events.close()
        while triton_metric(metrics_url, cancelled, "ip2p") < before + 1:
            assert time.monotonic() < deadline, "the editor never saw the cancellation"
            time.sleep(0.01)
        latencies.append(time.perf_counter() - closed)
    print(f"\n5. cancellation: client closes the stream -> the editor stops (ip2p, {steps} edits)")
    print(
        f"   {', '.join(f'{x * 1e3:.0f}' for x in latencies)} ms (one denoising step of the path, plus polling)"
    )


def through_the_gateway(repeats: int, steps: int) -> None:
    import tritonclient.grpc as triton_grpc

    import propscope
    from propscope_dev import stack

    print(
        f"\n2./3. through the stack (Triton CPU, Redis, gateway), path of {steps} edits, median of {repeats}"
    )
    print(
        f"{'editor':8} {'raw editor ms':>14} {'explain cold ms':>16} {'overhead':>9} {'explain warm ms':>16} {'cold/warm':>10}"
    )
    with tempfile.TemporaryDirectory() as run_dir:
        info = stack.up(Path(run_dir), gateway_port=stack.free_port())
        triton = triton_grpc.InferenceServerClient(info.triton_grpc)
        try:
            with propscope.Client(info.gateway, timeout=600) as client:
                for editor in EDITORS:
                    prop = f"edit={editor}:" + ",".join(
                        f"{k}={v}" for k, v in PARAMETERS[editor].items()
                    )
                    timed_explain(client, "synth_unbiased", prop, steps, seed=10_000)  # warm-up
                    raw, cold, warm = [], [], []
                    for repeat in range(repeats):
                        raw.append(raw_editor_call(triton, editor, steps, seed=20_000 + repeat))
                        cold_s, hits = timed_explain(client, "synth_hue", prop, steps, seed=repeat)
                        assert hits == 0
                        warm_s, hits = timed_explain(
                            client, "synth_patch", prop, steps, seed=repeat
                        )
                        assert hits == 1
                        cold.append(cold_s)
                        warm.append(warm_s)
                    raw_ms, cold_ms, warm_ms = (
                        statistics.median(x) * 1e3 for x in (raw, cold, warm)
                    )
                    print(
                        f"{editor:8} {raw_ms:>14.1f} {cold_ms:>16.1f} {cold_ms / raw_ms:>8.3f}x {warm_ms:>16.1f} {cold_ms / warm_ms:>9.1f}x"
                    )
                batched_properties(client, triton, repeats, steps)
                cancellation(client, info.triton_metrics_url, repeats, steps)
        finally:
            triton.close()
            stack.down(Path(run_dir))


def main(
    repeats: int = 3,
    steps: int = 10,
    sizes: list[int] = typer.Option([10, 50], help="path lengths N of the in-process part"),
    device: str = typer.Option("cpu", help="in-process part: cpu, or cuda on a GPU machine"),
    resolution: int = typer.Option(64, help="in-process part: image size (GPU runs: 256)"),
    gateway: bool = typer.Option(True, help="also measure through the local CPU stack"),
) -> None:
    if device == "cpu":
        torch.set_num_threads(1)  # as inside Triton (OMP_NUM_THREADS=1)
    with tempfile.TemporaryDirectory() as folder:
        in_process(repeats, build(Path(folder)), device, resolution, sizes)
    if gateway:
        through_the_gateway(repeats, steps)


if __name__ == "__main__":
    typer.run(main)
