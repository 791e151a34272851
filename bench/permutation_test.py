"""The vectorised permutation test against the paper's loop (one np.random.permutation and one
np.gradient per shuffle), side by side in one run, for the path lengths people use.

    .venv/bin/python bench/permutation_test.py
"""

from __future__ import annotations

import time

import numpy as np

from propscope_server.scoring.property_gradient import permutation_p_values


def loop_p_value(curve: np.ndarray, permutations: int, rng: np.random.Generator) -> float:
    observed = np.mean(np.abs(np.gradient(curve)))
    null = np.array(
        [np.mean(np.abs(np.gradient(rng.permutation(curve)))) for _ in range(permutations)]
    )
    center = null.mean()
    return (np.sum(np.abs(null - center) >= np.abs(observed - center)) + 1) / (permutations + 1)


def best_of(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    permutations = 10_000
    print(f"K = {permutations} permutations, one curve, best of 3")
    print(f"{'N + 1':>6} {'loop ms':>10} {'vectorised ms':>14} {'speed-up':>9}")
    for length in (11, 26, 51, 101, 257):
        curve = np.random.default_rng(length).random(length)
        loop_s = best_of(lambda c=curve: loop_p_value(c, permutations, np.random.default_rng(0)))
        vector_s = best_of(
            lambda c=curve: permutation_p_values(c[None], permutations, np.random.default_rng(0))
        )
        print(
            f"{length:>6} {loop_s * 1e3:>10.1f} {vector_s * 1e3:>14.1f} {loop_s / vector_s:>8.1f}x"
        )


if __name__ == "__main__":
    main()
