"""docs/eva.png: what EVA's map shows on synth_patch, from a real run. Two of the
validation's patch scenes (tools/propscope_dev/validation/attribution.py), each: the image,
EVA's map at the default 8/255 (CROWN), Sobol's map (grid 8, N 32, as the validation runs
it) and EVA's map at 1/255, the patch outlined; below, for the first scene, the verified
overlap bound and the sampled overlap (the attack's best) against eps: the true adversarial
overlap lies between them; below 0 everywhere (bound < 0) is certified, a sampled overlap at
or above 0 is not robust. Deterministic for the scenes and the service's seeds.

    .venv/bin/python bench/eva_picture.py                      # starts a stack of its own
    .venv/bin/python bench/eva_picture.py --address localhost:50088
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import typer  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import propscope  # noqa: E402
from propscope_dev import stack  # noqa: E402
from propscope_dev.validation import attribution as va  # noqa: E402
from propscope_dev.validation import eva  # noqa: E402

ROOT = Path(__file__).parents[1]
MODEL, SCENES = "synth_patch", 2
CURVE_EPSILONS = (0.25, 0.5, 1, 2, 4, 8, 16)  # in 1/255
SOBOL = {"method": "sobol", "grid_size": 8, "nb_design": 32, **eva.SOBOL_SETTINGS}


def eva_map(client: propscope.Client, image: np.ndarray, epsilon: float) -> propscope.Attribution:
    return client.attribute(image, MODEL, method="eva", grid_size=eva.GRID, epsilon=epsilon)


def outline_patch(axes: plt.Axes) -> None:
    x, y, side = va.PATCH_BOX
    axes.add_patch(Rectangle((x - 0.5, y - 0.5), side, side, fill=False, ec="lime", lw=1.5))


def show_map(axes: plt.Axes, found: propscope.Attribution, title: str) -> None:
    size = va.IMAGE_SIZE
    axes.imshow(found.grid, cmap="inferno", extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    outline_patch(axes)
    share = va.positive_share(found.grid, va.region_cells(va.patch_region(), found.grid.shape[0]))
    axes.set_title(f"{title}\n{share:.0%} of the mass on the patch", fontsize=8)


def draw(client: propscope.Client) -> plt.Figure:
    images = va.patch_images(SCENES)
    figure = plt.figure(figsize=(8.4, 8.2))
    grid = figure.add_gridspec(SCENES + 1, 4, height_ratios=[1] * SCENES + [1.35], hspace=0.45)
    for index, image in enumerate(images):
        default = eva_map(client, image, 8 / 255)
        small = eva_map(client, image, 1 / 255)
        sobol = client.attribute(image, MODEL, **SOBOL)
        axes = [figure.add_subplot(grid[index, column]) for column in range(4)]
        axes[0].imshow(image)
        outline_patch(axes[0])
        axes[0].set_title(
            f"scene {index}, class {default.target_class}\n"
            f"8/255: {default.eva.decision.replace('_', ' ')}",
            fontsize=8,
        )
        show_map(axes[1], default, "EVA, eps 8/255 (CROWN)")
        show_map(axes[2], sobol, "Sobol (grid 8, N 32)")
        show_map(axes[3], small, "EVA, eps 1/255 (CROWN)")
        for each in axes:
            each.set_xticks([])
            each.set_yticks([])
    figure.suptitle(
        f"{MODEL}: where EVA puts its mass (each map on its own colour scale; the patch "
        "outlined in green)",
        fontsize=9,
    )
    curve = figure.add_subplot(grid[SCENES, :])
    found = [eva_map(client, images[0], epsilon / 255).eva for epsilon in CURVE_EPSILONS]
    bounds = [f.overlap_bound for f in found]
    sampled = [f.sampled_overlap for f in found]
    curve.fill_between(
        CURVE_EPSILONS,
        sampled,
        bounds,
        color="tab:orange",
        alpha=0.2,
        label="where the true overlap lies",
    )
    curve.plot(
        CURVE_EPSILONS, bounds, "o-", color="tab:red", label="overlap bound (CROWN, verified)"
    )
    curve.plot(
        CURVE_EPSILONS, sampled, "s-", color="tab:blue", label="sampled overlap (attack's best)"
    )
    curve.axhline(0.0, color="black", lw=1)
    curve.set_xscale("log", base=2)
    curve.set_xticks(CURVE_EPSILONS, [f"{e:g}/255" for e in CURVE_EPSILONS])
    curve.set_yscale("symlog", linthresh=10)
    curve.set_xlabel("eps (l_inf radius, fraction of the pixel range)")
    curve.set_ylabel("max_{c != y} f_c - f_y")
    curve.set_title(
        "scene 0: bound below 0 = certified; sampled overlap at or above 0 = not robust; "
        "between: undecided",
        fontsize=8,
    )
    curve.legend(fontsize=7, loc="upper left")
    curve.grid(alpha=0.3)
    return figure


def main(
    address: str = typer.Option("", help="a running gateway (unset: start a stack of its own)"),
) -> None:
    out = ROOT / "docs" / "eva.png"
    if address:
        with propscope.Client(address, timeout=600) as client:
            draw(client).savefig(out, dpi=110, bbox_inches="tight")
    else:
        with tempfile.TemporaryDirectory() as run_dir:
            info = stack.up(Path(run_dir), gateway_port=stack.free_port())
            try:
                with propscope.Client(info.gateway, timeout=600) as client:
                    draw(client).savefig(out, dpi=110, bbox_inches="tight")
            finally:
                stack.down(Path(run_dir))
    print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
