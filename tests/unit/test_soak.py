"""The soak driver's pure pieces: the request mix, how a call's outcome is classified, and
the memory figures."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

import propscope
from propscope.v1 import explain_pb2
from propscope_dev.soak import (
    MODELS,
    PROPERTIES,
    CallSpec,
    Outcome,
    classify_call,
    parse_memory_kib,
    plan_call,
    repeated_images,
    summarize_memory,
)

SPEC = CallSpec(
    image=np.zeros((64, 64, 3), np.uint8),
    model="synth_hue",
    properties=tuple(PROPERTIES[:2]),
    steps=8,
    samples=2,
    seed=0,
    return_path_images=False,
)


def accepted() -> propscope.Event:
    return propscope.event_from_proto(
        explain_pb2.ExplainEvent(accepted=explain_pb2.Accepted(samples=2, steps=8))
    )


def result(
    name: str, samples: int = 2, images: int = 0, code: int = 0, steps: int = 8
) -> propscope.Event:
    message = explain_pb2.PropertyResult(
        property_name=name,
        steps=steps,
        samples=[
            explain_pb2.SampleResult(seed=i, path_images=[b"png"] * images) for i in range(samples)
        ],
    )
    message.status.code = code
    return propscope.event_from_proto(explain_pb2.ExplainEvent(property_result=message))


def done() -> propscope.Event:
    return propscope.event_from_proto(explain_pb2.ExplainEvent(done=explain_pb2.Done()))


def complete_stream() -> list[propscope.Event]:
    return [accepted(), result("object_hue"), result("patch"), done()]


def test_a_full_stream_is_completed():
    assert classify_call(complete_stream(), None, SPEC) == (Outcome.COMPLETED, "")


def test_resource_exhausted_is_a_rejection_only_before_the_first_event():
    error = propscope.PropscopeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams")
    assert classify_call([], error, SPEC)[0] is Outcome.REJECTED
    outcome, detail = classify_call([accepted()], error, SPEC)
    assert outcome is Outcome.REJECTED_AFTER_ACCEPTANCE and "after 1 events" in detail


@pytest.mark.parametrize(
    "events",
    [
        [],
        [accepted(), result("object_hue"), result("patch")],  # no Done
        [result("object_hue"), result("patch"), done()],  # no Accepted
        [accepted(), result("object_hue"), done()],  # a property missing
        [accepted(), result("object_hue"), result("patch", code=13), done()],
        [accepted(), result("object_hue"), result("patch", samples=1), done()],
        [accepted(), result("object_hue"), result("patch", images=9), done()],  # not asked
    ],
)
def test_incomplete_streams_are_unexpected(events):
    assert classify_call(events, None, SPEC)[0] is Outcome.UNEXPECTED


@pytest.mark.parametrize(
    "error",
    [propscope.PropscopeError(grpc.StatusCode.DEADLINE_EXCEEDED, "late"), RuntimeError("bug")],
)
def test_other_errors_are_unexpected(error):
    outcome, detail = classify_call([], error, SPEC)
    assert outcome is Outcome.UNEXPECTED and detail


def test_path_images_are_checked_when_asked():
    spec = dataclasses.replace(SPEC, return_path_images=True)
    full = [accepted(), result("object_hue", images=9), result("patch", images=9), done()]
    assert classify_call(full, None, spec)[0] is Outcome.COMPLETED
    short = [accepted(), result("object_hue", images=9), result("patch", images=8), done()]
    assert classify_call(short, None, spec)[0] is Outcome.UNEXPECTED
    # An adaptive path lengthened to 16 steps brings 17 images.
    longer = [accepted(), result("object_hue", images=17, steps=16), result("patch", images=9)]
    assert classify_call([*longer, done()], None, spec)[0] is Outcome.COMPLETED
    shorter = [accepted(), result("object_hue", images=5, steps=4), result("patch", images=9)]
    assert classify_call([*shorter, done()], None, spec)[0] is Outcome.UNEXPECTED


def test_the_mix_repeats_images_and_draws_fresh_ones():
    repeated = repeated_images()
    rng = np.random.default_rng(0)
    specs = [plan_call(rng, repeated) for _ in range(200)]
    reused = sum(any(s.image is image for image in repeated) for s in specs)
    assert 50 < reused < 150
    assert {s.model for s in specs} == set(MODELS)
    assert {p for s in specs for p in s.properties} == set(PROPERTIES)
    assert any(s.return_path_images for s in specs) and not all(s.return_path_images for s in specs)
    assert all(len(set(s.properties)) == len(s.properties) >= 1 for s in specs)


def test_memory_figures():
    status = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t9\n"
    assert parse_memory_kib(status) == {"VmHWM": 204800, "VmRSS": 102400}
    samples = [(t, 100.0 + t) for t in range(9)]  # 100..108 MiB over 8 s
    figures = summarize_memory(samples, hwm_mib=200.0)
    assert (figures.start_mib, figures.peak_mib, figures.end_mib) == (100.0, 108.0, 108.0)
    assert figures.first_quarter_mean_mib == 101.0 and figures.last_quarter_mean_mib == 107.0
    assert figures.growth_mib == 6.0 and figures.hwm_mib == 200.0 and figures.samples == 9
    assert figures.per_tenth_mib == tuple(100.0 + t for t in range(9))
