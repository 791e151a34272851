"""The picture of docs/review.md: runs the example review against a running stack and
screenshots the top of its HTML report with headless Chromium.

    make up && .venv/bin/python bench/review_screenshot.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the screenshot helper the browser test uses

from tests.browser import screenshot_html  # noqa: E402

app = typer.Typer(add_completion=False)


@app.command()
def main(
    target: str = typer.Option("localhost:50051", help="The gateway."),
    spec: Path = typer.Option(ROOT / "examples" / "review" / "hue-shortcut.yaml"),
    out: Path = typer.Option(ROOT / ".run" / "review", help="Where the review's reports go."),
    png: Path = typer.Option(ROOT / "docs" / "review-report.png"),
    height: int = typer.Option(2900, help="Pixels of the page to keep, from the top."),
) -> None:
    command = [sys.executable, "-m", "propscope", "review", str(spec), "--target", target]
    finished = subprocess.run([*command, "--out", str(out), "--no-progress"], check=False)
    if finished.returncode not in (0, 1):
        raise typer.Exit(finished.returncode)
    screenshot_html(out / "review.html", png, width=1280, height=height)
    # A palette PNG: the page is flat colours and a few plots, a tenth of the size.
    Image.open(png).convert("RGB").quantize(256).save(png, optimize=True)
    typer.echo(f"wrote {png} ({png.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    app()
