"""Writes the example image set of the review specs: held-out images of the synthetic world
(no patch, hues from the ranges the hue-biased model was trained on, independent of the class)
with their labels in manifest.csv. Deterministic; the committed images came from this.

    .venv/bin/python examples/review/generate_images.py
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from propscope_dev.validation.runner import held_out_images
from propscope_server.synthetic.world import CLASS_NAMES

HERE = Path(__file__).parent
PER_CLASS = 12


def main() -> None:
    images, labels = held_out_images(PER_CLASS)
    folder = HERE / "images"
    folder.mkdir(exist_ok=True)
    rows = []
    for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        name = f"images/{index:03d}_{CLASS_NAMES[label]}.png"
        Image.fromarray(pixels).save(HERE / name, optimize=True)
        rows.append({"image": name, "label": int(label)})
    with (HERE / "manifest.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
