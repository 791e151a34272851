"""The paper's Table 2 on the synthetic world: predict whether an intervention
changes the model's output, from E|∇X| (through the service) and from the change
of six Captum saliency maps (in process, on the same weights). The edit sizes are
calibrated per model so that about half of its pairs change the output.

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
from propscope_dev.validation import downstream, saliency
from propscope_dev.validation.runner import (
    SHORTCUTS,
    TEST_SET_SEED,
    explain_all,
    held_out_images,
)
from propscope_dev.validation.tables import markdown_table, write_results

app = typer.Typer(add_completion=False)
logger = logging.getLogger("validate_downstream")
# The calibration images' seed: apart from the test images' (TEST_SET_SEED + 1 + seed).
CALIBRATION_SEED = TEST_SET_SEED + 300


def mean_and_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


@app.command()
def main(
    target: str = typer.Option("localhost:50051", help="The gateway."),
    per_class: int = typer.Option(16, help="Test images per class and seed."),
    seeds: int = typer.Option(3, help="Seeds: each draws its own test images and edit sizes."),
    calibration_per_class: int = typer.Option(
        32, help="Images per class (apart from the test images) that set the size ranges."
    ),
    steps: int = typer.Option(10, help="Edited images per path (N)."),
    workers: int = typer.Option(4, help="Requests in flight."),
    threads: int = typer.Option(2, help="Torch threads for the saliency maps."),
    out: Path = typer.Option(Path("docs/results"), help="Where the table goes."),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)
    started = time.monotonic()
    per_seed: dict[str, list[downstream.Accuracies]] = {model: [] for model in SHORTCUTS}
    by_property: dict[str, dict[str, list[bool]]] = {model: {} for model in SHORTCUTS}
    with propscope.Client(target, timeout=600) as client:
        calibration_images, _ = held_out_images(calibration_per_class, CALIBRATION_SEED)
        ranges = {
            model: downstream.size_ranges(
                downstream.calibrate(client, calibration_images, model, workers=workers)
            )
            for model in SHORTCUTS
        }
        calibration_s = time.monotonic() - started
        for seed in range(seeds):
            images, _ = held_out_images(per_class, TEST_SET_SEED + 1 + seed)
            for model in SHORTCUTS:
                interventions = downstream.random_interventions(len(images), seed, ranges[model])
                runs = explain_all(
                    client,
                    images,
                    [model],
                    interventions.__getitem__,
                    steps=steps,
                    seed=seed,
                    workers=workers,
                    keep_last_image=True,
                    no_op_unchanged=True,
                )
                for run in runs:
                    by_property[model].setdefault(run.property_name, []).append(
                        downstream.output_changed(run)
                    )
                result = downstream.predictor_accuracies(runs, images, model, seed=seed)
                per_seed[model].append(result)
                logger.info("seed %d, %s: %s", seed, model, result)
    total = time.monotonic() - started
    predictors = [downstream.OURS, *saliency.METHODS]
    summary = {
        model: {name: mean_and_std([r.by_predictor[name] for r in results]) for name in predictors}
        for model, results in per_seed.items()
    }
    positive = {m: mean_and_std([r.positive_rate for r in rs]) for m, rs in per_seed.items()}
    gap = max(r.max_probability_gap for rs in per_seed.values() for r in rs)
    seconds = {
        method: sum(r.saliency_seconds[method] for rs in per_seed.values() for r in rs)
        for method in saliency.METHODS
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
            *(f"{100 * (1 - positive[m][0]):.1f} ± {100 * positive[m][1]:.1f}" for m in SHORTCUTS),
        )
    )
    table_rows.append(
        (
            "share of pairs changed",
            *(f"{100 * positive[m][0]:.1f} ± {100 * positive[m][1]:.1f}" for m in SHORTCUTS),
        )
    )
    range_rows = [
        (
            model,
            name,
            "left out (never changes the output)"
            if not r.included
            else downstream.AXES[name].describe(r.smallest, r.largest),
            f"{100 * r.most_possible_rate:.0f}%",
            f"{100 * r.target_rate:.0f}%" if r.included else "",
            f"{100 * r.expected_rate:.0f}%" if r.included else "",
            (f"{100 * np.mean(by_property[model][name]):.0f}% of {len(by_property[model][name])}")
            if name in by_property[model]
            else "",
        )
        for model, model_ranges in ranges.items()
        for name, r in model_ranges.items()
    ]
    pairs = {m: sum(len(v) for v in by_property[m].values()) // seeds for m in SHORTCUTS}
    text = "\n\n".join(
        [
            "# Downstream table (the paper's Table 2), synthetic world",
            "Task: does the intervention x_N (the strongest edit of the path) change the model's "
            "output? Changed = the predicted class differs from the original's, or the target "
            f"probability moves by >= {downstream.CHANGE_THRESHOLD}. The edit sizes are drawn "
            "so that about half of each model's pairs change its output: first, on "
            f"{2 * calibration_per_class} calibration images apart from the test images, the "
            "service measures for each model, property and size (the middles of "
            f"{downstream.GRID} equal cells per axis and side) how often the output "
            "changes; then each model x property gets the range of sizes (drawn uniformly, "
            "signed axes either way) whose change rate is nearest its aim, the aims being one common level clipped to what each property "
            f"can reach, with mean {downstream.TARGET_CHANGE_RATE:.0%}. A property that "
            f"changes a model's output less than {downstream.MIN_POSSIBLE_RATE:.0%} of the time "
            "at every size is left out of that model's pairs (it would only pad 'unchanged', "
            "which is what made the previous table degenerate). Per model and seed: "
            f"{2 * per_class} held-out images x its properties ("
            + ", ".join(f"{m} {pairs[m]} pairs" for m in SHORTCUTS)
            + f"); {seeds} seeds, each with its own images and sizes. Predictors: "
            f"E|∇X| from the service (fixed N = {steps}) and, per baseline, the mean squared "
            "difference of its attribution maps of x_0 and x_N for the original's predicted "
            "class. An edit too small to change a pixel counts as unchanged with E|∇X| = 0. "
            "Each predictor gets its accuracy-maximising threshold. Accuracy in %, mean ± std "
            f"over seeds. Written by `bench/validate_downstream.py` in {total:.0f} s "
            f"(calibration {calibration_s:.0f} s).",
            markdown_table(("predictor", *SHORTCUTS), table_rows),
            "Ours reads the model's output along the path and the label is read from the "
            "output at x_N, so any method that queries the output is favoured by the task's "
            "construction (as in the paper); the baselines' maps are computed on x_N too. "
            "Saliency time (all seeds and models, 2 torch threads): "
            + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
            + ". Largest gap between the in-process torch model and the service on the "
            f"originals' target probability: {gap:.2g}.",
            "## Size ranges",
            "Per model and property: the sizes drawn, the largest change rate any size range "
            "reaches on the calibration images, the aim, the rate expected there, and the "
            "rate realised on the test pairs (all seeds).",
            markdown_table(
                ("model", "property", "sizes", "most possible", "aim", "expected", "realised"),
                range_rows,
            ),
        ]
    )
    data = {
        "config": {
            "per_class": per_class,
            "seeds": seeds,
            "calibration_per_class": calibration_per_class,
            "steps": steps,
            "seconds": total,
            "calibration_seconds": calibration_s,
            "change_threshold": downstream.CHANGE_THRESHOLD,
            "target_change_rate": downstream.TARGET_CHANGE_RATE,
        },
        "size_ranges": ranges,
        "realised_by_property": {
            m: {name: float(np.mean(v)) for name, v in props.items()}
            for m, props in by_property.items()
        },
        "per_seed": per_seed,
        "summary": summary,
        "positive_rate": positive,
        "max_probability_gap": gap,
        "saliency_seconds": seconds,
    }
    write_results(out, "downstream_table", text, data)
    print(text)


if __name__ == "__main__":
    app()
