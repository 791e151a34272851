"""Our KSG mutual information against scikit-learn's `mutual_info_regression`
(the same estimator and numbers), side by side in one run, per path length.

    .venv/bin/python bench/curve_statistics.py
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
from sklearn.feature_selection import mutual_info_regression

from propscope_server.scoring.curve_statistics import KSG_NEIGHBOURS, ksg_mutual_information


def library_estimate(t: np.ndarray, curve: np.ndarray) -> float:
    return mutual_info_regression(t[:, None], curve, n_neighbors=KSG_NEIGHBOURS, random_state=0)[0]


def per_call_ms(function, calls: int) -> float:
    """Best of 3 runs of `calls` calls, in ms per call."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e3


def main() -> None:
    print(f"{'points':>7}{'scikit-learn ms':>17}{'ours ms':>10}{'ratio':>8}{'|diff|':>10}")
    for points in (11, 51, 101, 257):
        t = np.linspace(0.0, 1.0, points)
        curve = 1 / (1 + np.exp(-12 * (t - 0.5))) + 0.02 * np.random.default_rng(0).random(points)

        library = partial(library_estimate, t, curve)
        ours = partial(ksg_mutual_information, t, curve)
        library_ms, ours_ms = per_call_ms(library, 30), per_call_ms(ours, 30)
        difference = abs(library() - ours())
        print(
            f"{points:>7}{library_ms:>17.2f}{ours_ms:>10.2f}{library_ms / ours_ms:>7.0f}x"
            f"{difference:>10.1e}"
        )


if __name__ == "__main__":
    main()
