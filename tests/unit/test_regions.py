"""regions.py: the automatic split's reliability, caller masks and boxes, compositing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from propscope_server.regions import (
    MAX_MASK_PIXELS,
    box_mask,
    composite,
    decode_mask,
    estimate_object_mask,
    object_mask,
    object_mask_reliability,
    unchanged,
)
from propscope_server.synthetic.world import make_split
from propscope_server.triton_models.editors.procedural import edit_path
from tests.photos import photo_scene

PHOTO_SIZES = [(768, 1024), (500, 333), (224, 224), (64, 64)]


def encode(array: np.ndarray, format: str = "PNG", mode: str | None = None, **info) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, format=format, **info)
    return buffer.getvalue()


@pytest.mark.parametrize("bias", ["none", "hue", "patch"])
def test_the_synthetic_world_is_always_reliable(bias):
    images, _, scenes = make_split(bias, 80, seed=11)
    assert any(scene.patch for scene in scenes)
    for image in images:
        estimate = estimate_object_mask(image)
        assert estimate.reasons == () and estimate.reliable and estimate.warning is None
        assert 0.05 < estimate.mask.mean() < 0.25
        assert object_mask_reliability(image) is None


@pytest.mark.parametrize(("height", "width"), PHOTO_SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_photo_like_images_are_flagged_with_numbers(height, width, seed):
    estimate = estimate_object_mask(photo_scene(height, width, seed).image)
    assert not estimate.reliable
    text = " ".join(estimate.reasons)
    assert "of the image (more than 50%)" in text
    assert "of the border pixels differ from their median" in text
    warning = estimate.warning
    assert warning.startswith("the automatic object/background split is unreliable")
    assert "Property.region" in warning


def test_each_reason_alone():
    big = np.full((64, 64, 3), 120, np.uint8)
    big[4:60, 4:60] = [200, 30, 30]
    assert estimate_object_mask(big).reasons == (
        "the 'object' covers 77% of the image (more than 50%)",
    )

    bracket = np.full((64, 64, 3), 120, np.uint8)
    bracket[:, :2] = bracket[:2, :6] = bracket[-2:, :6] = [30, 30, 200]
    reasons = estimate_object_mask(bracket).reasons
    assert "the 'object' touches 3 of the 4 image borders" in reasons
    assert not any("covers" in reason for reason in reasons)

    plain = np.full((32, 48, 3), 90, np.uint8)
    assert estimate_object_mask(plain).reasons == (
        "no pixel differs from the border colour by more than 24 levels",
    )

    noisy_border = np.full((64, 64, 3), 120, np.uint8)
    noisy_border[20:40, 20:40] = [200, 30, 30]
    noisy_border[0, ::2] = noisy_border[-1, ::2] = noisy_border[::2, 0] = 250
    (reason,) = estimate_object_mask(noisy_border).reasons
    assert reason.startswith("the background is not one colour: 38% of the border pixels")


def test_the_photo_object_is_what_a_caller_mask_gives():
    photo = photo_scene(500, 333, 0)
    automatic = object_mask(photo.image)
    # The automatic split takes most of the background for the object...
    assert automatic.mean() > 0.5 and (automatic & ~photo.object).sum() > photo.object.sum()
    # ...a caller's mask confines the edit to the ball exactly.
    path = edit_path(
        photo.image,
        np.array([0.5, 1.0], np.float32),
        {"operation": "hue", "region": "all", "amount": "180"},
        0,
    )
    confined = composite(path, photo.image, photo.object.astype(np.float32))
    for edited in confined:
        np.testing.assert_array_equal(edited[~photo.object], photo.image[~photo.object])
    np.testing.assert_array_equal(confined[:, photo.object], path[:, photo.object])
    assert (confined[-1][photo.object] != photo.image[photo.object]).any(axis=-1).mean() > 0.9


# --- decode_mask -----------------------------------------------------------------------


def test_grey_png_of_the_image_size_is_exact():
    grey = (np.arange(48 * 64) % 256).astype(np.uint8).reshape(48, 64)
    np.testing.assert_array_equal(decode_mask(encode(grey), 48, 64), grey / np.float32(255))
    assert decode_mask(encode(grey), 48, 64).dtype == np.float32


def test_a_smaller_mask_is_scaled_bilinearly():
    half = np.zeros((16, 16), np.uint8)
    half[:, 8:] = 255
    mask = decode_mask(encode(half), 48, 64)
    assert mask.shape == (48, 64) and mask.min() == 0.0 and mask.max() == 1.0
    assert (mask[:, :28] == 0).all() and (mask[:, 36:] == 1).all()
    edge = mask[0, 28:36]
    assert ((edge > 0) & (edge < 1)).any() and (np.diff(edge) >= 0).all()
    larger = decode_mask(encode(np.kron(half, np.ones((20, 20), np.uint8))), 48, 64)
    assert (larger[:, :30] == 0).all() and (larger[:, 34:] == 1).all()


def test_alpha_wins_over_grey():
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: the grey level would select everything
    rgba[:, 5:, 3] = 255
    mask = decode_mask(encode(rgba), 10, 20)
    assert (mask[:, :5] == 0).all() and (mask[:, 5:] == 1).all()
    la = decode_mask(encode(rgba, mode="LA"), 10, 20)
    np.testing.assert_array_equal(la, mask)


def test_palette_transparency_is_alpha():
    indices = np.zeros((8, 8), np.uint8)
    indices[:, 4:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    mask = decode_mask(buffer.getvalue(), 8, 8)
    assert (mask[:, :4] == 0).all() and (mask[:, 4:] == 1).all()


def test_jpeg_and_16_bit_grey():
    block = np.zeros((32, 32), np.uint8)
    block[8:24, 8:24] = 255
    jpeg = decode_mask(encode(block, format="JPEG", quality=95), 32, 32)
    assert jpeg[16, 16] > 0.95 and jpeg[0, 0] < 0.05
    wide = np.zeros((4, 4), np.uint16)
    wide[0, 0] = 65535
    wide[0, 1] = 32768
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    mask = decode_mask(buffer.getvalue(), 4, 4)
    assert mask[0, 0] == 1.0 and mask[0, 1] == pytest.approx(0.5, abs=1e-4) and mask[1:].sum() == 0


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "the mask is empty"),
        (b"not an image at all", "not a readable PNG or JPEG image"),
        (encode(np.full((8, 8), 255, np.uint8))[:40], "not a readable PNG or JPEG image"),
        (encode(np.full((8, 8), 255, np.uint8), format="GIF"), "not a readable PNG or JPEG"),
        (encode(np.zeros((8, 8), np.uint8)), "the mask is all zero"),
        (encode(np.zeros((8, 8, 4), np.uint8)), "the mask is all zero"),
    ],
)
def test_bad_masks_are_refused_with_the_fix(data, needle):
    with pytest.raises(ValueError, match=needle):
        decode_mask(data, 8, 8)


def test_masks_over_the_pixel_limit_are_refused():
    data = encode(np.full((100, 120), 255, np.uint8))
    with pytest.raises(ValueError, match="the mask is 120x100 pixels, more than the 10000"):
        decode_mask(data, 8, 8, max_pixels=10_000)
    assert decode_mask(data, 8, 8, max_pixels=12_000).shape == (8, 8)


# 30000 x 30000 is over Pillow's own threshold: refused with our limit and its size too.
@pytest.mark.parametrize("side", [9000, 30000])
def test_a_huge_declared_size_is_refused_before_decoding(side):
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey, no pixel data
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    needle = f"the mask is {side}x{side} pixels, more than the {MAX_MASK_PIXELS} allowed"
    with pytest.raises(ValueError, match=needle):
        decode_mask(data, 8, 8)


# --- box_mask --------------------------------------------------------------------------


def test_box_in_fractions_and_pixels():
    mask = box_mask(0.25, 0.5, 0.75, 1.0, False, 8, 16)
    assert mask.dtype == np.float32 and mask.shape == (8, 16)
    expected = np.zeros((8, 16), np.float32)
    expected[4:8, 4:12] = 1
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(box_mask(4, 4, 12, 8, True, 8, 16), expected)
    np.testing.assert_array_equal(box_mask(0, 0, 1, 1, False, 8, 16), np.ones((8, 16)))


@pytest.mark.parametrize(
    ("box", "needle"),
    [
        ((0.0, 0.0, 1.5, 1.0, False), r"box right is 1.5, not a fraction in \[0, 1\]"),
        ((-0.1, 0.0, 1.0, 1.0, False), r"box left is -0.1, not a fraction in \[0, 1\]"),
        ((0.5, 0.0, 0.5, 1.0, False), r"box left \(0.5\) must be less than right \(0.5\)"),
        ((0.0, 0.9, 1.0, 0.1, False), r"box top \(0.9\) must be less than bottom \(0.1\)"),
        ((0.0, 0.0, float("nan"), 1.0, False), "box right must be a finite number"),
        ((0, 0, 17, 8, True), r"box right is 17 px, outside the image's width of 16 px"),
        ((0, 0, 16, 9, True), r"box bottom is 9 px, outside the image's height of 8 px"),
        ((0.50, 0.0, 0.52, 1.0, False), "covers no whole pixel of the 16x8 image once rounded"),
        ((3.2, 0, 3.4, 8, True), "make it at least one pixel wide and high"),
    ],
)
def test_bad_boxes_are_refused_with_the_fix(box, needle):
    with pytest.raises(ValueError, match=needle):
        box_mask(*box, height=8, width=16)


# --- composite and unchanged -----------------------------------------------------------


def test_composite_keeps_mask_zero_exact_and_blends_half_to_even():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    path = rng.integers(0, 256, (2, 3, 6, 7, 3), dtype=np.uint8)  # [S, N, H, W, 3]
    mask = rng.choice([0.0, 1.0, 0.5, 0.25], size=(6, 7)).astype(np.float32)
    out = composite(path, original, mask)
    assert out.shape == path.shape and out.dtype == np.uint8
    assert (out[..., mask == 0, :] == original[mask == 0]).all()
    np.testing.assert_array_equal(out[..., mask == 1, :], path[..., mask == 1, :])
    expected = np.rint(original + 0.25 * (path.astype(float) - original))
    np.testing.assert_array_equal(out[..., mask == 0.25, :], expected[..., mask == 0.25, :])
    pair = composite(
        np.array([[[[11, 12, 0]]]], np.uint8),
        np.array([[[10, 11, 1]]], np.uint8),
        np.full((1, 1), 0.5),
    )
    assert pair.tolist() == [[[[10, 12, 0]]]]  # 10.5 -> 10, 11.5 -> 12, 0.5 -> 0


def test_composite_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="must share the image's height and width"):
        composite(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5)))


def test_a_hue_edit_of_a_grey_image_is_unchanged():
    grey = np.repeat(np.linspace(0, 255, 32 * 32).reshape(32, 32, 1), 3, axis=-1).astype(np.uint8)
    strengths = np.linspace(0.1, 1.0, 10).astype(np.float32)
    parameters = {"operation": "hue", "region": "all", "amount": ""}
    assert unchanged(edit_path(grey, strengths, parameters, 0), grey)
    coloured = make_split("none", 1, seed=0)[0][0]
    assert not unchanged(edit_path(coloured, strengths, parameters, 0), coloured)
    assert unchanged(np.stack([coloured] * 3)[None], coloured)
