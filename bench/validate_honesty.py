"""Statistical honesty of the service's permutation test, through the running
service: calibration under two null cases, determinism from a cold and a warm
cache, and how scores and decisions change with the path length N.

Writes docs/results/honesty.{md,json} and docs/results/calibration_p_values.png.
Exit code 1 if a check fails.

    make validate     # or, with the stack up: .venv/bin/python bench/validate_honesty.py
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import typer  # noqa: E402

import propscope  # noqa: E402
from propscope_dev.validation import honesty  # noqa: E402
from propscope_dev.validation.runner import (  # noqa: E402
    ALPHA,
    PERMUTATIONS,
    PROPERTIES,
    SHORTCUTS,
    TEST_SET_SEED,
    UNTOUCHED,
    explain_all,
    held_out_images,
    select,
)
from propscope_dev.validation.tables import (  # noqa: E402
    Check,
    checks_markdown,
    markdown_table,
    percent,
    write_results,
)

app = typer.Typer(add_completion=False)
MAX_FALSE_POSITIVE_RATE = 0.02
# Uniformity is rejected only at this level: under a calibrated test the KS p-value
# is itself uniform, so the check fails by chance once in a hundred seeds.
MIN_KS_P_VALUE = 0.01
# Seeds of the adaptive null's requests, apart from every other section's.
ADAPTIVE_SEED = 9_000_000
DETERMINISM_PROPERTIES = [
    "object_hue=procedural:operation=hue,region=object",
    "patch=procedural:operation=blend,position=random",
    "ip2p_red=ip2p:instruction=make it red",
]


def plot_p_values(calibrations: dict[int, np.ndarray], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for steps, p_values in calibrations.items():
        ordered = np.sort(p_values)
        expected = np.arange(1, len(ordered) + 1) / (len(ordered) + 1)
        axes[0].plot(expected, ordered, label=f"N = {steps}")
        axes[1].hist(p_values, bins=20, range=(0, 1), histtype="step", label=f"N = {steps}")
    axes[0].plot([0, 1], [0, 1], "k--", linewidth=0.8, label="uniform")
    axes[0].set(xlabel="uniform quantile", ylabel="p-value", title="Q-Q plot, exchangeable null")
    axes[1].set(xlabel="p-value", ylabel="paths", title="p-value histogram")
    axes[0].legend()
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def calibration_section(client, paths: int, invariant_per_class: int, out: Path, workers: int):
    images, _ = held_out_images(invariant_per_class, TEST_SET_SEED + 100)
    p_values = {
        steps: honesty.exchangeable_p_values(
            client, images, paths, steps, seed=steps, workers=workers
        )
        for steps in (10, 50)
    }
    results = [honesty.calibration(p, steps, ALPHA) for steps, p in p_values.items()]
    plot_p_values(p_values, out / "calibration_p_values.png")
    invariant = honesty.invariant_runs(client, images, steps=10, workers=workers)
    constant = sum(float(np.ptp(run.curve)) == 0.0 for run in invariant)
    significant = sum(run.significant for run in invariant)
    checks = [
        Check(
            f"(a) exchangeable, N = {c.steps}: false positives at alpha {ALPHA}",
            f"<= {percent(MAX_FALSE_POSITIVE_RATE)} of {c.paths} paths",
            f"{100 * c.false_positive_rate:.1f}%",
            c.false_positive_rate <= MAX_FALSE_POSITIVE_RATE,
        )
        for c in results
    ]
    checks += [
        Check(
            f"(a) exchangeable, N = {c.steps}: p-values uniform",
            f"KS p-value >= {MIN_KS_P_VALUE}",
            f"{c.ks_p_value:.2f} (KS statistic {c.ks_statistic:.3f})",
            c.ks_p_value >= MIN_KS_P_VALUE,
        )
        for c in results
    ]
    checks += [
        Check(
            "(b) invariant: constant curves",
            f"all {len(invariant)} paths",
            str(constant),
            constant == len(invariant),
        ),
        Check(
            "(b) invariant: significant",
            "never",
            f"{significant} of {len(invariant)}",
            significant == 0,
        ),
    ]
    rows = [
        (
            c.steps,
            c.paths,
            f"{100 * c.false_positive_rate:.1f}%",
            f"{c.ks_statistic:.3f}",
            f"{c.ks_p_value:.2f}",
        )
        for c in results
    ]
    text = "\n\n".join(
        [
            "## Calibration",
            "(a) Exchangeable null: `calibration_probe` sees only the bottom-right 8x8 corner, "
            "whose random texture is redrawn i.i.d. for every image x_0..x_N of a path (the "
            "path is sent as a provided path); nothing else changes. Each path is its own request. "
            "The p-values must be uniform: Kolmogorov-Smirnov against U(0, 1).",
            markdown_table(
                ("N", "paths", f"false positives at {ALPHA}", "KS statistic", "KS p-value"), rows
            ),
            "![p-values under the exchangeable null](calibration_p_values.png)",
            f"(b) Invariant classifier: the same probe with the object's hue and the patch in the "
            f"other corner edited by the procedural editor, on {len(images)} held-out images: "
            f"{len(invariant)} paths, {constant} constant curves, {significant} significant; "
            f"the largest p-value change from 1 is "
            f"{max(1 - run.p_value for run in invariant):.2g}.",
        ]
    )
    data = {
        "exchangeable": results,
        "invariant_paths": len(invariant),
        "constant": constant,
        "significant": significant,
    }
    return text, data, checks


def adaptive_section(client, requests: int, workers: int):
    """The exchangeable null through adaptive paths (calibration_noise), both flavours
    at the service's default settings, and the tied one at a fixed N = 10 beside it."""
    images, _ = held_out_images(10, TEST_SET_SEED + 100)
    settings = [("continuous", "adaptive"), ("tied", "adaptive"), ("tied", "fixed")]
    results = []
    for index, (flavour, mode) in enumerate(settings):
        runs = honesty.noise_null_runs(
            client,
            images,
            requests,
            flavour,
            seed=ADAPTIVE_SEED + index * requests,
            path_mode=mode,
            workers=workers,
        )
        results.append(honesty.null_calibration(runs, flavour, mode, ALPHA))
    checks = []
    for c in results:
        where = f"(a) {c.flavour} null, {c.path_mode} paths"
        checks.append(
            Check(
                f"{where}: false positives at alpha {ALPHA}",
                f"<= {percent(MAX_FALSE_POSITIVE_RATE)} of {c.decided} scored requests",
                f"{100 * c.false_positive_rate:.1f}%",
                c.false_positive_rate <= MAX_FALSE_POSITIVE_RATE,
            )
        )
        if c.flavour == "continuous":
            checks.append(
                Check(
                    f"{where}: p-values uniform",
                    f"KS p-value >= {MIN_KS_P_VALUE}",
                    f"{c.ks_p_value:.2f} (KS statistic {c.ks_statistic:.3f})",
                    c.ks_p_value >= MIN_KS_P_VALUE,
                )
            )
        else:
            checks.append(
                Check(
                    f"{where}: no excess of small p-values",
                    f"one-sided KS p-value >= {MIN_KS_P_VALUE}",
                    f"{c.ks_greater_p_value:.2f} (two-sided: {c.ks_p_value:.2g})",
                    c.ks_greater_p_value >= MIN_KS_P_VALUE,
                )
            )
    rows = [
        (
            c.flavour,
            c.path_mode,
            c.requests,
            c.decided,
            f"{100 * c.false_positive_rate:.1f}%",
            f"{c.ks_p_value:.2g}",
            f"{c.ks_greater_p_value:.2f}",
            ", ".join(f"{n}: {count}" for n, count in c.steps_used.items()),
            f"{c.mean_edits:.1f} (max {c.max_edits})",
            ", ".join(f"{d}: {count}" for d, count in c.decisions.items()),
        )
        for c in results
    ]
    text = "\n\n".join(
        [
            "## Calibration of adaptive paths",
            "(a) through adaptive paths: the `calibration_noise` editor redraws the probe's "
            "corner inside the service, for every strength i.i.d. from the request's seed and "
            "the strength, and the original's corner is drawn by the same rule, so the path is "
            "an exchangeable null at whatever length the service gives it. Default settings "
            f"(steps 10, path_mode unspecified = adaptive, max_steps 80); {requests} requests "
            "per row, each its own seed. *continuous*: every corner fresh noise (distinct "
            "values). *tied*: one of two textures per image, the second with probability "
            "0.1, so that most curves hold a few equal values: the test often cannot reach "
            "alpha at N = 10 and the path is extended (the N column). A tied path whose every "
            "image equals the original (about 0.9^11 of them) is refused by the service (a "
            "no-op edit) and has no p-value; rates are over the scored requests. With ties "
            "the permutation p-value is discrete and conservative, so exact uniformity is "
            "impossible for any valid test (the two-sided KS rejects it at a fixed N too, "
            "last row); the tied rows are checked for what calibration means there, no excess "
            "of small p-values (one-sided KS, H0: P(p <= t) <= t).",
            markdown_table(
                (
                    "flavour",
                    "path mode",
                    "requests",
                    "scored",
                    f"false positives at {ALPHA}",
                    "KS p (two-sided)",
                    "KS p (one-sided)",
                    "N used: requests",
                    "edits per request",
                    "decisions",
                ),
                rows,
            ),
        ]
    )
    return text, {"adaptive_null": results}, checks


