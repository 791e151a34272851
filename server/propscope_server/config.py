"""Gateway configuration, from PROPSCOPE_* environment variables (or a .env file)."""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, Field, TypeAdapter, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from propscope_server.backends.triton_url import parse_triton_url
from propscope_server.cache.redis_url import parse_redis_url

OUTPUT_KINDS = ("logits", "probabilities")
RESIZE_MODES = ("squash", "center_crop", "letterbox")
# The share of the container's memory limit that requests' estimates may reserve; the
# rest absorbs what the estimates leave out (the allocator's free lists, messages being
# received before admission, Triton calls' gRPC buffers, thread stacks).
MEMORY_BUDGET_FRACTION = 0.6
# The gateway's own memory (tests/integration/test_memory_admission.py): 140 MiB RSS idle,
# 142 MiB after a first small request; 304 MiB once two 4096 x 4096 requests have ended
# (the allocator keeps freed memory, which the next requests reuse).
GATEWAY_BASELINE_BYTES = 256 * 1024 * 1024
# cgroup v2, then v1: the container's memory limit ("max" or a huge number: none).
CGROUP_MEMORY_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def container_memory_bytes() -> int:
    """The container's memory limit, else the machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_MEMORY_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(int(text), physical)
    return physical


def derived_memory_budget(limit_bytes: int, cache_bytes: int = 0) -> int:
    """The memory requests may reserve under a memory limit: its MEMORY_BUDGET_FRACTION,
    less the gateway's baseline and its in-process cache (none with Redis)."""
    budget = int(limit_bytes * MEMORY_BUDGET_FRACTION) - GATEWAY_BASELINE_BYTES - cache_bytes
    return max(0, budget)


class PreprocessingConfig(BaseModel):
    """What a classifier's owners did to pixels (scale to [0, 1], then (x - mean) / std,
    after resizing) and what its output holds. None: not declared at this level."""

    model_config = {"extra": "forbid"}

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output_kind: str | None = Field(None, pattern="^(logits|probabilities)$")
    resize: str | None = Field(None, pattern="^(squash|center_crop|letterbox)$")


class Limits(BaseModel):
    max_request_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    # All images of all paths of one request together, in pixels. What a request may
    # take in memory is estimated and admitted against memory_budget_bytes (api/memory.py).
    max_path_pixels: int = 64 * 1024 * 1024
    max_properties: int = 32
    max_steps: int = 256
    max_samples: int = 32
    min_permutations: int = 100
    max_permutations: int = 100_000
    # Edited images of one request (samples x steps x edited properties): the cost guard.
    max_edits: int = 20_000
    # Forward passes of one Attribute or EvaluateAttribution request (Sobol grid 8,
    # N 32: 2,112; stability multiplies its method's by its samples + 1).
    max_forward_passes: int = 200_000
    # EVA: forward passes sampled inside the model per Attribute request (a sampled row's
    # points and attack iterates: the first row when verified, every row for a hybrid);
    # stability multiplies them by its samples + 1.
    max_eva_sample_passes: int = Field(1_000_000, ge=1)
    # EvaluateConsistency (MeGe, ReCo): forward and gradient passes of one request (per
    # model and image: 1 + Sobol's N (g^2 + 2) + RISE's masks + 1 gradient pass), models
    # and images per request.
    max_consistency_passes: int = Field(500_000, ge=1)
    max_consistency_models: int = Field(8, ge=2)
    max_consistency_images: int = Field(64, ge=2)
    # BuildGraph (causal graph): forward passes of one request (the plan's bound, the
    # pass-count formula of scoring/causal_graph.py), and images per request.
    max_graph_passes: int = Field(20_000, ge=1)
    max_graph_images: int = Field(64, ge=1)
    # FitConcepts / DecomposeConcept (CRAFT): forward passes of one request (g: crops +
    # images; h: images x N (r + 2) + r + 2), and images per request.
    max_concept_passes: int = Field(50_000, ge=1)
    max_concept_images: int = Field(64, ge=1)
    # Visualize (MACO): steps and crops per step (one gradient pass per crop), the
    # picture's side, and spectrum images per request.
    max_visualize_steps: int = Field(1024, ge=1)
    max_visualize_crops: int = Field(128, ge=1)
    max_visualize_side_px: int = Field(512, ge=16)
    max_visualize_images: int = Field(64, ge=1)
    # Interactions (Sobol indices over composed edits): the design size N (a power of two)
    # and the composed images of one request (N (P + 2) design rows, N more with a
    # second-order pair); its edits count against max_edits, its images against
    # max_path_pixels and its forward passes against max_forward_passes.
    max_interaction_design_size: int = Field(1024, ge=2)
    max_interaction_images: int = Field(8192, ge=8)
    # Admission control: a stream beyond these is refused, never queued. A connection
    # and a peer (client address) each get a share, so one greedy caller leaves room
    # for the others; with auth off the peer's share stands in for the tenant's.
    max_streams_total: int = Field(64, ge=1)
    max_streams_per_tenant: int = Field(32, ge=1)
    max_streams_per_peer: int = Field(32, ge=1)
    max_streams_per_connection: int = Field(16, ge=1)
    # Per-tenant overrides of max_streams_per_tenant, by tenant name.
    tenant_max_streams: dict[str, int] = {}
    # The longest a stream may live, whatever deadline its client sets (a call without
    # one gets this): a stream never holds its slot and its Triton work forever.
    max_call_s: float = Field(900.0, gt=0)
    # A stream whose next message waits this long for its client to read is cancelled:
    # its slot and its Triton work are freed (a client that answers pings but never
    # reads would otherwise hold them until max_call_s).
    send_timeout_s: float = Field(30.0, gt=0)


