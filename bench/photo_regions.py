"""What the procedural editor's automatic regions, scale and patch do on a photo-like
image, and what a caller's own region does instead: the figure of docs/editors.md
("On photographs") and the reliability warning it quotes.

    .venv/bin/python bench/photo_regions.py            # writes docs/photo-regions.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from propscope_server.regions import box_mask, composite, estimate_object_mask  # noqa: E402
from propscope_server.triton_models.editors.procedural import edit_path  # noqa: E402
from tests.photos import photo_scene  # noqa: E402

HEIGHT, WIDTH = 768, 1024
TILE = (320, 240)
CAPTION = 34
DEFAULTS = {"region": "all", "amount": "", "position": "fixed"} | {
    "patch_x": "0.05",
    "patch_y": "0.05",
    "patch_size": "0.22",
}


def edit(image: np.ndarray, **parameters: str) -> np.ndarray:
    """The edit at strength 1."""
    return edit_path(image, np.array([1.0], np.float32), {**DEFAULTS, **parameters}, 0)[0]


def tile(image: np.ndarray, caption: str) -> Image.Image:
    out = Image.new("RGB", (TILE[0], TILE[1] + CAPTION), "white")
    out.paste(Image.fromarray(image).resize(TILE, Image.BILINEAR), (0, CAPTION))
    ImageDraw.Draw(out).multiline_text((4, 2), caption, fill="black", spacing=2)
    return out


def panels() -> list[tuple[np.ndarray, str]]:
    photo = photo_scene(HEIGHT, WIDTH, 0)
    image = photo.image
    estimate = estimate_object_mask(image)
    print(estimate.warning)
    shown_mask = image.copy()
    shown_mask[estimate.mask] = (0.4 * shown_mask[estimate.mask] + [153, 153, 0]).astype(np.uint8)
    ball = photo.object.astype(np.float32)
    hue_all = edit(image, operation="hue", amount="180")
    dark_all = edit(image, operation="brightness", amount="-0.3")
    box = box_mask(0.0, 0.0, 1.0, 0.55, False, HEIGHT, WIDTH)  # the sky
    return [
        (image, "1024x768 photo-like image\n(tests/photos.py)"),
        (shown_mask, f"automatic 'object' (yellow):\n{estimate.mask.mean():.0%} of the image"),
        (edit(image, operation="hue", region="object", amount="180"), "region=object, hue 180"),
        (
            edit(image, operation="brightness", region="background", amount="-0.3"),
            "region=background, brightness -0.3",
        ),
        (edit(image, operation="scale", amount="-0.5"), "scale -0.5 (automatic object)"),
        (
            edit(image, operation="blend", patch_size="14"),
            "blend, patch_size=14 (px):\nthe old default",
        ),
        (edit(image, operation="blend"), "blend, default patch_size=0.22:\n169 px at 1024x768"),
        (composite(hue_all, image, ball), "caller's mask (the ball), hue 180"),
        (composite(dark_all, image, box), "caller's box (top 55%),\nbrightness -0.3"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "photo-regions.png")
    arguments = parser.parse_args()
    tiles = [tile(image, caption) for image, caption in panels()]
    columns = 3
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * TILE[0], rows * (TILE[1] + CAPTION)), "white")
    for index, item in enumerate(tiles):
        sheet.paste(item, ((index % columns) * TILE[0], (index // columns) * (TILE[1] + CAPTION)))
    # 256 dithered colours: the sensor noise would make a full-colour PNG over 500 KB.
    sheet = sheet.quantize(
        256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG
    )
    sheet.save(arguments.out, optimize=True)
    print(f"{arguments.out}: {arguments.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
