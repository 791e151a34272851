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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROPSCOPE_", env_nested_delimiter="__")

    listen_address: str = "127.0.0.1:50051"
    triton_url: str = "127.0.0.1:8001"
    # Without a Redis URL the gateway keeps paths in an in-process LRU cache.
    redis_url: str | None = Field(None, validation_alias="REDIS_URL")
    cache_ttl_s: int = 24 * 3600
    cache_timeout_s: float = 0.5
    memory_cache_bytes: int = 256 * 1024 * 1024
    metrics_port: int = 0
    # Properties of one request explained at the same time.
    property_concurrency: int = 4
    # Bound on every Triton call when the caller sets no deadline.
    triton_timeout_s: float = 300.0
    health_poll_s: float = 2.0
    # JSON file mapping classifier name -> PreprocessingConfig.
    preprocessing_file: Path | None = None
    limits: Limits = Limits()

    @cached_property
    def preprocessing(self) -> dict[str, PreprocessingConfig]:
        if self.preprocessing_file is None:
            return {}
        raw = json.loads(self.preprocessing_file.read_text())
        return {name: PreprocessingConfig(**spec) for name, spec in raw.items()}
