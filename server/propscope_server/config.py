"""Gateway configuration, from PROPSCOPE_* environment variables (or a .env file)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PreprocessingConfig(BaseModel):
    """What a classifier's owners did to pixels: scale to [0, 1], then (x - mean) / std."""

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output_kind: str = Field("logits", pattern="^(logits|probabilities)$")


class Limits(BaseModel):
    max_request_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    # All images of all paths of one request together (the edit budget in pixels).
    max_path_pixels: int = 256 * 1024 * 1024
    max_properties: int = 32
    max_steps: int = 256
    max_samples: int = 32
    min_permutations: int = 100
    max_permutations: int = 100_000
    # Edited images of one request (samples x steps x edited properties): the cost guard.
    max_edits: int = 20_000
    # Admission control: an Explain stream beyond these is refused, never queued.
    max_streams_total: int = 64
    max_streams_per_tenant: int = 32
    # Per-tenant overrides of max_streams_per_tenant, by tenant name.
    tenant_max_streams: dict[str, int] = {}


class AuthSettings(BaseModel):
    """Bearer tokens, each mapped to a tenant. No tokens: auth is off and every
    caller is tenant "default"."""

    tokens: dict[str, str] = {}
    # A JSON file {"<token>": "<tenant>", ...}, read at start (a mounted Secret).
    tokens_file: Path | None = None
    health_open: bool = True
    reflection_open: bool = False

    def token_tenants(self) -> dict[str, str]:
        tokens = dict(self.tokens)
        if self.tokens_file is not None:
            tokens.update(json.loads(self.tokens_file.read_text()))
        return tokens


class TlsSettings(BaseModel):
    """PEM files. A client CA turns on mutual TLS: clients must present a certificate."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROPSCOPE_", env_nested_delimiter="__")

    listen_address: str = "127.0.0.1:50051"
    # A plaintext port serving only gRPC health, for probes that cannot speak (m)TLS
    # (the kubelet's gRPC probes). Unset: health is served on listen_address only.
    health_listen_address: str | None = None
    triton_url: str = "127.0.0.1:8001"
    # Without a Redis URL the gateway keeps paths in an in-process LRU cache.
    redis_url: str | None = Field(None, validation_alias="REDIS_URL")
    cache_ttl_s: int = 24 * 3600
    cache_timeout_s: float = 0.5
    # After a failed cache call the cache is skipped this long (or until a health ping).
    cache_retry_after_s: float = 2.0
    # True: every tenant shares one cache namespace (hits across tenants).
    cache_shared_namespace: bool = False
    memory_cache_bytes: int = 256 * 1024 * 1024
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    log_format: str = Field("json", pattern="^(json|text)$")
    # Properties of one request explained at the same time.
    property_concurrency: int = 4
    # Bound on every Triton call when the caller sets no deadline.
    triton_timeout_s: float = 300.0
    # Retries of a Triton call that failed with UNAVAILABLE, with doubling backoff.
    triton_retries: int = 2
    triton_retry_backoff_s: float = 0.1
    health_poll_s: float = 2.0
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

    @cached_property
    def preprocessing(self) -> dict[str, PreprocessingConfig]:
        if self.preprocessing_file is None:
            return {}
        raw = json.loads(self.preprocessing_file.read_text())
        return {name: PreprocessingConfig(**spec) for name, spec in raw.items()}
