"""CRAFT maths (Fel et al., CVPR 2023): crops, pooled activations, the NMF concept
bank, per-position coefficients, the Sobol design over concept coefficients and the
logit shares. Pure numpy / scikit-learn; the method (methods/craft.py) runs the passes.

Conventions: a layer's activations are [C, H, W] (the open model's ACTIVATIONS,
row-major C, H, W); the bank W is [r, C], coefficients U are [n, r]; A ~ U W.

What we match of Xplique's `concepts/craft.py`: crops by a sliding window of side
`patch` and stride round(0.8 patch) (`tf.image.extract_patches`, VALID: windows that
fit), each resized to the model's input; activations averaged over positions before
NMF; the importance of concept c for an image is the total-order Sobol index of its
coefficient, the design's masks multiplying every position's coefficients
(A~ = (U * mask) W), averaged over images. NMF: scikit-learn's coordinate descent
with NNDSVDA initialisation (Xplique's defaults are scikit-learn's too).
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import NMF, non_negative_factorization

from propscope_server.scoring import sobol

STRIDE_RATIO = 0.8
# The paper crops 64 px of 224 px ImageNet images (0.29); on the synthetic world 18..24 px
# of 64 put the patch concept of synth_patch first and none of synth_unbiased in the top 2
# (docs/concepts.md), 16 and 32 do not.
DEFAULT_PATCH_RATIO = 0.3
NMF_MAX_ITER = 500
# Activations below -this count as negative (float32 noise around a ReLU's zero).
NEGATIVE_TOLERANCE = 1e-6
# |h(sum) - h(0) - sum of the shares| within this share of the total: additive.
ADDITIVITY_TOLERANCE = 1e-3


def default_patch(height: int, width: int) -> int:
    return max(1, round(DEFAULT_PATCH_RATIO * min(height, width)))


def stride_of(patch: int) -> int:
    return max(1, round(STRIDE_RATIO * patch))


def crop_boxes(height: int, width: int, patch: int) -> list[tuple[int, int, int, int]]:
    """(left, top, width, height) of every window of side `patch` that fits, by rows,
    stride 0.8 patch. ValueError when the patch is larger than the image."""
    if patch < 1 or patch > min(height, width):
        raise ValueError(f"patch {patch} must be in [1, {min(height, width)}]")
    stride = stride_of(patch)
    tops = range(0, height - patch + 1, stride)
    lefts = range(0, width - patch + 1, stride)
    return [(left, top, patch, patch) for top in tops for left in lefts]


def as_maps(activations: np.ndarray, channels: int) -> np.ndarray:
    """ACTIVATIONS [n, C*H*W] -> [n, C, H, W]. The contract sends no H and W, so the map
    must be square (H = W), as for a square input; ValueError otherwise."""
    flat = np.asarray(activations, dtype=np.float64)
    positions = flat.shape[1] // channels
    if positions * channels != flat.shape[1]:
        raise ValueError(f"{flat.shape[1]} activations per sample are not a multiple of {channels}")
    side = int(round(positions**0.5))
    if side * side != positions:
        raise ValueError(f"{positions} positions per channel are not a square map")
    return flat.reshape(len(flat), channels, side, side)


def pooled(maps: np.ndarray) -> np.ndarray:
    """[n, C, H, W] -> [n, C]: the spatial mean."""
    return maps.mean(axis=(2, 3))


def most_negative(maps: np.ndarray) -> float:
    return float(np.min(maps)) if maps.size else 0.0


def fit_nmf(activations: np.ndarray, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A [n, C] >= 0 -> (U [n, r], W [r, C], ||A - U W||_F / ||A||_F). `seed` is the
    request's uint64; scikit-learn takes 32 bits, so it is taken modulo 2**32."""
    data = np.asarray(activations, dtype=np.float64)
    model = NMF(n_components=rank, init="nndsvda", max_iter=NMF_MAX_ITER, random_state=seed % 2**32)
    coefficients = model.fit_transform(data)
    basis = model.components_
    return coefficients, basis, relative_error(data, coefficients, basis)


def relative_error(data: np.ndarray, coefficients: np.ndarray, basis: np.ndarray) -> float:
    norm = float(np.linalg.norm(data))
    if norm == 0.0:
        return 0.0
    return float(np.linalg.norm(data - coefficients @ basis) / norm)