def determinism_section(client, seed: int):
    image = held_out_images(1, TEST_SET_SEED + 200)[0][0]
    cold, warm = honesty.cold_and_warm(
        client, image, "synth_hue", DETERMINISM_PROPERTIES, steps=5, samples=2, seed=seed
    )
    identical = [
        honesty.comparable(a) == honesty.comparable(b) for a, b in zip(cold, warm, strict=True)
    ]
    misses = sum(r.cache_misses for r in cold)
    hits = sum(r.cache_hits for r in warm)
    checks = [
        Check("determinism: the first call edits", "cache misses > 0", str(misses), misses > 0),
        Check(
            "determinism: the second call reads the cache",
            f"hits = {misses}",
            str(hits),
            hits == misses,
        ),
        Check(
            "determinism: bit-identical results",
            "every score, p-value, curve and statistic",
            f"{sum(identical)} of {len(identical)} properties",
            all(identical),
        ),
    ]
    text = (
        "## Determinism\n\nThe same request (synth_hue; hue, a patch at a random position per "
        "seed, and the InstructPix2Pix editor; N = 5, S = 2) twice with a fresh seed "
        f"({seed}): the first call edits every path ({misses} cache misses), the second reads "
        f"them all from Redis ({hits} hits). Every number of every property result is compared "
        f"with ==: {sum(identical)} of {len(identical)} properties are bit-identical."
    )
    return text, {"seed": seed, "misses": misses, "hits": hits, "identical": identical}, checks


