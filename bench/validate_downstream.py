"""The paper's Table 2 on the synthetic world: predict whether an intervention
changes the model's output, from E|∇X| (through the service) and from the change
of six Captum saliency maps (in process, on the same weights).

Writes docs/results/downstream_table.{md,json}: accuracy ± std over seeds, per model.

    make validate     # or, with the stack up: .venv/bin/python bench/validate_downstream.py
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import typer

import propscope
from propscope_server.validation import downstream, saliency
from propscope_server.validation.runner import (
    PROPERTIES,
    SHORTCUTS,
    TEST_SET_SEED,
    explain_all,
    held_out_images,
)
from propscope_server.validation.tables import markdown_table, write_results

app = typer.Typer(add_completion=False)
logger = logging.getLogger("validate_downstream")


@app.command()
def main(
    target: str = typer.Option("localhost:50051", help="The gateway."),
    per_class: int = typer.Option(16, help="Test images per class and seed."),
    seeds: int = typer.Option(3, help="Seeds: each draws its own test images."),
    steps: int = typer.Option(10, help="Edited images per path (N)."),
    workers: int = typer.Option(4, help="Requests in flight."),
    threads: int = typer.Option(2, help="Torch threads for the saliency maps."),
    out: Path = typer.Option(Path("docs/results"), help="Where the table goes."),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)
    started = time.monotonic()
    per_seed: dict[str, list[dict]] = {model: [] for model in SHORTCUTS}
    seconds: dict[str, float] = {}
    with propscope.Client(target, timeout=600) as client:
        for seed in range(seeds):
            images, labels = held_out_images(per_class, TEST_SET_SEED + 1 + seed)
            runs = explain_all(
                client,
                images,
                labels,
                SHORTCUTS,
                steps=steps,
                seed=seed,
                workers=workers,
                keep_last_image=True,
            )
            for model in SHORTCUTS:
                per_seed[model].append(
                    downstream.predictor_accuracies(runs, images, model, seconds=seconds)
                )
                logger.info("seed %d, %s: %s", seed, model, per_seed[model][-1])
    total = time.monotonic() - started
    predictors = [downstream.OURS, *saliency.METHODS]
    summary = {
        model: {
            name: (
                float(np.mean([s[name] for s in rows])),
                float(np.std([s[name] for s in rows], ddof=1)) if len(rows) > 1 else 0.0,
            )
            for name in [*predictors, "positive rate", "max |p_torch - p_service|"]
        }
        for model, rows in per_seed.items()
    }
    table_rows = [
        (
            name,
            *(
                f"{100 * summary[m][name][0]:.1f} ± {100 * summary[m][name][1]:.1f}"
                for m in SHORTCUTS
            ),
        )
        for name in predictors
    ]
    table_rows.append(
        (
            "always 'unchanged'",
            *(f"{100 * (1 - summary[m]['positive rate'][0]):.1f}" for m in SHORTCUTS),
        )
    )
    pairs = 2 * per_class * len(PROPERTIES)
    text = "\n\n".join(
        [
            "# Downstream table (the paper's Table 2), synthetic world",
            f"Task: does the intervention (x_N, the strongest edit) change the model's output? "
            f"Changed = the predicted class differs from the original's, or the target "
            f"probability moves by >= {downstream.CHANGE_THRESHOLD}. Per model and seed: "
            f"{2 * per_class} held-out images x {len(PROPERTIES)} properties = "
            f"{pairs} pairs; {seeds} seeds, each with its own images. Predictors: E|∇X| from the "
            f"service (N = {steps}) and, per baseline, the mean squared difference of its "
            "attribution maps of x_0 and x_N for the original's predicted class. Each predictor "
            "gets its accuracy-maximising threshold. Accuracy in %, mean ± std over seeds. "
            f"Written by `bench/validate_downstream.py` in {total:.0f} s.",
            markdown_table(("predictor", *SHORTCUTS), table_rows),
            "Saliency time (all seeds and models): "
            + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
            + ". Largest gap between the in-process torch model and the service on the "
            f"originals' target probability: {max(summary[m]['max |p_torch - p_service|'][0] for m in SHORTCUTS):.2g}.",
        ]
    )
    data = {
        "config": {
            "per_class": per_class,
            "seeds": seeds,
            "steps": steps,
            "seconds": total,
            "change_threshold": downstream.CHANGE_THRESHOLD,
        },
        "per_seed": per_seed,
        "summary": summary,
        "saliency_seconds": seconds,
    }
    write_results(out, "downstream_table", text, data)
    print(text)


if __name__ == "__main__":
    app()
