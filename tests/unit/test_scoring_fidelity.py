"""Deletion / Insertion, MuFidelity and AverageStability.

Xplique parity: TensorFlow (and so Xplique) cannot be installed here. The expected
values come from (a) tiny cases worked out by hand in the comments and (b)
`_xplique_causal` and `_xplique_mufidelity` below: transliterations into numpy of
Xplique's `CausalFidelity.detailed_evaluate` / `evaluate` and `MuFidelity.evaluate`
for one input (TF ops replaced by their numpy equivalents, the random subset masks
passed in so that both sides see the same ones), written from Xplique's source
independently of the module under test. Agreement is required to 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from propscope_server.scoring.fidelity import (
    average_stability,
    baseline_raises_score,
    curve_area,
    curve_score_drops,
    deletion_images,
    mu_fidelity,
    mufidelity_subsets,
    perturbation_order,
    perturbed_counts,
    stability_noise,
    subset_attribution_sums,
    subset_pixel_masks,
)
from propscope_server.scoring.perturbation import gaussian_blur, perturb


def _xplique_causal(model, image, explanation, mode, baseline_value, steps, max_percentage):
    """Xplique's CausalFidelity for one input: (scores by step, AUC)."""
    if explanation.ndim == 3:
        explanation = np.mean(explanation, -1)
    nb_features = np.prod(image.shape[:-1])
    flat_input = image.reshape((1, nb_features, image.shape[-1]))
    max_nb_perturbed = int(np.floor(nb_features * max_percentage))
    if steps == -1:
        steps = max_nb_perturbed
    most_important = np.argsort(explanation.reshape((1, -1)), axis=-1)[:, ::-1]
    baselines = (np.ones_like(image[None], dtype=np.float32) * baseline_value).reshape(
        flat_input.shape
    )
    start, end = (flat_input, baselines) if mode == "deletion" else (baselines, flat_input)
    scores = {}
    for step in np.linspace(0, max_nb_perturbed, steps + 1, dtype=np.int32):
        batch = start.copy()
        for i, ids in enumerate(most_important[:, :step]):
            batch[i, ids] = end[i, ids]
        scores[step] = np.mean(model(batch.reshape((-1, *image.shape))))
    values = np.array(list(scores.values()))
    return values, np.mean(values[:-1] + values[1:]) * 0.5


def _xplique_mufidelity(model, image, explanation, keep_masks, baseline_value):
    """Xplique's MuFidelity.evaluate for one input, given its `subset_masks` (1 = keep)."""
    base = model(image[None])[0]
    phi = explanation[..., None] if image.ndim > explanation.ndim else explanation
    perturbed = image[None] * keep_masks + (1.0 - keep_masks) * baseline_value
    preds = base - model(perturbed)
    attrs = np.sum(phi[None] * (1.0 - keep_masks), axis=(1, 2, 3))
    corr = spearmanr(preds, attrs)[0]
    return 0.0 if np.isnan(corr) else corr


def _linear_model(weights):
    """Score = sum of weight * pixel / 255 over the first channel, per image."""

    def model(images):
        return np.einsum("bhw,hw->b", np.asarray(images, np.float64)[..., 0], weights) / 255.0

    return model


