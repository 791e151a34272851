"""RISE (Petsiuk et al. 2018), the baseline attribution method: random binary grid
masks, upsampled bilinearly with a random shift, and the score-weighted mean mask.

Reference: Xplique's `attributions/rise.py` (defaults: 4000 masks, grid 7,
preservation probability 0.5). What we match and where we differ:

- Cells: a cell is kept (1) with probability p: uniform(0, 1) < p, as Xplique.
- Upsampling: the g x g cells are resized bilinearly (TF's half-pixel bilinear, edges
  clamped) to int(H * (1 + 1/g)) x int(W * (1 + 1/g)), then an H x W window is cut at
  a random offset, as Xplique does. Xplique's `tf.image.random_crop` draws *one*
  offset per batch of masks; we draw one per mask, as the RISE paper does, so that
  the map does not depend on the batch size. Height and width are handled
  separately, so non-square images work.
- Map: Xplique divides per pixel by the sum of the masks over that pixel, plus 1e-4:
  sum_k s_k M_k / (sum_k M_k + 1e-4); that is our default ("xplique"). The paper
  divides by N * p, the expected mask sum ("expectation"). The two differ only by
  the per-pixel sampling noise of sum_k M_k.
"""

from __future__ import annotations

import numpy as np

# Xplique's defaults.
DEFAULT_NB_SAMPLES = 4000
DEFAULT_GRID = 7
DEFAULT_PRESERVATION = 0.5
# Xplique's guard in the per-pixel denominator.
MASK_SUM_EPSILON = 1e-4
NORMALIZATIONS = ("xplique", "expectation")


def rise_masks(
    nb: int,
    grid: int,
    preservation: float,
    height: int,
    width: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Masks [nb, H, W, 1] float32 in [0, 1]; the same rng state gives the same masks."""
    if not 0.0 < preservation <= 1.0:
        raise ValueError(f"preservation must be in (0, 1], got {preservation}")
    if grid < 1 or grid > min(height, width):
        raise ValueError(
            f"grid must be between 1 and the image's smaller side ({min(height, width)}), "
            f"got {grid}"
        )
    cells = (rng.random((nb, grid, grid)) < preservation).astype(np.float64)
    tall = int(height * (1.0 + 1.0 / grid))
    wide = int(width * (1.0 + 1.0 / grid))
    row_offsets = rng.integers(0, tall - height + 1, size=nb)
    column_offsets = rng.integers(0, wide - width + 1, size=nb)
    rows = bilinear_matrix(grid, tall)[row_offsets[:, None] + np.arange(height)]
    columns = bilinear_matrix(grid, wide)[column_offsets[:, None] + np.arange(width)]
    masks = np.einsum("bhi,bij,bwj->bhw", rows, cells, columns, optimize=True)
    return masks[..., None].astype(np.float32)


def bilinear_matrix(source: int, size: int) -> np.ndarray:
    """[size, source] weights of TF's half-pixel bilinear resize along one axis."""
    position = np.clip((np.arange(size) + 0.5) * (source / size) - 0.5, 0.0, source - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, source - 1)
    fraction = position - lower
    matrix = np.zeros((size, source))
    matrix[np.arange(size), lower] += 1.0 - fraction
    matrix[np.arange(size), upper] += fraction
    return matrix


class RiseAccumulator:
    """Streams batches of (masks, scores) into a RISE map without keeping the masks."""

    def __init__(
        self, height: int, width: int, preservation: float, normalization: str = "xplique"
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}"
            )
        self.height, self.width = height, width
        self.preservation = preservation
        self.normalization = normalization
        self.count = 0
        self._weighted = np.zeros((height, width))
        self._coverage = np.zeros((height, width))

    def add(self, masks: np.ndarray, scores: np.ndarray) -> None:
        """Adds a batch: masks [b, H, W, 1], scores [b]."""
        planes = np.asarray(masks, dtype=np.float64)
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        if planes.shape != (values.size, self.height, self.width, 1):
            raise ValueError(
                f"masks must have shape [{values.size}, {self.height}, {self.width}, 1] "
                f"(one per score), got {list(planes.shape)}"
            )
        self._weighted += np.tensordot(values, planes[..., 0], axes=1)
        self._coverage += planes[..., 0].sum(axis=0)
        self.count += values.size

    def result(self) -> np.ndarray:
        """The map [H, W] float32."""
        if self.count == 0:
            raise ValueError("no masks were added")
        if self.normalization == "xplique":
            return (self._weighted / (self._coverage + MASK_SUM_EPSILON)).astype(np.float32)
        return (self._weighted / (self.count * self.preservation)).astype(np.float32)
