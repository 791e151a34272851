"""docs/concepts.png: what synth_patch sees in its class "square", from a real run on a
stack started for it. The bank of examples/concepts' 12 squares (service defaults), then
per concept (the 3 most important): its importance and logit share, its 5 top crops, and
its MACO picture (the concept's direction at features.2, crops 1.0 -> 0.5 of the picture);
last, the class's own MACO picture. Deterministic for the seeds.

    .venv/bin/python bench/concepts_picture.py
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

import propscope
from propscope_dev import stack

ROOT = Path(__file__).parents[1]
MODEL, CLASS, SHOWN, CROPS = "synth_patch", 1, 3, 5
TILE, GAP, TEXT = 96, 8, 34
BOXES = {"box_start": 1.0, "box_end": 0.5}


def tile(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((TILE, TILE), Image.NEAREST)


def draw(client: propscope.Client) -> Image.Image:
    squares = sorted((ROOT / "examples" / "concepts" / "images").glob("*square.png"))
    bank = client.fit_concepts([p.read_bytes() for p in squares], MODEL, target_class=CLASS)
    rows = []
    for concept in bank.concepts[:SHOWN]:
        crops = [tile(Image.open(io.BytesIO(c.png))) for c in concept.top_crops[:CROPS]]
        picture = client.visualize(
            MODEL, bank_id=bank.bank_id, concept=concept.index, seed=0, **BOXES
        ).picture
        label = (
            f"concept {concept.index}: Sobol importance {concept.sobol_total_importance:.3f}, "
            f"logit share {concept.logit_share:.2f} - top crops, then its MACO picture"
        )
        rows.append((label, [*crops, tile(picture)]))
    whole = client.visualize(MODEL, class_index=CLASS, seed=0, **BOXES)
    rows.append(
        (
            f"class {CLASS} (square): MACO picture (p = {whole.probability(CLASS):.3f}) and its "
            "transparency",
            [tile(whole.picture), tile(Image.fromarray((255 * whole.alpha).astype("uint8")))],
        )
    )
    width = GAP + (CROPS + 1) * (TILE + GAP) + GAP
    height = GAP + len(rows) * (TEXT + TILE + GAP)
    canvas = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(canvas)
    y = GAP
    for label, tiles in rows:
        pen.text((GAP, y + 10), label, fill="black")
        y += TEXT
        for index, image in enumerate(tiles):
            x = GAP + index * (TILE + GAP) + (GAP if index == len(tiles) - 1 else 0)
            canvas.paste(image, (x, y))
        y += TILE + GAP
    return canvas


def main() -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        info = stack.up(Path(run_dir), gateway_port=stack.free_port())
        try:
            with propscope.Client(info.gateway, timeout=600) as client:
                draw(client).save(ROOT / "docs" / "concepts.png")
        finally:
            stack.down(Path(run_dir))
    print(f"wrote {ROOT / 'docs' / 'concepts.png'}")


if __name__ == "__main__":
    main()
