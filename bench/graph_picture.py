"""The picture of the README and docs/causal-graph.md: the causal graph of synth_hue's
decision on an uncertain image (a circle of hue 72 degrees, radius 8, called "square"
with p = 0.5), drawn by the SDK's GraphResult.to_svg().

    make up && .venv/bin/python bench/graph_picture.py
"""

from __future__ import annotations

import io
from pathlib import Path

import typer
from PIL import Image

import propscope
from propscope_server.synthetic.world import Scene, render

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


@app.command()
def main(
    target: str = typer.Option("localhost:50051", help="The gateway."),
    svg: Path = typer.Option(ROOT / "docs" / "causal-graph.svg"),
    nodes_per_layer: int = typer.Option(5, help="Channels per layer past the pre-screen."),
    max_edges: int = typer.Option(50, help="Edges tested, the largest direct effects first."),
) -> None:
    scene = Scene(
        shape=0, hue_deg=72.0, radius_px=8.0, background=0.5, patch=False, center=(32.0, 32.0)
    )
    image = io.BytesIO()
    Image.fromarray(render(scene)).save(image, format="PNG")
    with propscope.Client(target) as client:
        result = client.graph(
            [image.getvalue()],
            model="synth_hue",
            layers=["features.0", "features.1", "features.2"],
            nodes_per_layer=nodes_per_layer,
            max_edges=max_edges,
        )
    svg.write_text(result.to_svg())
    kept = result.kept_nodes(0), result.kept_edges(0)
    typer.echo(f"wrote {svg}: {len(kept[0])} kept nodes, {len(kept[1])} kept edges")
    for warning in result.warnings:
        typer.echo(f"warning: {warning}")


if __name__ == "__main__":
    app()
