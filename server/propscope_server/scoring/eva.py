"""EVA (Fel et al., CVPR 2023) in numpy: the l_inf radius in the model's input units,
the d + 1 radius rows (every grid cell perturbed, then each held fixed), and the map
from the margin bounds the model returns. Definitions and choices: docs/eva.md."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from propscope_server.scoring.sobol import nearest_indices

# Every cell changing the overlap bound by less than this, relative to the bound (at
# least 1), is a map that carries no information.
FLAT_CHANGE = 1e-6
# A sampled margin above its bound by at most this (relative, at least 1) is float32
# rounding (the bounds are not rounded outward); above it, a soundness failure.
FLOAT32_SLACK = 1e-5


def input_epsilon(epsilon: float, datatype: str, std: tuple[float, ...] | None) -> np.ndarray:
    """The radius per input channel [3] in the model's input units, from a fraction of
    the pixel range: a UINT8 input takes pixel values (x 255); a float input takes
    (pixel / 255 - mean) / std, so the radius is epsilon / std (epsilon with no std)."""
    if datatype == "UINT8":
        return np.full(3, epsilon * 255.0)
    scale = np.ones(3) if std is None else np.asarray(std, dtype=np.float64)
    return epsilon / np.broadcast_to(scale, (3,))


def cell_of_pixels(grid: int, height: int, width: int) -> np.ndarray:
    """[height, width] row-major index of the grid cell of each pixel: Sobol's cells
    (nearest upsampling of a g x g grid)."""
    rows, columns = nearest_indices(grid, height), nearest_indices(grid, width)
    return rows[:, None] * grid + columns[None, :]


def radius_rows(
    grid: int,
    height: int,
    width: int,
    channel_radius: np.ndarray,
    channels_first: bool,
    start: int = 0,
    stop: int | None = None,
    image: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Rows start..stop-1 (all g^2 + 1 by default) of the radii [rows, 3 h w] float32
    in the input's own layout (channels last, or first): row 0 every cell at the
    radius, row 1 + u cell u held fixed (radius 0). `image` (top, left, height, width)
    is the part of the input showing the image; outside it (letterbox's padding bars,
    not the image) the radius is 0 on every row."""
    stop = grid * grid + 1 if stop is None else stop
    cells = cell_of_pixels(grid, height, width)
    shown = np.ones((height, width), dtype=bool)
    if image is not None:
        top, left, shown_height, shown_width = image
        shown[:] = False
        shown[top : top + shown_height, left : left + shown_width] = True
    held = (np.arange(start - 1, stop - 1)[:, None, None] != cells[None]) & shown  # [rows, h, w]
    radii = held[..., None] * np.asarray(channel_radius, dtype=np.float32)  # [rows, h, w, 3]
    if channels_first:
        radii = radii.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(radii, dtype=np.float32).reshape(len(radii), -1)


def overlaps(margins: np.ndarray, target: int) -> np.ndarray:
    """[rows, K] margins f_c - f_y (or their bounds) -> [rows]: max over c != y."""
    return np.delete(np.asarray(margins, dtype=np.float64), target, axis=1).max(axis=1)


def adversary(margins: np.ndarray, target: int) -> int:
    """The class c != y with the highest margin in one row [K]."""
    others = np.asarray(margins, dtype=np.float64).copy()
    others[target] = -np.inf
    return int(others.argmax())


@dataclass(frozen=True)
class EvaBounds:
    """What the bound rows say: AO_bar(B), AO_bar(B_u) per cell, the likeliest
    adversary, and the highest overlap actually reached by a sampled point."""

    overlap_bound: float
    region_bounds: np.ndarray  # [g^2], row-major
    adversary_class: int
    sampled_overlap: float

    @property
    def importance(self) -> np.ndarray:
        """phi_u = AO_bar(B) - AO_bar(B_u): how much holding u fixed lowers the bound; 0
        where the bound with every region perturbed overflowed float32 (+inf: the model
        returns it for a box too wide to bound, and inf - inf has no meaning)."""
        if not np.isfinite(self.overlap_bound):
            return np.zeros_like(self.region_bounds)
        return self.overlap_bound - self.region_bounds


