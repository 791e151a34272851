"""MeGe, ReCo and the Spearman distance (scoring/consistency.py), with hand-computed
answers and Xplique's rules."""

from __future__ import annotations

import numpy as np
import pytest

from propscope_server.scoring import consistency


def test_distance_is_zero_for_the_same_ranking_and_one_for_unrelated_maps() -> None:
    a = np.arange(16.0).reshape(4, 4)
    assert consistency.spearman_distance(a, a) == 0.0
    assert consistency.spearman_distance(a, a**3 + 7) == 0.0  # monotone: same ranks
    assert consistency.spearman_distance(a, -a) == 0.0  # |rho| = 1
    # rho = 0 exactly: ranks (1, 2, 3, 4) against (2, 4, 1, 3) -> sum d^2 = 10 = n(n^2-1)/12
    assert consistency.spearman_distance(
        np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 1, 3])
    ) == pytest.approx(1.0)


def test_distance_matches_the_formula_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((8, 8)), rng.random((8, 8))
    ranks_a = np.argsort(np.argsort(a.ravel()))
    ranks_b = np.argsort(np.argsort(b.ravel()))
    rho = np.corrcoef(ranks_a, ranks_b)[0, 1]
    assert consistency.spearman_distance(a, b) == pytest.approx(np.sqrt(1 - abs(rho)))


def test_channels_are_averaged_and_nan_read_as_zero() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.random((6, 6, 3))
    assert consistency.spearman_distance(rgb, rgb.mean(axis=-1)) == 0.0
    with_nan = rgb.mean(axis=-1).copy()
    with_nan[0, 0] = np.nan
    zeroed = with_nan.copy()
    zeroed[0, 0] = 0.0
    assert consistency.spearman_distance(with_nan, zeroed) == 0.0


def test_constant_map_has_no_distance() -> None:
    assert np.isnan(consistency.spearman_distance(np.ones((4, 4)), np.arange(16.0)))


def test_identical_models_give_mege_one_and_no_reco() -> None:
    rng = np.random.default_rng(2)
    one = rng.random((5, 8, 8))
    maps = np.stack([one, one, one])
    predictions = np.zeros((3, 5), dtype=int)
    pairs = consistency.pair_distances(maps, predictions)
    assert len(pairs.agreeing) == 3 * 5 and len(pairs.disagreeing) == 0
    assert consistency.mege(pairs.agreeing) == 1.0
    assert consistency.reco(pairs.agreeing, pairs.disagreeing) is None


def test_labels_follow_xplique_rule() -> None:
    rng = np.random.default_rng(3)
    maps = rng.random((2, 3, 4, 4))
    predictions = np.array([[0, 0, 1], [0, 1, 0]])
    labels = np.array([0, 0, 1])
    pairs = consistency.pair_distances(maps, predictions, labels)
    # image 0: both right -> S=; image 1: only model 0 right -> S!=; image 2: only
    # model 0 right -> S!=.
    assert len(pairs.agreeing) == 1 and len(pairs.disagreeing) == 2 and pairs.both_wrong == 0
    labels = np.array([1, 0, 0])  # image 0: both wrong, left out
    pairs = consistency.pair_distances(maps, predictions, labels)
    assert pairs.both_wrong == 1 and len(pairs.agreeing) == 0 and len(pairs.disagreeing) == 2
    # Without labels the predictions decide: image 0 agrees, images 1 and 2 do not.
    pairs = consistency.pair_distances(maps, predictions)
    assert len(pairs.agreeing) == 1 and len(pairs.disagreeing) == 2


def test_constant_maps_are_counted_and_left_out() -> None:
    maps = np.stack([np.stack([np.ones((4, 4)), np.arange(16.0).reshape(4, 4)])] * 2)
    pairs = consistency.pair_distances(maps, np.zeros((2, 2), dtype=int))
    assert pairs.undefined == 1 and len(pairs.agreeing) == 1


def test_mege_is_one_over_one_plus_mean() -> None:
    assert consistency.mege(np.array([0.2, 0.6])) == pytest.approx(1 / 1.4)
    assert consistency.mege(np.array([])) is None


def test_reco_separable_sets_give_one_and_reversed_give_zero() -> None:
    assert consistency.reco(np.array([0.1, 0.2]), np.array([0.5, 0.9])) == 1.0
    assert consistency.reco(np.array([0.5, 0.9]), np.array([0.1, 0.2])) == 0.0


def test_reco_hand_computed_overlap() -> None:
    # S= {0.1, 0.3, 0.6}, S!= {0.2, 0.5, 0.7}: threshold between 0.3 and 0.5 keeps
    # 2/3 of S= below and 2/3 of S!= above -> 1/3; no threshold does better.
    agreeing, disagreeing = np.array([0.1, 0.3, 0.6]), np.array([0.2, 0.5, 0.7])
    assert consistency.reco(agreeing, disagreeing) == pytest.approx(1 / 3)
    assert consistency.reco(agreeing, np.array([])) is None


def test_reco_is_at_least_xplique_scan() -> None:
    rng = np.random.default_rng(4)
    agreeing, disagreeing = rng.random(50) * 0.8, rng.random(70) * 0.8 + 0.2
    total = np.concatenate([agreeing, disagreeing])
    xplique = 0.0
    for gamma in np.sort(total)[:: len(total) // 20 + 1]:
        tpr = np.sum(agreeing < gamma) / (np.sum(agreeing < gamma) + np.sum(agreeing > gamma))
        tnr = np.sum(disagreeing > gamma) / (
            np.sum(disagreeing > gamma) + np.sum(disagreeing < gamma)
        )
        xplique = max(xplique, tpr + tnr - 1)
    ours = consistency.reco(agreeing, disagreeing)
    assert ours >= xplique - 1e-12
    assert ours <= 1.0


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="labels"):
        consistency.pair_distances(np.zeros((2, 3, 4)), np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="maps"):
        consistency.pair_distances(np.zeros((2, 2, 4)), np.zeros((2, 3)))
