"""Procedural editor on rendered scenes: object mask, region-restricted edits, patch blending."""

from __future__ import annotations

import numpy as np
import pytest

from propscope_server.regions import border_colour
from propscope_server.synthetic.world import PATCH_BOX, Scene, colorful_patch, make_split, render
from propscope_server.triton_models.editors.procedural import edit_path, object_mask
from tests.photos import photo_scene

CENTER = (40.0, 42.0)
RADIUS = 12.0
DEFAULTS = {
    "region": "all",
    "amount": "",
    "position": "fixed",
    "patch_x": "0.05",
    "patch_y": "0.05",
    "patch_size": "0.22",
}
OPERATIONS = ["hue", "brightness", "saturation", "blur", "blend", "scale"]


def scene_image(shape: int = 0, hue: float = 0.0, patch: bool = True) -> np.ndarray:
    return render(Scene(shape, hue, RADIUS, 0.5, patch, CENTER))


def geometry(shape: int) -> np.ndarray:
    """The renderer's object pixels, recomputed from the scene."""
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    dx, dy = xs - CENTER[0], ys - CENTER[1]
    if shape == 0:
        return dx**2 + dy**2 <= RADIUS**2
    half = RADIUS * 0.886
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)


def edit(image, strengths, seed=0, **parameters):
    return edit_path(image, np.asarray(strengths, np.float32), {**DEFAULTS, **parameters}, seed)


@pytest.mark.parametrize("shape", [0, 1])
@pytest.mark.parametrize("hue", [0.0, 200.0])
def test_object_mask_is_the_object_not_the_patch(shape, hue):
    mask = object_mask(scene_image(shape, hue))
    np.testing.assert_array_equal(mask, geometry(shape))
    x, y, side = PATCH_BOX
    assert not mask[y : y + side, x : x + side].any()


def test_object_mask_of_a_plain_image_is_empty():
    assert not object_mask(np.full((16, 16, 3), 90, np.uint8)).any()


def test_hue_180_on_object_turns_red_cyan_and_keeps_background():
    image = scene_image(hue=0.0)
    out = edit(image, [1.0], operation="hue", region="object", amount="180")[0]
    inside = geometry(0)
    np.testing.assert_array_equal(out[~inside], image[~inside])
    r0, g0, b0 = image[inside].mean(axis=0)
    r, g, b = out[inside].mean(axis=0)
    assert r0 > 200 and g0 < 60 and b0 < 60  # red before
    assert r < 60 and g > 200 and b > 200  # cyan after


def test_brightness_on_background_keeps_object():
    image = scene_image(hue=120.0)
    out = edit(image, [1.0], operation="brightness", region="background", amount="0.3")[0]
    inside = geometry(0)
    np.testing.assert_array_equal(out[inside], image[inside])
    assert image[0, 0].tolist() == [128, 128, 128]
    assert 204 <= out[0, 0].min() and out[0, 0].max() <= 205  # 128 + 0.3 * 255


@pytest.mark.parametrize(
    ("amount", "grey", "red"),
    [
        ("1", [255] * 3, [255] * 3),  # clipped, not wrapped
        ("-1", [0] * 3, [0] * 3),
        ("0.002", [129] * 3, [231, 35, 35]),  # + 0.51 rounds up
        ("-0.2", [77] * 3, [179, 0, 0]),  # - 51
    ],
)
def test_brightness_by_hand(amount, grey, red):
    image = scene_image(hue=0.0)
    assert image[0, 0].tolist() == [128] * 3 and image[42, 40].tolist() == [230, 34, 34]
    out = edit(image, [1.0], operation="brightness", amount=amount)[0]
    assert out[0, 0].tolist() == grey and out[42, 40].tolist() == red


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("region", ["all", "object", "background"])
def test_output_shape_and_dtype(operation, region):
    image = scene_image(patch=False) if operation == "blend" else scene_image()
    out = edit(image, [0.25, 0.5, 1.0], operation=operation, region=region)
    assert out.shape == (3, 64, 64, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[-1], image)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_strength_zero_is_the_original(operation):
    image = scene_image(hue=90.0)  # a yellow-green object and the colorful patch
    np.testing.assert_array_equal(edit(image, [0.0], operation=operation)[0], image)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_strength_zero_on_the_object_is_the_original(operation):
    image = scene_image(hue=0.0)  # a red object survives the HSV round trip exactly
    np.testing.assert_array_equal(
        edit(image, [0.0], operation=operation, region="object")[0], image
    )


