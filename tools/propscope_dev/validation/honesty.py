"""Statistical honesty of the service's test: calibration under two null cases,
determinism from a cold and a warm cache, and sensitivity to the path length.

Null case (a): only the bottom-right corner's random texture changes along the
path, redrawn i.i.d. for every image x_0..x_N, and `calibration_probe` sees only
that corner. The prediction curve is then exchangeable, so p-values must be
uniform. Case (a) at a fixed N sends the path as a provided path; for adaptive
paths the `calibration_noise` editor redraws the corner inside the service, at
whatever length the service chooses. Null case (b): an edit the probe cannot see (the object's hue, the
patch in the other corner): the curve is constant and never significant.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import grpc
import numpy as np
from scipy import stats

import propscope
from propscope_dev.validation.runner import ALPHA, PERMUTATIONS, PropertyRun, explain_all
from propscope_server.triton_models.editors.calibration_noise import (
    CORNER,
    DEFAULT_MINORITY,
    null_original,
)

PROBE = "calibration_probe"
NOISE_EDITOR = "calibration_noise"
# Edits that never reach the probe's corner in the synthetic world.
INVISIBLE_TO_PROBE = {
    "object_hue": "procedural:operation=hue,region=object",
    "patch": "procedural:operation=blend",
}


def with_noise_corner(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = image.copy()
    noisy[-CORNER:, -CORNER:] = rng.integers(0, 256, (CORNER, CORNER, 3), dtype=np.uint8)
    return noisy


def exchangeable_p_values(
    client: propscope.Client,
    images: np.ndarray,
    paths: int,
    steps: int,
    seed: int,
    workers: int = 4,
) -> np.ndarray:
    """One p-value per exchangeable path, each path its own request (so that no two
    paths share an original)."""

    def p_value(index: int) -> float:
        rng = np.random.default_rng([seed, index])
        base = images[index % len(images)]
        original = with_noise_corner(base, rng)
        path = [with_noise_corner(base, rng) for _ in range(steps)]
        encoded = [propscope.encode_image(image) for image in path]
        prop = propscope.Property("corner_texture", provided_path=encoded)
        events = client.explain(
            original, PROBE, [prop], seed=seed + index, permutations=PERMUTATIONS, alpha=ALPHA
        )
        (result,) = [e for e in events if isinstance(e, propscope.PropertyResult)]
        if not result.ok:
            raise RuntimeError(f"path {index}: {result.error}")
        return result.p_value

    with ThreadPoolExecutor(workers) as pool:
        return np.array(list(pool.map(p_value, range(paths))))


@dataclasses.dataclass(frozen=True)
class Calibration:
    paths: int
    steps: int
    alpha: float
    false_positive_rate: float
    ks_statistic: float
    ks_p_value: float


def calibration(p_values: np.ndarray, steps: int, alpha: float = ALPHA) -> Calibration:
    ks = stats.kstest(p_values, "uniform")
    return Calibration(
        paths=len(p_values),
        steps=steps,
        alpha=alpha,
        false_positive_rate=float(np.mean(p_values < alpha)),
        ks_statistic=float(ks.statistic),
        ks_p_value=float(ks.pvalue),
    )


# The decision recorded for a tied path whose every image equals the original: the
# service refuses to score it (FAILED_PRECONDITION), so it has no p-value.
NO_OP = "no-op"


@dataclasses.dataclass(frozen=True)
class NullRun:
    """One exchangeable-null request's result: its p-value (None for a no-op path), the
    N it was decided on, the edited images it cost and the decision."""

    p_value: float | None
    steps: int
    edits: int
    decision: str


def noise_null_runs(
    client: propscope.Client,
    images: np.ndarray,
    requests: int,
    flavour: str,
    seed: int,
    *,
    path_mode: Literal["adaptive", "fixed"] = "adaptive",
    steps: int = 10,
    minority: float = DEFAULT_MINORITY,
    workers: int = 4,
) -> list[NullRun]:
    """`requests` exchangeable paths edited by `calibration_noise` inside the service,
    each its own request with its own seed (seed + index), at the service's default
    adaptive settings unless `path_mode` is "fixed". The original's corner is drawn by
    the editor's own rule, so x_0 is exchangeable with every image of the path."""
    prop = f"corner_texture={NOISE_EDITOR}:flavour={flavour},minority={minority:g}"

    def run(index: int) -> NullRun:
        request_seed = seed + index
        original = null_original(images[index % len(images)], request_seed, flavour, minority)
        events = client.explain(
            original,
            PROBE,
            [prop],
            steps=steps,
            seed=request_seed,
            permutations=PERMUTATIONS,
            alpha=ALPHA,
            path_mode=path_mode,
        )
        (result,) = [e for e in events if isinstance(e, propscope.PropertyResult)]
        if result.status_code == grpc.StatusCode.FAILED_PRECONDITION and flavour == "tied":
            # Every corner drew the original's texture: a constant curve, refused at the
            # first length (a longer path repeats it), after `steps` edits.
            return NullRun(None, steps, steps, NO_OP)
        if not result.ok:
            raise RuntimeError(f"{flavour} null, request {index}: {result.error}")
        return NullRun(result.p_value, result.steps, result.edits, result.decision.value)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, range(requests)))