def _scene(height=12, width=16, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(20, 255, (height, width, 3)).astype(np.float32)
    weights = np.zeros((height, width))
    weights[2:6, 8:12] = rng.uniform(0.5, 1.0, (4, 4))  # what the model reads
    return image, weights


def test_deletion_and_insertion_by_hand():
    # 2 x 2 image, pixel sums 10, 20 / 30, 40; map 0.1, 0.4 / 0.3, 0.2 -> order 1, 2, 3, 0.
    image = np.repeat(np.array([[10.0, 20.0], [30.0, 40.0]])[..., None], 3, axis=2)
    explanation = np.array([[0.1, 0.4], [0.3, 0.2]])
    model = _linear_model(np.full((2, 2), 255.0))  # = sum of the first channel
    zeros = np.zeros_like(image)
    # steps 2 -> counts 0, 2, 4: scores 100, 10 + 40 = 50, 0; area mean(150, 50) / 2 = 50.
    fractions, images = deletion_images(image, explanation, 2, 1.0, zeros, insertion=False)
    np.testing.assert_allclose(fractions, [0, 0.5, 1])
    np.testing.assert_allclose(model(images), [100, 50, 0])
    assert curve_area(fractions, model(images)) == pytest.approx(50.0)
    # max 0.6 -> floor(2.4) = 2 pixels, counts 0, 1, 2: 100, 80, 50; area mean(180, 130)/2.
    fractions, images = deletion_images(image, explanation, 2, 0.6, zeros, insertion=False)
    np.testing.assert_allclose(model(images), [100, 80, 50])
    assert curve_area(fractions, model(images)) == pytest.approx(77.5)
    # Insertion, steps 3: counts int(linspace(0, 4, 4)) = 0, 1, 2, 4: 0, 20, 50, 100;
    # area mean(20, 70, 150) / 2 = 40.
    fractions, images = deletion_images(image, explanation, 3, 1.0, zeros, insertion=True)
    np.testing.assert_allclose(fractions, [0, 0.25, 0.5, 1])
    np.testing.assert_allclose(model(images), [0, 20, 50, 100])
    assert curve_area(fractions, model(images)) == pytest.approx(40.0)
    # The exact spacing only differs when the steps are uneven: (0,0.25,0.5,1) -> 43.75.
    assert curve_area(fractions, model(images), exact_spacing=True) == pytest.approx(
        (10 * 0.25 + 35 * 0.25 + 75 * 0.5) / 1.0
    )


@pytest.mark.parametrize("insertion", [False, True])
@pytest.mark.parametrize(("steps", "max_percentage"), [(10, 1.0), (7, 0.35), (-1, 0.2)])
def test_deletion_insertion_match_xplique_on_fixtures(insertion, steps, max_percentage):
    image, weights = _scene(9, 13, seed=4)
    model = _linear_model(weights + 0.05)
    explanation = np.random.default_rng(2).normal(size=(9, 13, 3))  # channels averaged
    baseline_value = 17.0
    fractions, images = deletion_images(
        image, explanation, steps, max_percentage, np.full_like(image, baseline_value), insertion
    )
    scores = model(images)
    mode = "insertion" if insertion else "deletion"
    reference, reference_auc = _xplique_causal(
        model, image, explanation, mode, baseline_value, steps, max_percentage
    )
    np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-6)
    assert curve_area(fractions, scores) == pytest.approx(reference_auc, abs=1e-6)


def test_perturbation_order_breaks_ties_towards_the_later_pixel():
    order = perturbation_order(np.array([[1.0, 3.0], [3.0, 0.0]]))
    assert order.tolist() == [2, 1, 0, 3]
    assert order.tolist() == np.argsort(np.array([1.0, 3.0, 3.0, 0.0]))[::-1].tolist()
    with pytest.raises(ValueError, match="finite"):
        perturbation_order(np.array([[np.nan, 1.0]]))