def test_blend_pastes_the_patch_at_strength_one_and_averages_at_half():
    image = scene_image(patch=False)
    x, y, side = PATCH_BOX
    full, half = edit(image, [1.0, 0.5], operation="blend")
    np.testing.assert_array_equal(full[y : y + side, x : x + side], colorful_patch(side))
    np.testing.assert_array_equal(full, scene_image(patch=True))
    average = (image[y : y + side, x : x + side].astype(float) + colorful_patch(side)) / 2
    assert np.abs(half[y : y + side, x : x + side] - average).max() <= 0.5
    outside = np.ones((64, 64), bool)
    outside[y : y + side, x : x + side] = False
    np.testing.assert_array_equal(half[outside], image[outside])


def changed_box(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((before != after).any(axis=-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_random_position_depends_on_the_seed_and_stays_inside():
    image = scene_image(patch=False)
    boxes = set()
    for seed in range(8):
        out = edit(image, [1.0], seed=seed, operation="blend", position="random", patch_size="20")
        x0, y0, x1, y1 = changed_box(image, out[0])
        assert (x1 - x0, y1 - y0) == (20, 20)
        assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
        again = edit(image, [1.0], seed=seed, operation="blend", position="random", patch_size="20")
        np.testing.assert_array_equal(again, out)
        boxes.add((x0, y0))
    assert len(boxes) > 1


def test_fixed_patch_is_clamped_inside_the_image():
    image = scene_image(patch=False)
    out = edit(image, [1.0], operation="blend", patch_x="4000", patch_y="60", patch_size="10")
    assert changed_box(image, out[0]) == (54, 54, 64, 64)


def test_hue_rotation_by_a_full_turn_returns_the_image():
    image = scene_image(hue=90.0)
    np.testing.assert_array_equal(edit(image, [1.0], operation="hue", amount="360")[0], image)


@pytest.mark.parametrize("shape", [0, 1])
@pytest.mark.parametrize("amount", [0.4, -0.5])
def test_scale_resizes_the_object_about_its_centre(shape, amount):
    image = scene_image(shape, hue=0.0, patch=False)
    (scaled,) = edit(image, [1.0], operation="scale", amount=str(amount))
    before, after = object_mask(image), object_mask(scaled)
    # Area goes with the square of the factor, up to the pixel grid.
    assert after.sum() / before.sum() == pytest.approx((1 + amount) ** 2, rel=0.1)
    np.testing.assert_allclose(np.argwhere(after).mean(0), np.argwhere(before).mean(0), atol=0.5)
    # The object keeps its colour; what it left is background.
    assert set(map(tuple, scaled[after].tolist())) == set(map(tuple, image[before].tolist()))
    assert (scaled[~after] == image[0, 0]).all()


def test_scale_grows_monotonically_with_the_strength():
    image = scene_image(patch=False)
    areas = [
        object_mask(frame).sum() for frame in edit(image, [0.25, 0.5, 0.75, 1.0], operation="scale")
    ]
    assert areas == sorted(areas) and areas[0] > object_mask(image).sum()


@pytest.mark.parametrize("shape", [(1, 40, 3), (40, 1, 3), (1, 1, 3)])
@pytest.mark.parametrize("position", ["fixed", "random"])
def test_a_patch_fits_an_image_thinner_than_two_pixels(shape, position):
    """Found by the fuzz test: the patch side was at least 2 even on a 1-pixel image."""
    image = np.zeros(shape, np.uint8)
    path = edit(image, [0.5, 1.0], operation="blend", position=position)
    assert path.shape == (2, *shape)


@pytest.mark.parametrize(
    ("height", "width", "box"),
    [
        (64, 64, (3, 3, 14)),  # PATCH_BOX: the synthetic world's patch
        (768, 1024, (51, 38, 169)),  # 0.05 * 1024, 0.05 * 768, 0.22 * 768
        (500, 333, (17, 25, 73)),  # 0.05 * 333, 0.05 * 500, 0.22 * 333
    ],
)
def test_the_default_patch_is_a_fraction_of_the_image(height, width, box):
    image = np.full((height, width, 3), 128, np.uint8)
    out = edit(image, [1.0], operation="blend")[0]
    x, y, side = box
    assert changed_box(image, out) == (x, y, x + side, y + side)
    if height == 64:
        assert box == PATCH_BOX


@pytest.mark.parametrize(
    ("given", "pixels"),
    [
        ({"patch_size": "0.5"}, {"patch_size": "32"}),
        ({"patch_x": "0.25", "patch_y": "0.125"}, {"patch_x": "16", "patch_y": "8"}),
        ({"patch_size": "14.4"}, {"patch_size": "14"}),  # pixels, rounded
        ({"patch_size": "1"}, {"patch_size": "2"}),  # 1 means one pixel, raised to 2
    ],
)
def test_fractions_below_one_pixels_from_one(given, pixels):
    image = scene_image(patch=False)
    np.testing.assert_array_equal(
        edit(image, [1.0], operation="blend", **given),
        edit(image, [1.0], operation="blend", **pixels),
    )


def test_the_old_pixel_defaults_give_the_same_synthetic_paths():
    images, _, _ = make_split("patch", 20, seed=3)
    old = {"patch_x": "3", "patch_y": "3", "patch_size": "14"}
    for seed, image in enumerate(images):
        for position in ("fixed", "random"):
            np.testing.assert_array_equal(
                edit(image, [0.5, 1.0], seed, operation="blend", position=position),
                edit(image, [0.5, 1.0], seed, operation="blend", position=position, **old),
            )


def test_scale_uncovers_exactly_the_plain_background_on_rendered_scenes():
    """The fill from the surroundings is the border colour on a plain background,
    patches included: the synthetic world's scale paths are what they were."""
    images, _, scenes = make_split("none", 60, seed=5)
    assert sum(scene.patch for scene in scenes) > 10
    for image in images:
        before = object_mask(image)
        (scaled,) = edit(image, [1.0], operation="scale", amount="-0.5")
        np.testing.assert_array_equal(scaled[~before], image[~before])
        background = np.round(border_colour(image)).astype(np.uint8)
        is_background = (scaled[before] == background).all(axis=-1)
        assert 0.5 < is_background.mean() < 0.9  # about 1 - 0.5**2 of the object uncovered
        object_colours = {tuple(c) for c in image[before].tolist()}
        assert {tuple(c) for c in scaled[before][~is_background].tolist()} <= object_colours


def test_scale_continues_a_textured_background_instead_of_a_flat_blob():
    ys, xs = np.mgrid[0:128, 0:128]
    background = 100 + 40 * xs / 127 + 6 * np.sin(ys / 3.0)  # within 24 levels of its median
    image = np.repeat(background[..., None], 3, axis=-1).round().astype(np.uint8)
    disc = (xs - 63.5) ** 2 + (ys - 63.5) ** 2 <= 30**2
    image[disc] = [210, 40, 40]
    (scaled,) = edit(image, [1.0], operation="scale", amount="-0.5")
    uncovered = disc & ~object_mask(scaled)
    trend = (100 + 40 * xs / 127)[uncovered]  # the texture is not predictable; the trend is
    filled = scaled[uncovered][:, 0].astype(float)
    flat = np.round(border_colour(image))[0]
    error, flat_error = np.abs(filled - trend).mean(), np.abs(flat - trend).mean()
    assert error < 0.75 * flat_error, (error, flat_error)
    assert np.corrcoef(filled, xs[uncovered])[0, 1] > 0.9  # it follows the gradient
    assert (scaled[~disc] == image[~disc]).all()


def test_scale_on_a_photo_like_image_leaves_no_flat_blob():
    photo = photo_scene(240, 320, 0)
    (scaled,) = edit(photo.image, [1.0], operation="scale", amount="-0.5")
    uncovered = object_mask(photo.image) & ~object_mask(scaled)
    colours = np.unique(scaled[uncovered].reshape(-1, 3), axis=0)
    assert len(colours) > 100  # the old fill was one colour