@dataclasses.dataclass(frozen=True)
class NullCalibration:
    """Calibration of one flavour's final p-values, with the path lengths it took.

    `ks_greater_p_value` tests only for an excess of small p-values (one-sided KS:
    H0 P(p <= t) <= t for every t). With ties a permutation p-value is discrete and
    conservative, so the two-sided test can reject a valid test there; the one-sided
    one is the check that still means "calibrated". No-op paths (every image equal to
    the original) have no p-value: rates and tests are over the `decided` requests, a
    permutation test being valid given the curve's values, hence given "not constant"."""

    flavour: str
    path_mode: str
    requests: int
    decided: int
    alpha: float
    false_positive_rate: float
    ks_statistic: float
    ks_p_value: float
    ks_greater_p_value: float
    steps_used: dict[int, int]  # N -> requests decided at that N
    mean_edits: float
    max_edits: int
    decisions: dict[str, int]


def null_calibration(
    runs: Sequence[NullRun], flavour: str, path_mode: str, alpha: float = ALPHA
) -> NullCalibration:
    p_values = np.array([r.p_value for r in runs if r.p_value is not None])
    two_sided = stats.kstest(p_values, "uniform")
    # alternative="greater": the empirical CDF lies above the uniform one somewhere,
    # i.e. too many small p-values.
    greater = stats.kstest(p_values, "uniform", alternative="greater")
    steps = collections.Counter(r.steps for r in runs)
    decisions = collections.Counter(r.decision for r in runs)
    edits = [r.edits for r in runs]
    return NullCalibration(
        flavour=flavour,
        path_mode=path_mode,
        requests=len(runs),
        decided=len(p_values),
        alpha=alpha,
        false_positive_rate=float(np.mean(p_values < alpha)),
        ks_statistic=float(two_sided.statistic),
        ks_p_value=float(two_sided.pvalue),
        ks_greater_p_value=float(greater.pvalue),
        steps_used=dict(sorted(steps.items())),
        mean_edits=float(np.mean(edits)),
        max_edits=int(max(edits)),
        decisions=dict(sorted(decisions.items())),
    )


def invariant_runs(
    client: propscope.Client, images: np.ndarray, steps: int, workers: int = 4
) -> list[PropertyRun]:
    return explain_all(client, images, [PROBE], INVISIBLE_TO_PROBE, steps=steps, workers=workers)


def comparable(result: propscope.PropertyResult) -> dict:
    """Everything in a result except where the paths came from."""
    fields = result.to_dict()
    for name in ("cache_hits", "cache_misses", "request_id"):
        fields.pop(name)
    for sample in fields["samples"]:
        sample.pop("cache_hit")
    return fields


def cold_and_warm(
    client: propscope.Client,
    image: np.ndarray,
    model: str,
    properties: Sequence[str],
    *,
    steps: int,
    samples: int,
    seed: int,
) -> tuple[list[propscope.PropertyResult], list[propscope.PropertyResult]]:
    """The same request twice: the first edits (cold cache), the second reads the cache.
    Fixed paths, so that the cache holds exactly samples x properties paths."""

    def results() -> list[propscope.PropertyResult]:
        events = client.explain(
            image,
            model,
            properties,
            steps=steps,
            samples=samples,
            seed=seed,
            path_mode="fixed",
        )
        return sorted(
            (e for e in events if isinstance(e, propscope.PropertyResult)),
            key=lambda r: r.property_name,
        )

    return results(), results()