def eva_bounds(bound_margins: np.ndarray, sampled_margins: np.ndarray, target: int) -> EvaBounds:
    """[g^2 + 1, K] margin bounds and sampled margins of the rows -> EvaBounds. Every
    row's points lie in B (B_u is inside B), so each row's sampled overlap is a lower
    bound on AO(B)."""
    bounded = overlaps(bound_margins, target)
    return EvaBounds(
        overlap_bound=float(bounded[0]),
        region_bounds=bounded[1:],
        adversary_class=adversary(bound_margins[0], target),
        sampled_overlap=float(overlaps(sampled_margins, target).max()),
    )


def flat_warning(bounds: EvaBounds) -> str:
    """Said when no cell changes the bound: the map carries no information."""
    if not np.isfinite(bounds.overlap_bound):
        return (
            "the overlap bound is infinite (float32 overflowed: the ball is too wide for the "
            "bound propagation), so the map carries no information. Try a smaller "
            "eva.epsilon or a hybrid_layer"
        )
    change = float(np.abs(bounds.importance).max())
    if change > FLAT_CHANGE * max(1.0, abs(bounds.overlap_bound)):
        return ""
    return (
        f"every region changes the overlap bound ({bounds.overlap_bound:.6g}) by less than "
        f"{FLAT_CHANGE:g} of it (at most {change:.3g}): the map carries no information. Try a "
        "smaller eva.epsilon (a bound this loose moves with no single region) or a larger one "
        "(nothing in the ball reaches another class), bound CROWN, or a coarser grid"
    )


def soundness_warnings(
    bound_margins: np.ndarray, sampled_margins: np.ndarray, target: int
) -> tuple[str, ...]:
    """Every row and class where a margin reached by a sampled point (an attack iterate,
    the centre) lies above its verified upper bound: float32 rounding when within FLOAT32_SLACK,
    else a soundness failure of the bound propagation. Never silent."""
    bound = np.asarray(bound_margins, dtype=np.float64)
    sampled = np.asarray(sampled_margins, dtype=np.float64)
    excess = sampled - bound
    excess[:, target] = 0.0
    if not (excess > 0).any():
        return ()
    slack = FLOAT32_SLACK * np.maximum(1.0, np.abs(bound))
    failures = np.argwhere(excess > slack)
    if len(failures):
        row, cls = (int(v) for v in failures[0])
        return (
            f"SOUNDNESS FAILURE: on {len(failures)} (bound row, class) pairs a sampled point "
            f"reached a margin above its verified upper bound, e.g. row {row} class {cls}: "
            f"{sampled[row, cls]:.6g} > {bound[row, cls]:.6g}; the bounds of this map are wrong, "
            "do not rely on them, and report it with the model and image",
        )
    row, cls = (int(v) for v in np.unravel_index(int(excess.argmax()), excess.shape))
    return (
        f"a sampled margin lies above its bound by {excess[row, cls]:.3g} (row {row} class "
        f"{cls}), within float32 rounding: the bounds are computed in float32 and not rounded "
        "outward",
    )


def decide(
    guaranteed: bool, bound: str, overlap_bound: float, sampled_overlap: float
) -> tuple[str, str]:
    """(decision, verdict) of the ball: ``certified`` (a verified bound below 0),
    ``not_robust`` (a sampled point or attack iterate reaches another class), else
    ``undecided``, in words with why (the gap, or a hybrid's bound that proves nothing)
    and what may close it. Decided here once, for every client."""
    if guaranteed and overlap_bound < 0:
        return "certified", "certified: no input of the ball makes another class reach the target"
    if sampled_overlap >= 0:
        return "not_robust", (
            "not robust: a sampled point of the ball makes another class reach the target"
            f" (sampled overlap {sampled_overlap:.4g} >= 0)"
        )
    if not guaranteed and overlap_bound < 0:
        return "undecided", (
            f"undecided: the hybrid bound {overlap_bound:.4g} is below 0 but NOT guaranteed (it "
            "may lie below the true overlap); verify from the input to certify"
        )
    tighter = "the crown bound or " if bound == "ibp" else ""
    return "undecided", (
        f"undecided: the bound {overlap_bound:.4g} is above 0 but no sampled point reaches "
        f"another class ({sampled_overlap:.4g}); the true overlap lies anywhere in a gap of "
        f"{overlap_bound - sampled_overlap:.4g} (the bound's looseness plus what the samples "
        f"missed); {tighter}a smaller epsilon may decide"
    )
