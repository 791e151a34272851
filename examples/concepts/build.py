"""Writes examples/concepts/: 24 held-out images of the patch-biased world (12 circles, 12
squares, every square with the colourful corner patch) and manifest.csv (image,label), the
class images of the concepts examples and of `make explore`. Deterministic; the committed
PNGs came from it.

    .venv/bin/python examples/concepts/build.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from propscope_server.synthetic.world import make_split

HERE = Path(__file__).parent
SEED = 90_000  # far from the training seeds (0..2000) and the validations'
LABELS = ("circle", "square")


def main() -> None:
    images, labels, _ = make_split("patch", 24, seed=SEED)
    (HERE / "images").mkdir(exist_ok=True)
    rows = ["image,label"]
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"images/{index:03d}_{LABELS[label]}.png"
        Image.fromarray(image).save(HERE / name)
        rows.append(f"{name},{label}")
    (HERE / "manifest.csv").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
