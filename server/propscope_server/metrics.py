"""Prometheus metrics, served on their own HTTP port (PROPSCOPE_METRICS_PORT)."""

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

RPC_TOTAL = Counter("propscope_rpc_total", "RPCs handled", ["method", "code"])
RPC_SECONDS = Histogram("propscope_rpc_seconds", "RPC latency", ["method"], buckets=LATENCY_BUCKETS)
STAGE_SECONDS = Histogram(
    "propscope_stage_seconds", "Time per stage of one property", ["stage"], buckets=LATENCY_BUCKETS
)
CACHE_LOOKUPS = Counter("propscope_cache_lookups_total", "Path cache lookups", ["result"])
CACHE_BYTES_WRITTEN = Counter(
    "propscope_cache_bytes_written_total", "Bytes stored in the path cache"
)
CACHE_ERRORS = Counter("propscope_cache_errors_total", "Path cache calls that failed or timed out")
EDITS_PER_REQUEST = Histogram(
    "propscope_edits_per_request",
    "Edited images per request",
    buckets=(1, 10, 50, 100, 500, 1000, 5000),
)
INFLIGHT_STREAMS = Gauge("propscope_inflight_streams", "Explain streams in progress")
TRITON_SECONDS = Histogram(
    "propscope_triton_seconds",
    "Triton call latency",
    ["model", "kind", "outcome"],
    buckets=LATENCY_BUCKETS,
)