def test_perturbed_counts_validate_their_settings():
    assert perturbed_counts(10, 4, 1.0).tolist() == [0, 2, 5, 7, 10]
    with pytest.raises(ValueError, match="max_percentage must be in"):
        perturbed_counts(10, 4, 0.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        perturbed_counts(10, 0, 1.0)


def test_the_oracle_map_has_a_lower_deletion_than_random_maps():
    image, weights = _scene()
    model = _linear_model(weights)
    zeros = np.zeros_like(image)
    oracle = weights * image[..., 0]  # each pixel's exact contribution

    def deletion(explanation):
        fractions, images = deletion_images(image, explanation, 10, 1.0, zeros, False)
        return curve_area(fractions, model(images))

    rng = np.random.default_rng(1)
    random_areas = [deletion(rng.random(weights.shape)) for _ in range(20)]
    assert deletion(oracle) < min(random_areas)
    assert deletion(oracle) < 0.5 * np.median(random_areas)


def test_mu_fidelity_by_hand_spearman_and_pearson():
    # drops 1, 2, 3 against sums 1, 2, 10: ranks agree -> Spearman 1; Pearson: deviations
    # (-1, 0, 1) and (-10, -7, 17)/3 -> 9 / sqrt(2 * 438 / 9) = 27 / sqrt(876).
    perturbed = np.array([9.0, 8.0, 7.0])
    sums = np.array([1.0, 2.0, 10.0])
    assert mu_fidelity(10.0, perturbed, sums) == pytest.approx(1.0)
    assert mu_fidelity(10.0, perturbed, sums, correlation="pearson") == pytest.approx(
        27 / np.sqrt(876)
    )
    assert mu_fidelity(10.0, np.full(3, 9.0), sums) == 0.0  # no variation: NaN -> 0
    with pytest.raises(ValueError, match="correlation must be one of"):
        mu_fidelity(1.0, perturbed, sums, correlation="kendall")


def test_mu_fidelity_matches_xplique_on_fixtures():
    image, weights = _scene(10, 14, seed=3)
    model = _linear_model(weights + 0.1 * np.random.default_rng(5).random(weights.shape))
    explanation = np.random.default_rng(6).normal(size=weights.shape) + weights
    subsets = mufidelity_subsets(4, 0.3, 60, np.random.default_rng(7))
    baselined = subset_pixel_masks(subsets, 10, 14)
    keep = (~baselined)[..., None].astype(np.float32)
    baseline = np.full_like(image, 30.0)
    perturbed = perturb(image, keep, "inpainting", baseline)
    ours = mu_fidelity(
        float(model(image[None])[0]),
        model(perturbed),
        subset_attribution_sums(explanation, baselined),
    )
    reference = _xplique_mufidelity(model, image, explanation, keep, 30.0)
    assert ours == pytest.approx(reference, abs=1e-6)


def _mu_fidelity_of(model, image, explanation, subsets):
    height, width = image.shape[:2]
    baselined = subset_pixel_masks(subsets, height, width)
    keep = (~baselined)[..., None].astype(np.float32)
    perturbed = perturb(image, keep, "inpainting", np.zeros_like(image))
    sums = subset_attribution_sums(explanation, baselined)
    return mu_fidelity(float(model(image[None])[0]), model(perturbed), sums)


def test_oracle_map_has_a_high_mu_fidelity_on_a_linear_model():
    image, weights = _scene(18, 27)
    model = _linear_model(weights)
    subsets = mufidelity_subsets(9, 0.2, 200, np.random.default_rng(0))
    assert _mu_fidelity_of(model, image, weights * image[..., 0], subsets) >= 0.9


def test_a_constant_map_has_no_mu_fidelity_on_a_balanced_linear_model():
    # Contributions of both signs summing to zero: the drop does not grow with |S|.
    rng = np.random.default_rng(8)
    image = np.full((18, 18, 3), 100.0, dtype=np.float32)
    weights = rng.normal(size=(18, 18))
    weights -= weights.mean()
    subsets = mufidelity_subsets(9, 0.2, 4000, np.random.default_rng(1))
    constant = np.ones((18, 18))
    assert abs(_mu_fidelity_of(_linear_model(weights), image, constant, subsets)) < 0.05


def test_a_constant_map_scores_the_drop_against_subset_size_unless_sizes_are_fixed():
    # Xplique's Bernoulli subsets: a constant map's sums are c * |S|, so on a model whose
    # score falls with the area removed its MuFidelity is high; fixed |S| gives exactly 0.
    image, _ = _scene(18, 18)
    model = _linear_model(np.full((18, 18), 1.0))
    constant = np.ones((18, 18))
    bernoulli = mufidelity_subsets(9, 0.2, 200, np.random.default_rng(2))
    assert _mu_fidelity_of(model, image, constant, bernoulli) > 0.5
    fixed = mufidelity_subsets(9, 0.2, 200, np.random.default_rng(2), exact_size=True)
    assert np.all(fixed.sum(axis=(1, 2)) == round(0.2 * 81))
    assert _mu_fidelity_of(model, image, constant, fixed) == 0.0


def _black_drops(model, image, subsets):
    """Score drops when each subset is set to black (baseline 0)."""
    keep = (~subset_pixel_masks(subsets, *image.shape[:2]))[..., None].astype(np.float32)
    perturbed = perturb(image, keep, "inpainting", np.zeros_like(image))
    return float(model(image[None])[0]) - model(perturbed)


def test_a_baseline_that_adds_evidence_is_detected_from_the_drops():
    # As black on synth_patch: a patch is evidence for the class, every other pixel weakly
    # against it, so blacking (baseline 0) a background cell raises the score.
    image, weights = _scene(18, 18, seed=5)
    patch = weights > 0
    signed = np.where(patch, weights, -0.2)
    model = _linear_model(signed)
    subsets = mufidelity_subsets(9, 0.2, 200, np.random.default_rng(3))
    assert baseline_raises_score(_black_drops(model, image, subsets))
    # The signed contributions score 1; where the model looks (the patch: 0.62 here) and
    # the unsigned contributions (what a Sobol map estimates: -0.06) are marked down
    # however faithful, and a constant map is negative (-0.58): the drops follow |S|.
    contributions = signed * image[..., 0]
    assert _mu_fidelity_of(model, image, contributions, subsets) >= 0.99
    assert _mu_fidelity_of(model, image, patch.astype(float), subsets) < 0.75
    assert _mu_fidelity_of(model, image, np.abs(contributions), subsets) < 0.1
    assert _mu_fidelity_of(model, image, np.ones((18, 18)), subsets) < -0.3
    # A baseline that removes evidence (every weight positive): no warning.
    assert not baseline_raises_score(_black_drops(_linear_model(np.abs(signed)), image, subsets))
    # A model that reads one corner: most subsets miss it (drop 0) and none raise it.
    assert not baseline_raises_score(np.array([0.0, 0.0, 0.0, 2.0, 1.5]))
    assert baseline_raises_score(np.array([-1.0, -0.5, 0.0, 2.0, -0.1]))


def _black_curve_drops(model, image, explanation, insertion):
    """Deletion / Insertion curve toward black (baseline 0): its drops from f(x)."""
    fractions, images = deletion_images(
        image, explanation, 10, 1.0, np.zeros_like(image), insertion=insertion
    )
    return curve_score_drops(float(model(image[None])[0]), fractions, model(images), insertion)


@pytest.mark.parametrize("insertion", [False, True])
def test_a_curve_toward_a_baseline_that_adds_evidence_is_detected(insertion):
    # The MuFidelity case above: blacking the background (weight -0.2) raises the score, so
    # the curve toward black climbs above f(x) whatever the order, the faithful one included.
    image, weights = _scene(18, 18, seed=5)
    signed = np.where(weights > 0, weights, -0.2)
    for explanation in (signed * image[..., 0], np.random.default_rng(0).random((18, 18))):
        drops = _black_curve_drops(_linear_model(signed), image, explanation, insertion)
        assert drops.size == 10 and baseline_raises_score(drops, "mean")
        # Every weight positive: black removes evidence and the curve stays below f(x).
        drops = _black_curve_drops(_linear_model(np.abs(signed)), image, explanation, insertion)
        assert not baseline_raises_score(drops, "mean")


def test_a_curve_on_a_plateau_at_the_original_score_does_not_warn():
    # A faithful Insertion under a neutral baseline: from -9 up to f(x) = 3.3 at once, then
    # +-0.2 about it. Six of the ten baselined steps are above f(x) (a negative median), but
    # on average the steps are well below it: the curve's mean is what the area reads.
    fractions = np.linspace(0, 1, 11)
    scores = np.array([-9, 3.4, 3.5, 3.4, 3.2, 3.4, 3.5, 3.1, 3.2, 3.4, 3.3])
    drops = curve_score_drops(3.3, fractions, scores, insertion=True)
    np.testing.assert_allclose(drops, 3.3 - scores[:-1])
    assert baseline_raises_score(drops, "median") and not baseline_raises_score(drops, "mean")
    # Deletion scores every step but the first; below every pixel, Insertion every step.
    assert curve_score_drops(3.3, fractions, scores, insertion=False).size == 10
    assert curve_score_drops(3.3, fractions * 0.5, scores, insertion=True).size == 11


def test_subsets_are_bernoulli_and_upsample_to_any_aspect():
    subsets = mufidelity_subsets(9, 0.2, 500, np.random.default_rng(0))
    assert subsets.shape == (500, 9, 9) and subsets.dtype == bool
    assert subsets.mean() == pytest.approx(0.2, abs=0.01)
    again = mufidelity_subsets(9, 0.2, 500, np.random.default_rng(0))
    np.testing.assert_array_equal(subsets, again)
    pixels = subset_pixel_masks(subsets[:3], 20, 31)
    assert pixels.shape == (3, 20, 31)
    # (2y + 1) * 9 // 40 and (2x + 1) * 9 // 62 pick the cell of each pixel.
    assert pixels[1, 19, 30] == subsets[1, 8, 8]
    assert pixels[2, 0, 4] == subsets[2, 0, (2 * 4 + 1) * 9 // 62]
    with pytest.raises(ValueError, match="subsets must have shape"):
        subset_pixel_masks(subsets, 8, 31)


def test_subset_attribution_sums_cover_all_channels():
    explanation = np.arange(12.0).reshape(2, 2, 3)
    masks = np.array([[[True, False], [False, False]], [[False, False], [True, True]]])
    # Pixel (0,0) holds 0+1+2 = 3; pixels (1,0) and (1,1) hold 21 + 30 = 51.
    np.testing.assert_allclose(subset_attribution_sums(explanation, masks), [3.0, 51.0])


def test_average_stability_by_hand():
    base = np.array([[0.0, 1.0]])
    noisy = np.array([[[1.0, 1.0]], [[0.0, 3.0]]])
    value, distances = average_stability(base, noisy)  # squared l2, as Xplique's "l2"
    np.testing.assert_allclose(distances, [1.0, 4.0])
    assert value == pytest.approx(2.5)
    value, distances = average_stability(base, noisy, distance="l1")
    np.testing.assert_allclose(distances, [1.0, 2.0])
    # Normalised to unit L1 mass: [0, 1] vs [0.5, 0.5] -> 0.5; vs [0, 1] -> 0.
    value, _ = average_stability(base, noisy, normalise=True)
    assert value == pytest.approx(0.25)
    with pytest.raises(ValueError, match="distance must be one of"):
        average_stability(base, noisy, distance="cosine")
    with pytest.raises(ValueError, match="noisy maps must have shape"):
        average_stability(base, noisy[:, :, :1])


def test_stability_noise_stays_in_the_radius_and_in_pixel_range():
    image = np.random.default_rng(0).uniform(0, 255, (6, 7, 3)).astype(np.float32)
    noisy = stability_noise(image, 0.1, 50, np.random.default_rng(4))
    assert noisy.shape == (50, 6, 7, 3) and noisy.dtype == np.float32
    assert np.abs(noisy - image[None]).max() <= 25.5 + 1e-4
    assert noisy.min() >= 0.0 and noisy.max() <= 255.0
    assert np.abs(noisy - image[None]).max() > 20.0  # the radius is used
    np.testing.assert_array_equal(noisy, stability_noise(image, 0.1, 50, np.random.default_rng(4)))


def test_a_smooth_deterministic_explainer_is_stable():
    image, _ = _scene(16, 16)

    def smooth(x):  # a blurred intensity map: Lipschitz in the input
        return gaussian_blur(x, 2.0)[..., 0] / 255.0

    def erratic(x):  # a map that ignores its input
        return rng.random(x.shape[:2])

    rng = np.random.default_rng(0)
    neighbours = stability_noise(image, 0.1, 20, np.random.default_rng(1))
    stable, _ = average_stability(smooth(image), np.stack([smooth(n) for n in neighbours]))
    unstable, _ = average_stability(erratic(image), np.stack([erratic(n) for n in neighbours]))
    assert stable < 0.02 * np.sum(smooth(image) ** 2)
    assert stable < 0.05 * unstable


def test_deletion_images_in_batches_are_the_whole_curve_in_pieces():
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, (9, 13, 3)).astype(np.float32)
    explanation = rng.random((9, 13))
    baseline = np.zeros_like(image)
    fractions, whole = deletion_images(image, explanation, 10, 1.0, baseline, False)
    pieces = [
        deletion_images(image, explanation, 10, 1.0, baseline, False, slice(s, s + 4))
        for s in range(0, 11, 4)
    ]
    assert all(np.array_equal(fractions, f) for f, _ in pieces)
    assert np.array_equal(whole, np.concatenate([images for _, images in pieces]))