def movement_summary(rows: list[dict], step_counts: list[int]) -> str:
    """How much each row's E|dp/dt|, significant and relevant shares move across N."""

    def spread(key: str) -> float:
        return max(
            max(row["by_steps"][n][key] for n in step_counts)
            - min(row["by_steps"][n][key] for n in step_counts)
            for row in rows
        )

    def ratio(row: dict) -> float:
        values = [row["by_steps"][n]["score_per_unit_strength"] for n in step_counts]
        return max(values) / max(min(values), 1e-300)

    shortcut = max(ratio(row) for row in rows if row["property"] == SHORTCUTS[row["model"]])
    untouched = max(ratio(row) for row in rows if row["property"] != SHORTCUTS[row["model"]])
    return (
        f"Across N, the largest ratio between a row's highest and lowest E|dp/dt| is "
        f"{shortcut:.2f} for the shortcut rows and {untouched:.2f} for the others (effects of "
        "1e-7 to 1e-3, where the curve's small wiggles weigh more); the share of significant images moves by up to "
        f"{percent(spread('significant'))} and the share of relevant images by up to "
        f"{percent(spread('relevant'))}."
    )


def path_length_section(client, per_class: int, step_counts: list[int], workers: int):
    images, _ = held_out_images(per_class, TEST_SET_SEED)
    runs = {
        steps: explain_all(client, images, SHORTCUTS, steps=steps, workers=workers)
        for steps in step_counts
    }
    rows, data = [], []
    for model, shortcut in SHORTCUTS.items():
        for name in PROPERTIES:
            if name not in (shortcut, UNTOUCHED, "object_size"):
                continue
            cell = {steps: select(found, model, name) for steps, found in runs.items()}
            summary = {
                steps: {
                    "score": float(np.mean([r.score for r in c])),
                    "score_per_unit_strength": float(
                        np.mean([r.score_per_unit_strength for r in c])
                    ),
                    "significant": float(np.mean([r.significant for r in c])),
                    "relevant": float(np.mean([r.relevant for r in c])),
                }
                for steps, c in cell.items()
            }
            data.append({"model": model, "property": name, "by_steps": summary})
            rows.append(
                (
                    model,
                    name,
                    " / ".join(f"{s['score']:.2g}" for s in summary.values()),
                    " / ".join(f"{s['score_per_unit_strength']:.2g}" for s in summary.values()),
                    " / ".join(percent(s["significant"]) for s in summary.values()),
                    " / ".join(percent(s["relevant"]) for s in summary.values()),
                )
            )
    label = " / ".join(str(s) for s in step_counts)
    text = "\n\n".join(
        [
            "## Path length",
            f"The same {len(images)} held-out images at N = {label}. E|∇X| (the paper's score, "
            "unit spacing) shrinks like 1/N; E|dp/dt| (t in [0, 1], `score_per_unit_strength`) "
            "is the score to compare across requests with different N (for a sharp step it is "
            "N / (N + 1), np.gradient's edge effect). " + movement_summary(data, step_counts),
            markdown_table(
                (
                    "model",
                    "property",
                    f"E|∇X| (N = {label})",
                    "E|dp/dt|",
                    "significant",
                    "relevant",
                ),
                rows,
            ),
        ]
    )
    return text, data


