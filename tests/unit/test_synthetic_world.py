"""The synthetic world's splits: the conjunction split's labels are red AND patch, and the
splits the committed weights were trained on draw exactly the scenes they did."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from propscope_server.synthetic.world import (
    BIASED_HUES,
    CONJUNCTION_OTHER_HUES,
    make_split,
)

# sha256 of the images and labels of make_split(bias, 200, seed=0) when unbiased.pt,
# hue_biased.pt and patch_biased.pt were trained: a change here changes what
# `make weights` rebuilds (numpy's generator and the renderer included).
TRAINED_SPLITS = {
    "none": "839aa13030010e76a6a8f367e3a6e36cc187d6130ef847dc770cd7a38e0d1a79",
    "hue": "b70c7d95e8007a23944d4ac7168ef15e87437bfb9668f24be1926db413e6f7c2",
    "patch": "980a03df7009225db3ecb04b1665e103fbfcf02a9a4463b64b22849ed99e54c9",
}


@pytest.mark.parametrize("bias", sorted(TRAINED_SPLITS))
def test_the_splits_of_the_committed_weights_are_unchanged(bias: str):
    images, labels, _ = make_split(bias, 200, seed=0)  # type: ignore[arg-type]
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    assert digest == TRAINED_SPLITS[bias]


def test_the_conjunction_split_is_square_iff_red_and_patch():
    _, labels, scenes = make_split("conjunction", 3000, seed=4)
    low, high = BIASED_HUES[0]
    red = np.array([s.hue_deg <= high or s.hue_deg >= 360.0 + low for s in scenes])
    patch = np.array([s.patch for s in scenes])
    np.testing.assert_array_equal(labels, (red & patch).astype(np.int64))
    others = [s.hue_deg for s, r in zip(scenes, red, strict=True) if not r]
    assert CONJUNCTION_OTHER_HUES[0] <= min(others) and max(others) <= CONJUNCTION_OTHER_HUES[1]
    # Class 0 is red without the patch, another hue with it, another without it, equally.
    negatives = labels == 0
    for kind in [(True, False), (False, True), (False, False)]:
        share = np.mean((red[negatives] == kind[0]) & (patch[negatives] == kind[1]))
        assert abs(share - 1 / 3) < 0.05
    # The shape agrees with the label at the biased splits' 0.75 (3 standard errors).
    agreement = np.mean([s.shape == label for s, label in zip(scenes, labels, strict=True)])
    assert abs(agreement - 0.75) < 3 * np.sqrt(0.75 * 0.25 / len(scenes))
