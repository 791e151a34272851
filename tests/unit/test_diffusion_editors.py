"""The diffusion editors on tiny random pipelines (built offline): each path equals
what the diffusers pipeline makes edit by edit, the shared work is done once,
and chunking, seeds and sizes behave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from propscope_server.editor_contract import EditCancelled, EditRequest, InvalidParameters
from propscope_server.synthetic.world import Scene, render
from propscope_server.triton_models.editors.diffusion.ip2p import InstructPix2PixEditor
from propscope_server.triton_models.editors.diffusion.ledits import LeditsEditor
from propscope_server.triton_models.editors.diffusion.pipelines import (
    SCHEDULERS,
    Runtime,
    scheduler,
    working_size,
)
from propscope_server.triton_models.editors.diffusion.sdedit import SDEditEditor
from propscope_server.triton_models.editors.diffusion.tiny_pipelines import build

IMAGE = render(Scene(0, 10.0, 13.0, 0.5, False, (32.0, 32.0)))
STRENGTHS = np.array([0.25, 0.5, 0.75, 1.0], np.float32)
IP2P = dict(
    instruction="make it blue",
    negative_prompt="",
    min_text_guidance="1.01",
    max_text_guidance="12.5",
    image_guidance="2.5",
    num_inference_steps="4",
    scheduler="euler",
)
SDEDIT = dict(
    source_prompt="a red circle",
    target_prompt="a blue square",
    negative_prompt="",
    noise_strength="0.6",
    guidance_scale="7.5",
    num_inference_steps="6",
    scheduler="ddim",
)
LEDITS = dict(
    editing_prompt="snow",
    reverse_direction="false",
    max_edit_guidance="10",
    edit_threshold="0.9",
    edit_warmup_steps="0",
    source_prompt="",
    source_guidance_scale="3.5",
    num_inversion_steps="5",
    skip="0.15",
    scheduler="dpmsolver++",
)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("pipelines"))


@pytest.fixture(scope="module")
def ip2p(pipelines) -> InstructPix2PixEditor:
    return InstructPix2PixEditor(Runtime(pipelines["tiny-ip2p"], resolution=64))


@pytest.fixture(scope="module")
def sdedit(pipelines) -> SDEditEditor:
    return SDEditEditor(Runtime(pipelines["tiny-sd"], resolution=64))


@pytest.fixture(scope="module")
def ledits(pipelines) -> LeditsEditor:
    return LeditsEditor(Runtime(pipelines["tiny-sd"], resolution=64))


def as_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_ip2p_path_equals_the_pipeline_edit_by_edit(ip2p, name):
    path = ip2p.edit(IMAGE, STRENGTHS, {**IP2P, "scheduler": name}, [7])
    pipe = ip2p.pipeline
    pipe.scheduler = scheduler(name, pipe.scheduler.config)
    for step, strength in enumerate(STRENGTHS):
        reference = pipe(
            "make it blue",
            image=Image.fromarray(IMAGE),
            num_inference_steps=4,
            guidance_scale=float(1.01 + strength * (12.5 - 1.01)),
            image_guidance_scale=2.5,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="np",
        ).images[0]
        assert max_difference(path[0, step], as_uint8(reference)) <= 1
    assert max_difference(path[0, 0], path[0, -1]) > 10  # the guidance sweep changes the image


def test_sdedit_path_equals_img2img_with_interpolated_prompt_embeddings(sdedit):
    path = sdedit.edit(IMAGE, STRENGTHS, SDEDIT, [5])
    pipe = sdedit.pipeline
    pipe.scheduler = scheduler("ddim", pipe.scheduler.config)
    prompts, negatives = pipe.encode_prompt(["a red circle", "a blue square"], "cpu", 1, True)
    for step, strength in enumerate(STRENGTHS):
        reference = pipe(
            prompt_embeds=torch.lerp(prompts[:1], prompts[1:], float(strength)),
            negative_prompt_embeds=negatives[:1],
            image=Image.fromarray(IMAGE),
            strength=0.6,
            guidance_scale=7.5,
            num_inference_steps=6,
            generator=torch.Generator("cpu").manual_seed(5),
            output_type="np",
        ).images[0]
        assert max_difference(path[0, step], as_uint8(reference)) <= 1


def test_ledits_path_equals_the_pipeline_with_one_inversion(ledits):
    path = ledits.edit(IMAGE, STRENGTHS, LEDITS, [3])
    pipe = ledits.pipeline
    for step, strength in enumerate(STRENGTHS):
        pipe.invert(
            image=Image.fromarray(IMAGE),
            num_inversion_steps=5,
            skip=0.15,
            generator=torch.Generator("cpu").manual_seed(3),
        )
        reference = pipe(
            editing_prompt=["snow"],
            edit_guidance_scale=float(strength * 10),
            edit_threshold=0.9,
            use_cross_attn_mask=False,
            use_intersect_mask=False,
            output_type="np",
        ).images[0]
        assert max_difference(path[0, step], as_uint8(reference)) <= 1


def unet_rows(editor, call) -> int:
    """Rows (images) through the UNet while `call` runs."""
    rows = []
    hook = editor.pipeline.unet.register_forward_hook(
        lambda m, args, out: rows.append(len(args[0]))
    )
    try:
        call()
    finally:
        hook.remove()
    return sum(rows)


@pytest.mark.parametrize(
    ("editor", "parameters", "branches", "shared_branches", "steps"),
    [("ip2p", IP2P, 3, 3, 4), ("sdedit", SDEDIT, 2, 1, 3)],
)
def test_path_wide_branches_run_once_per_seed_at_the_first_step(
    request, editor, parameters, branches, shared_branches, steps
):
    model = request.getfixturevalue(editor)
    seeds, items = [1, 2], 2 * len(STRENGTHS)
    rows = unet_rows(model, lambda: model.edit(IMAGE, STRENGTHS, parameters, seeds))
    first_step = shared_branches * len(seeds) + (branches - shared_branches) * items
    assert rows == first_step + (steps - 1) * branches * items
    assert rows < steps * branches * items  # what a plain batched pipeline call runs


def test_chunking_the_batch_does_not_change_the_path(pipelines):
    whole = InstructPix2PixEditor(Runtime(pipelines["tiny-ip2p"], resolution=64))
    chunked = InstructPix2PixEditor(
        Runtime(pipelines["tiny-ip2p"], resolution=64, max_unet_batch=4)
    )
    a = whole.edit(IMAGE, STRENGTHS, IP2P, [9, 10])
    b = chunked.edit(IMAGE, STRENGTHS, IP2P, [9, 10])
    assert max_difference(a, b) <= 1


@pytest.mark.parametrize(
    ("editor", "parameters"), [("ip2p", IP2P), ("sdedit", SDEDIT), ("ledits", LEDITS)]
)
def test_each_seed_gives_the_path_it_gives_alone(request, editor, parameters):
    model = request.getfixturevalue(editor)
    together = model.edit(IMAGE, STRENGTHS, parameters, [11, 12])
    alone = model.edit(IMAGE, STRENGTHS, parameters, [12])
    assert together.shape == (2, len(STRENGTHS), *IMAGE.shape)
    assert max_difference(together[1], alone[0]) <= 1
    assert max_difference(together[0], together[1]) > 0  # another seed, another path


def test_an_image_of_another_size_comes_back_at_its_size(sdedit):
    image = np.asarray(Image.fromarray(IMAGE).resize((56, 40)))
    path = sdedit.edit(image, STRENGTHS[:2], SDEDIT, [0])
    assert path.shape == (1, 2, 40, 56, 3) and path.dtype == np.uint8


def test_working_size_keeps_the_aspect_and_the_multiple():
    assert working_size(64, 64, 64, 64) == (64, 64)
    assert working_size(480, 640, 512, 64) == (384, 512)
    assert working_size(10, 1000, 512, 64) == (64, 512)


def test_a_cancelled_edit_stops_between_denoising_steps(ip2p):
    calls = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 4:
            raise EditCancelled

    def edit() -> None:
        with pytest.raises(EditCancelled):
            ip2p.edit(IMAGE, STRENGTHS, {**IP2P, "num_inference_steps": "50"}, [0], checkpoint)

    rows = unet_rows(ip2p, edit)
    # checkpoints: before the shared first step, before step 0 (all reused), before
    # step 1, before step 2 (cancelled): 48 of the 50 steps never ran
    assert len(calls) == 4
    assert rows == 3 + 3 * len(STRENGTHS)


def test_an_unknown_scheduler_is_refused(ip2p, ledits):
    with pytest.raises(InvalidParameters, match="scheduler"):
        ip2p.edit(IMAGE, STRENGTHS, {**IP2P, "scheduler": "euler_ancestral"}, [0])
    with pytest.raises(InvalidParameters, match="scheduler"):
        ledits.edit(IMAGE, STRENGTHS, {**LEDITS, "scheduler": "ddim"}, [0])


def test_sdedit_refuses_a_noise_depth_with_no_denoising_step(sdedit):
    with pytest.raises(InvalidParameters, match="noise_strength"):
        sdedit.edit(IMAGE, STRENGTHS, {**SDEDIT, "noise_strength": "0.05"}, [0])


def test_a_missing_weights_folder_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="make pipelines"):
        SDEditEditor(Runtime(tmp_path / "nothing"))


def unet_calls(editor, call) -> int:
    calls = []
    hook = editor.pipeline.unet.register_forward_hook(lambda m, args, out: calls.append(1))
    try:
        call()
    finally:
        hook.remove()
    return len(calls)


def test_requests_handed_over_together_denoise_in_lockstep(ip2p):
    other_image = render(Scene(1, 200.0, 10.0, 0.3, True, (30.0, 34.0)))
    requests = [
        EditRequest(IMAGE, STRENGTHS, IP2P, [1]),
        EditRequest(other_image, STRENGTHS[:2], {**IP2P, "instruction": "add snow"}, [2, 3]),
    ]
    together = []
    calls = unet_calls(ip2p, lambda: together.extend(ip2p.edit_many(requests)))
    assert calls == int(IP2P["num_inference_steps"])  # one UNet pass per step for both
    for request, result in zip(requests, together, strict=True):
        alone = ip2p.edit(request.image, request.strengths, request.parameters, request.seeds)
        assert result.shape == alone.shape
        assert max_difference(result, alone) <= 1


def test_requests_with_other_timesteps_are_denoised_apart(sdedit):
    deeper = {**SDEDIT, "noise_strength": "0.9"}
    results = sdedit.edit_many(
        [EditRequest(IMAGE, STRENGTHS, SDEDIT, [4]), EditRequest(IMAGE, STRENGTHS, deeper, [4])]
    )
    assert max_difference(results[0], sdedit.edit(IMAGE, STRENGTHS, SDEDIT, [4])) <= 1
    assert max_difference(results[1], sdedit.edit(IMAGE, STRENGTHS, deeper, [4])) <= 1


def test_a_cancelled_request_leaves_its_batch_mates_alone(ip2p):
    def cancelled() -> None:
        raise EditCancelled

    bad = {**IP2P, "scheduler": "nope"}
    results = ip2p.edit_many(
        [
            EditRequest(IMAGE, STRENGTHS, IP2P, [5], cancelled),
            EditRequest(IMAGE, STRENGTHS, bad, [5]),
            EditRequest(IMAGE, STRENGTHS, IP2P, [5]),
        ]
    )
    assert isinstance(results[0], EditCancelled)
    assert isinstance(results[1], InvalidParameters)
    assert max_difference(results[2], ip2p.edit(IMAGE, STRENGTHS, IP2P, [5])) <= 1


def test_an_error_in_one_request_fails_that_request_only(sdedit):
    def broken() -> None:
        raise RuntimeError("out of memory")

    failed, fine = sdedit.edit_many(
        [
            EditRequest(IMAGE, STRENGTHS, SDEDIT, [1], broken),
            EditRequest(IMAGE, STRENGTHS, SDEDIT, [1]),
        ]
    )
    assert isinstance(failed, RuntimeError)
    assert fine.shape == (1, len(STRENGTHS), *IMAGE.shape)


def test_ledits_keeps_the_unets_attention_after_inverting(ledits):
    before = {name: type(p) for name, p in ledits.pipeline.unet.attn_processors.items()}
    ledits.edit(IMAGE, STRENGTHS[:1], LEDITS, [0])
    after = {name: type(p) for name, p in ledits.pipeline.unet.attn_processors.items()}
    assert after == before


def test_ledits_checks_for_cancellation_before_each_inversion(ledits, monkeypatch):
    calls = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 3:  # the request starts, seed 1 inverts, then seed 2 is stopped
            raise EditCancelled

    inversions = []
    invert = ledits.pipeline.invert
    monkeypatch.setattr(
        ledits.pipeline, "invert", lambda **kwargs: inversions.append(1) or invert(**kwargs)
    )
    with pytest.raises(EditCancelled):
        ledits.edit(IMAGE, STRENGTHS, LEDITS, [1, 2], checkpoint)
    assert len(inversions) == 1


def test_each_denoising_step_is_reported_and_reporting_changes_no_pixel(sdedit):
    reports = []
    silent = sdedit.edit(IMAGE, STRENGTHS[-2:], SDEDIT, [3, 8])
    reported = sdedit.edit(
        IMAGE, STRENGTHS[-2:], SDEDIT, [3, 8], progress=lambda *report: reports.append(report)
    )
    steps = int(6 * 0.6)  # num_inference_steps x noise_strength
    assert reports == [(step, steps + 1) for step in range(1, steps + 1)]  # + 1: decoding
    assert np.array_equal(silent, reported)


def test_requests_denoised_in_lockstep_each_hear_of_their_own_progress(ip2p):
    first, second = [], []
    ip2p.edit_many(
        [
            EditRequest(IMAGE, STRENGTHS[:1], IP2P, [1], progress=lambda *r: first.append(r)),
            EditRequest(IMAGE, STRENGTHS[:2], IP2P, [2], progress=lambda *r: second.append(r)),
        ]
    )
    steps = int(IP2P["num_inference_steps"])
    assert first == second == [(step, steps + 1) for step in range(1, steps + 1)]