class AuthSettings(BaseModel):
    """Bearer tokens, each mapped to a tenant. No tokens: auth is off and every
    caller is tenant "default"."""

    tokens: dict[str, str] = {}
    # A JSON file {"<token>": "<tenant>", ...}, read at start (a mounted Secret).
    tokens_file: Path | None = None
    # True: refuse to start without tokens, so a missing Secret cannot turn auth off.
    required: bool = False
    health_open: bool = True
    reflection_open: bool = False

    def token_tenants(self) -> dict[str, str]:
        tokens = dict(self.tokens)
        if self.tokens_file is not None:
            tokens.update(TOKEN_FILE.validate_json(self.tokens_file.read_bytes()))
        if any(not token.strip() or not tenant.strip() for token, tenant in tokens.items()):
            raise ValueError("auth tokens and tenant names must not be empty")
        if self.required and not tokens:
            raise ValueError("PROPSCOPE_AUTH__REQUIRED is set but no tokens are configured")
        return tokens


TOKEN_FILE = TypeAdapter(dict[str, str])


class TlsSettings(BaseModel):
    """PEM files. A client CA turns on mutual TLS: clients must present a certificate."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None


class Settings(BaseSettings):
    # Errors name the setting but never echo its value: REDIS_URL may hold a password.
    model_config = SettingsConfigDict(
        env_prefix="PROPSCOPE_", env_nested_delimiter="__", hide_input_in_errors=True
    )

    listen_address: str = "127.0.0.1:50051"
    # A plaintext port serving only gRPC health, for probes that cannot speak (m)TLS
    # (the kubelet's gRPC probes). Unset: health is served on listen_address only.
    health_listen_address: str | None = None
    # One Triton (host:port), several (host1:port1,host2:port2) or every address of a
    # DNS name (dns:///name:port, a headless Service): calls go round robin over them.
    triton_url: str = "127.0.0.1:8001"
    # How often a dns:/// triton_url is resolved again (also whenever no endpoint answers).
    triton_resolve_interval_s: float = Field(30.0, gt=0)
    # How long an endpoint that failed rests before a liveness probe may put it back in
    # rotation; doubles up to 30 s while its probes fail.
    triton_endpoint_retry_s: float = Field(1.0, gt=0)
    # Without a Redis URL the gateway keeps paths in an in-process LRU cache.
    redis_url: str | None = Field(None, validation_alias="REDIS_URL")
    cache_ttl_s: int = 24 * 3600
    cache_timeout_s: float = Field(0.5, gt=0)
    # After a failed cache call the cache is skipped this long (or until a health ping).
    cache_retry_after_s: float = 2.0
    # True: every tenant shares one cache namespace (hits across tenants).
    cache_shared_namespace: bool = False
    memory_cache_bytes: int = 256 * 1024 * 1024
    # Memory the running requests' estimates may reserve (api/memory.py); a request that
    # does not fit is refused with RESOURCE_EXHAUSTED. Unset: derived_memory_budget of
    # the container's memory limit (or the machine's memory).
    memory_budget_bytes: int | None = Field(None, ge=0)
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    log_format: str = Field("json", pattern="^(json|text)$")
    # Properties of one request explained at the same time.
    property_concurrency: int = Field(4, ge=1)
    # Batches of one attribution in flight at once: Triton overlaps them while the
    # gateway perturbs the next (memory: this x max_batch_size perturbed inputs).
    attribution_concurrency: int = Field(3, ge=1)
    # Batches of one causal graph's intervention passes in flight at once (memory: this x
    # max_batch_size copies of the model's input). 1 on CPU: the gateway's work per batch
    # is small and overlapping it took cores from the model (bench/graph.py); more for a
    # model with several instances or on a GPU.
    graph_concurrency: int = Field(1, ge=1)
    # Editor calls of one Interactions request in flight at once (one per distinct prefix
    # of strengths of a stage; memory: this x the call's composed images).
    interaction_concurrency: int = Field(4, ge=1)
    # Bound on each Triton call within the call's deadline: a guard against a hung model
    # (a call that hits it fails its property).
    triton_timeout_s: float = Field(300.0, gt=0)
    # Retries of a Triton call that failed with UNAVAILABLE, with doubling backoff.
    triton_retries: int = Field(2, ge=0)
    triton_retry_backoff_s: float = 0.1
    # Bound on each metadata, readiness and repository call (milliseconds when healthy):
    # a hung Triton is UNAVAILABLE after this, not after triton_timeout_s.
    triton_metadata_timeout_s: float = Field(5.0, gt=0)
    # A sick model (its worker died) is reloaded at once, then again after this,
    # doubling up to model_heal_backoff_max_s, until a probe inference answers.
    model_heal_backoff_s: float = Field(1.0, gt=0)
    model_heal_backoff_max_s: float = Field(60.0, gt=0)
    # Models Triton's repository holds but does not load at its start, which the gateway
    # loads (every version) when a request first names one; JSON list, e.g.
    # '["synth_patch_folds"]'. Needs --model-control-mode=explicit. The dev stack sets it
    # for the fold models of MeGe/ReCo so that their four workers do not slow every start.
    load_on_demand: tuple[str, ...] = ()
    health_poll_s: float = Field(2.0, gt=0)
    # On SIGTERM: health goes NOT_SERVING at once; new calls are still served for
    # shutdown_drain_s (while load balancers notice), then refused; streams in flight
    # get shutdown_grace_s more to finish.
    shutdown_drain_s: float = 1.0
    shutdown_grace_s: float = 10.0
    # JSON file mapping classifier name -> PreprocessingConfig.
    preprocessing_file: Path | None = None
    limits: Limits = Limits()
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()

    @field_validator("redis_url")
    @classmethod
    def _known_redis_url(cls, url: str | None) -> str | None:
        """A malformed URL stops the start; a Redis that is down only costs misses."""
        if url is not None:
            parse_redis_url(url)
        return url

    @field_validator("triton_url")
    @classmethod
    def _known_triton_url(cls, url: str) -> str:
        parse_triton_url(url)
        return url

    def memory_budget(self) -> int:
        """memory_budget_bytes, or the budget the container's memory limit allows."""
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        cache = 0 if self.redis_url else self.memory_cache_bytes
        return derived_memory_budget(container_memory_bytes(), cache)

    @cached_property
    def preprocessing(self) -> dict[str, PreprocessingConfig]:
        if self.preprocessing_file is None:
            return {}
        raw = json.loads(self.preprocessing_file.read_text())
        return {name: PreprocessingConfig(**spec) for name, spec in raw.items()}