def coefficients(activations: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """U >= 0 [n, r] minimising ||A - U W|| with W fixed: the coefficients of new
    activations A [n, C] (per crop, or per position of an image)."""
    data = np.asarray(activations, dtype=np.float64)
    solved, _, _ = non_negative_factorization(
        data,
        H=np.asarray(basis, dtype=np.float64),
        n_components=basis.shape[0],
        update_H=False,
        max_iter=NMF_MAX_ITER,
    )
    return solved


def position_coefficients(maps: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """One image's activations [C, H, W] -> U per position [H, W, r]."""
    channels, height, width = maps.shape
    flat = maps.reshape(channels, -1).T
    return coefficients(flat, basis).reshape(height, width, -1)


def reconstructed(position_u: np.ndarray, basis: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(U [H, W, r] * mask) W for each mask [m, r] -> REPLACE_ACTIVATION rows [m, C*H*W]
    (row-major C, H, W) float32."""
    height, width, _ = position_u.shape
    masked = position_u[None] * masks[:, None, None, :]  # [m, H, W, r]
    values = masked @ basis  # [m, H, W, C]
    return (
        np.ascontiguousarray(values.transpose(0, 3, 1, 2))
        .reshape(len(masks), -1)
        .astype(np.float32)
    )


def broadcast_concepts(
    mean_u: np.ndarray, basis: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The logit-share passes: rows [r + 2, C*H*W]: 0, each concept alone at its mean
    coefficient (u_bar_c W_c at every position), all of them together. Also the masks
    those rows correspond to ([r + 2, r])."""
    rank = len(mean_u)
    masks = np.vstack([np.zeros(rank), np.eye(rank), np.ones(rank)])
    position_u = np.broadcast_to(mean_u, (height, width, rank))
    return reconstructed(position_u, basis, masks), masks


def logit_shares(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Scores of broadcast_concepts' rows -> (contributions h(u_c W_c) - h(0) [r],
    shares (contribution / their sum) [r], additive: h(all) - h(0) equals their sum)."""
    scores = np.asarray(scores, dtype=np.float64)
    base, singles, together = scores[0], scores[1:-1], scores[-1]
    contributions = singles - base
    total = float(contributions.sum())
    shares = contributions / total if total != 0.0 else np.zeros_like(contributions)
    scale = max(abs(together - base), float(np.abs(contributions).sum()), 1e-12)
    additive = abs((together - base) - total) <= ADDITIVITY_TOLERANCE * scale
    return contributions, shares, bool(additive)


def importance_masks(nb_design: int, rank: int, seed: int) -> np.ndarray:
    """The replicated Sobol design over the r coefficients [N (r + 2), r], Owen-scrambled
    with `seed`. Unscrambled, the first N points of a 2r-dimensional Sobol sequence make
    some factor's A and B columns equal or nearly so (r = 10: factor 8 identical at N = 16,
    factor 4's mean (a - b)^2 at 1/5 of its expected 1/6 even at N = 32), and a concept's
    importance would depend on its arbitrary index in W."""
    return sobol.sobol_design(nb_design, rank, scramble_seed=seed).astype(np.float64)


def sobol_importance(scores: np.ndarray, nb_design: int, rank: int) -> np.ndarray:
    """Total-order indices [r] (Jansen) of one image's design scores."""
    return sobol.total_order(scores, nb_design, rank)


def importance_passes(images: int, nb_design: int, rank: int) -> int:
    """h passes: per image N (r + 2), plus r + 2 for the logit shares."""
    return images * sobol.forward_passes(nb_design, rank) + rank + 2


def deletion_masks(order: np.ndarray) -> np.ndarray:
    """Masks [r + 1, r] deleting concepts cumulatively in `order` (none first, all last)."""
    rank = len(order)
    masks = np.ones((rank + 1, rank))
    for step, concept in enumerate(order, start=1):
        masks[step:, concept] = 0.0
    return masks


def curve_area(scores: np.ndarray) -> float:
    """The trapezoid area of a curve over [0, 1]."""
    values = np.asarray(scores, dtype=np.float64)
    if len(values) < 2:
        return float(values.sum())
    return float((values[:-1] + values[1:]).sum() / (2.0 * (len(values) - 1)))
