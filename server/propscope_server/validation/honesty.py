"""Statistical honesty of the service's test: calibration under two null cases,
determinism from a cold and a warm cache, and sensitivity to the path length.

Null case (a): only the bottom-right corner's random texture changes along the
path, redrawn i.i.d. for every image x_0..x_N, and `calibration_probe` sees only
that corner. The prediction curve is then exchangeable, so p-values must be
uniform. Null case (b): an edit the probe cannot see (the object's hue, the
patch in the other corner): the curve is constant and never significant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import stats

import propscope
from propscope_server.triton_models.classifiers.probe import CORNER
from propscope_server.validation.runner import ALPHA, PERMUTATIONS, PropertyRun, explain_all

PROBE = "calibration_probe"
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
    """The same request twice: the first edits (cold cache), the second reads the cache."""

    def results() -> list[propscope.PropertyResult]:
        events = client.explain(image, model, properties, steps=steps, samples=samples, seed=seed)
        return sorted(
            (e for e in events if isinstance(e, propscope.PropertyResult)),
            key=lambda r: r.property_name,
        )

    return results(), results()
