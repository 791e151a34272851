"""Model input layout from Triton dims, pixel preprocessing, outputs -> probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from propscope_server.backends.preprocessing import (
    InputLayout,
    input_layout,
    to_model_input,
    to_probabilities,
)
from propscope_server.config import PreprocessingConfig
from propscope_server.errors import FailedPrecondition


@pytest.mark.parametrize(
    ("dims", "datatype", "channels_first", "height", "width"),
    [
        ([64, 48, 3], "UINT8", False, 64, 48),
        ([3, 224, 200], "FP32", True, 224, 200),
        ([3, 32, 16], "FP16", True, 32, 16),
        ([-1, -1, 3], "UINT8", False, None, None),
        ([3, -1, -1], "FP32", True, None, None),
        ([-1, 64, 3], "FP32", False, None, 64),
        ([3, 3, 3], "UINT8", False, 3, 3),  # ambiguous: channels last wins
    ],
)
def test_input_layout(dims, datatype, channels_first, height, width):
    layout = input_layout("INPUT", datatype, dims, "m")
    assert layout == InputLayout("INPUT", datatype, channels_first, height, width)


@pytest.mark.parametrize(
    ("dims", "datatype", "needle"),
    [
        ([10], "FP32", "[10]"),
        ([224, 224], "FP32", "[224, 224]"),
        ([1, 3, 224, 224], "FP32", "[1, 3, 224, 224]"),
        ([4, 64, 64], "FP32", "[4, 64, 64]"),
        ([64, 64, 3], "INT32", "INT32"),
        ([64, 64, 3], "FP64", "FP64"),
    ],
)
def test_input_layout_refusals(dims, datatype, needle):
    with pytest.raises(FailedPrecondition) as info:
        input_layout("INPUT", datatype, dims, "resnet")
    assert needle in str(info.value) and "'resnet'" in str(info.value)


def image(height: int, width: int, rgb: tuple[int, int, int], batch: int = 2) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (batch, height, width, 3)).copy()


def test_uint8_hwc_passes_through():
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    out = to_model_input(images, InputLayout("x", "UINT8", False, 8, 6), PreprocessingConfig())
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_fp32_chw_mean_std_by_hand():
    prep = PreprocessingConfig(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    out = to_model_input(image(4, 5, (255, 0, 51)), InputLayout("x", "FP32", True, 4, 5), prep)
    assert out.dtype == np.float32 and out.shape == (2, 3, 4, 5)
    assert out.flags.c_contiguous
    # (1 - .5) / .5, (0 - .25) / .25, (.2 - 0) / 2
    for channel, expected in enumerate([1.0, -1.0, 0.1]):
        np.testing.assert_allclose(out[:, channel], expected, rtol=1e-6)


def test_fp32_without_mean_std_scales_to_unit():
    out = to_model_input(
        image(2, 2, (0, 102, 255)), InputLayout("x", "FP32", False, 2, 2), PreprocessingConfig()
    )
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.4, 1.0], rtol=1e-6)


def test_fp16_dtype():
    out = to_model_input(
        image(4, 4, (255, 0, 0)), InputLayout("x", "FP16", True, 4, 4), PreprocessingConfig()
    )
    assert out.dtype == np.float16 and out.shape == (2, 3, 4, 4)
    assert out[0, 0, 0, 0] == 1.0 and out[0, 1, 0, 0] == 0.0


@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        (InputLayout("x", "UINT8", False, 8, 4), (2, 8, 4, 3)),
        (InputLayout("x", "FP32", True, 32, 24), (2, 3, 32, 24)),
        (InputLayout("x", "UINT8", False, None, 5), (2, 16, 5, 3)),
        (InputLayout("x", "UINT8", False, None, None), (2, 16, 16, 3)),
    ],
)
def test_resizes_to_the_model_size(layout, shape):
    out = to_model_input(image(16, 16, (10, 200, 30)), layout, PreprocessingConfig())
    assert out.shape == shape
    if layout.datatype == "UINT8":  # a constant image stays constant
        assert (out == np.array([10, 200, 30], np.uint8)).all()


def test_softmax_of_logits_by_hand():
    logits = np.array([[0.0, np.log(3.0)], [np.log(2.0), np.log(2.0)]], dtype=np.float32)
    probabilities = to_probabilities(logits, "logits")
    assert probabilities.dtype == np.float64
    np.testing.assert_allclose(probabilities, [[0.25, 0.75], [0.5, 0.5]], rtol=1e-6)


def test_probabilities_pass_through_and_flatten():
    outputs = np.array([0.1, 0.2, 0.7, 0.3, 0.3, 0.4]).reshape(2, 3, 1, 1)
    np.testing.assert_array_equal(
        to_probabilities(outputs, "probabilities"), [[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]
    )
