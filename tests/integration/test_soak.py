"""The short soak of `make test`: 32 concurrent Explain streams for 15 s (`make soak` runs
the same driver for 150 s on a stack of its own)."""

from __future__ import annotations

from propscope_dev.soak import run_soak

# The admission limit per tenant: every call fits, none needs to be rejected.
STREAMS = 32
DURATION_S = 15.0
# A fresh gateway grows by about 110 MiB under this load (buffers, thread pools) and then stays
# flat (make soak: +5 MiB between the first and last quarter of 150 s). 15 s cannot tell a slow
# leak from that warm-up, so this only catches runaway growth, such as an unbounded queue.
MAX_GROWTH_MIB = 256.0


def test_concurrent_streams_complete_or_are_rejected_up_front(live_stack):
    report = run_soak(live_stack.gateway, STREAMS, DURATION_S, live_stack.pids["gateway"])
    print(report.to_markdown())  # the figures, with -s
    assert report.unexpected == 0, report.errors
    assert report.rejected_after_acceptance == 0, report.errors
    assert min(report.completed_per_worker) >= 1, report.completed_per_worker
    assert report.healthy_after
    assert report.memory.peak_mib - report.memory.start_mib < MAX_GROWTH_MIB, report.memory