@app.command()
def main(
    target: str = typer.Option("localhost:50051", help="The gateway."),
    paths: int = typer.Option(1000, help="Exchangeable null paths per path length."),
    adaptive_requests: int = typer.Option(
        1000, help="Exchangeable null requests per flavour through adaptive paths."
    ),
    invariant_per_class: int = typer.Option(100, help="Images per class for null case (b)."),
    length_per_class: int = typer.Option(10, help="Images per class for the path-length table."),
    workers: int = typer.Option(4, help="Requests in flight."),
    out: Path = typer.Option(Path("docs/results"), help="Where the results go."),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    with propscope.Client(target, timeout=600) as client:
        calibration_text, calibration_data, checks = calibration_section(
            client, paths, invariant_per_class, out, workers
        )
        adaptive_text, adaptive_data, more_checks = adaptive_section(
            client, adaptive_requests, workers
        )
        checks += more_checks
        fresh_seed = int.from_bytes(os.urandom(7), "big")
        determinism_text, determinism_data, more_checks = determinism_section(client, fresh_seed)
        checks += more_checks
        length_text, length_data = path_length_section(
            client, length_per_class, [10, 25, 50, 100], workers
        )
    seconds = time.monotonic() - started
    text = "\n\n".join(
        [
            "# Statistical honesty of the permutation test",
            f"K = {PERMUTATIONS} permutations, alpha = {ALPHA}. Written by `bench/validate_honesty.py` "
            f"in {seconds:.0f} s.",
            calibration_text,
            adaptive_text,
            determinism_text,
            length_text,
            "## Checks",
            checks_markdown(checks),
        ]
    )
    data = {
        "seconds": seconds,
        "calibration": calibration_data,
        "adaptive_calibration": adaptive_data,
        "determinism": determinism_data,
        "path_length": length_data,
        "checks": checks,
    }
    write_results(out, "honesty", text, data)
    print(text)
    if not all(check.passed for check in checks):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
