"""Prometheus metrics, served on their own HTTP port (PROPSCOPE_METRICS_PORT).

docs/operations.md lists them with what each is for; deploy/grafana plots them and
deploy/prometheus/alerts.yml alerts on them."""

import platform

import grpc
import prometheus_client
from prometheus_client import Counter, Gauge, Histogram, Info

import propscope_server
from propscope.v1 import explain_pb2

# A `_created` series per counter and histogram would double the families to no use
# (Prometheus reads resets from the counters themselves).
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

BUILD_INFO = Info("propscope_build", "The gateway's release, API and runtime (value 1)")
BUILD_INFO.info(
    {
        "version": propscope_server.__version__,
        "api_version": explain_pb2.DESCRIPTOR.package,
        "python": platform.python_version(),
        "grpc": grpc.__version__,
    }
)

# The server metrics of go-grpc-prometheus, with its names, labels and values (grpc_code
# as Go spells it: OK, InvalidArgument, Canceled), so that stock gRPC dashboards and alerts
# apply. Recorded for every registered method by api/rpc_metrics.py.
GRPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
GRPC_STARTED = Counter(
    "grpc_server_started_total", "Total number of RPCs started on the server.", GRPC_LABELS
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    [*GRPC_LABELS, "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Histogram of response latency (seconds) of gRPC that had been application-level "
    "handled by the server.",
    GRPC_LABELS,
    buckets=LATENCY_BUCKETS,
)
GRPC_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total",
    "Total number of RPC stream messages received on the server.",
    GRPC_LABELS,
)
GRPC_MSG_SENT = Counter(
    "grpc_server_msg_sent_total",
    "Total number of gRPC stream messages sent by the server.",
    GRPC_LABELS,
)

# Deprecated for grpc_server_handled_total and grpc_server_handling_seconds; exported beside
# them for one release (docs/operations.md).
RPC_TOTAL = Counter("propscope_rpc_total", "RPCs handled (deprecated)", ["method", "code"])
RPC_SECONDS = Histogram(
    "propscope_rpc_seconds", "RPC latency (deprecated)", ["method", "code"], buckets=LATENCY_BUCKETS
)
PROPERTY_RESULTS = Counter(
    "propscope_property_results_total",
    "Explained properties by classifier and outcome: status OK or the failure's code, spelt "
    "as grpc_code (FailedPrecondition), and for OK results whether significant, relevant and "
    "flipped (empty for failures)",
    ["model", "status", "significant", "relevant", "flipped"],
)
INFLIGHT_STREAMS = Gauge("propscope_inflight_streams", "Explain streams in progress")
ADMISSION_REJECTIONS = Counter(
    "propscope_admission_rejections_total",
    "Explain calls refused up front because a concurrency limit was reached",
    ["limit"],
)
MEMORY_BUDGET_BYTES = Gauge(
    "propscope_memory_budget_bytes", "Gateway memory for requests (memory_budget_bytes)"
)
MEMORY_RESERVED_BYTES = Gauge(
    "propscope_memory_reserved_bytes", "Memory the running requests' estimates reserve"
)
STALLED_STREAMS = Counter(
    "propscope_stalled_streams_total",
    "Streams ended because their client took no message for send_timeout_s",
)
AUTH_FAILURES = Counter(
    "propscope_auth_failures_total", "Calls refused for a missing or unknown token", ["reason"]
)
STAGE_SECONDS = Histogram(
    "propscope_stage_seconds", "Time per stage of one property", ["stage"], buckets=LATENCY_BUCKETS
)
EDITS_PER_REQUEST = Histogram(
    "propscope_edits_per_request",
    "Edited images a request plans (samples x steps x edited properties; cache hits included)",
    buckets=(1, 10, 50, 100, 500, 1000, 5000, 10_000, 20_000, 50_000),
)
CACHE_LOOKUPS = Counter("propscope_cache_lookups_total", "Path cache lookups", ["result"])
CACHE_BYTES_READ = Counter("propscope_cache_bytes_read_total", "Bytes read from the path cache")
CACHE_BYTES_WRITTEN = Counter(
    "propscope_cache_bytes_written_total", "Bytes stored in the path cache"
)
CACHE_ERRORS = Counter(
    "propscope_cache_errors_total",
    "Path cache calls that failed or timed out (the request went on without the cache)",
    ["operation"],
)
CACHE_REJECTED_VALUES = Counter(
    "propscope_cache_rejected_values_total",
    "Cached values that failed their content hash or belong to another key; served as misses",
)
DEPENDENCY_UP = Gauge(
    "propscope_dependency_up", "1 when the dependency answered its last health poll", ["dependency"]
)
TRITON_SECONDS = Histogram(
    "propscope_triton_seconds",
    "Triton call latency",
    ["model", "kind", "outcome"],
    buckets=LATENCY_BUCKETS,
)
TRITON_ERRORS = Counter(
    "propscope_triton_errors_total", "Triton calls that failed", ["model", "kind", "code"]
)
MODEL_HEALTHY = Gauge(
    "propscope_model_healthy",
    "0 while a model is sick (its worker died; its requests are refused while it is reloaded)",
    ["model"],
)
TRITON_ENDPOINT_CALLS = Counter(
    "propscope_triton_endpoint_calls_total",
    "Calls to each Triton endpoint (every try of a retried call) by outcome: ok, error, "
    "unavailable (the endpoint left the rotation)",
    ["endpoint", "outcome"],
)
TRITON_ENDPOINT_UP = Gauge(
    "propscope_triton_endpoint_up",
    "1 while the Triton endpoint is in the gateway's rotation, 0 while it rests after failing",
    ["endpoint"],
)
TRITON_ENDPOINTS = Gauge(
    "propscope_triton_endpoints", "Triton endpoints the gateway knows (listed or resolved)"
)
TRITON_RETRIES = Counter(
    "propscope_triton_retries_total", "Triton calls retried after a transient error", ["kind"]
)
METHOD_RUNS = Counter(
    "propscope_method_runs_total", "Explanation method runs by outcome", ["method", "outcome"]
)
METHOD_SECONDS = Histogram(
    "propscope_method_seconds",
    "Wall time of one explanation method run (plan and work)",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
FORWARD_PASSES = Counter(
    "propscope_forward_passes_total",
    "Forward passes the attribution and evaluation methods ran (cache hits run none)",
    ["method"],
)
