"""Every knob of the gateway, read from the environment (prefix LORAGATE_) or passed in."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAGATE_", extra="ignore")

    routes_file: Path = Field(Path("routes.yaml"), description="YAML routes catalog")
    # Comma-separated base URLs of the vLLM replicas (OpenAI API), e.g. http://vllm-0:8000
    upstreams: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["http://127.0.0.1:18000"])

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1

    max_body_bytes: int = 1_048_576
    connect_timeout_s: float = 5.0
    # Time allowed until the upstream sends its response headers (first byte).
    first_byte_timeout_s: float = 60.0
    total_timeout_s: float = 600.0

    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    routes_reload_interval_s: float = 2.0
    # An adapter that failed to load is not retried on that replica for this long.
    adapter_failure_ttl_s: float = 30.0

    @field_validator("upstreams", mode="before")
    @classmethod
    def _split_upstreams(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            value = [str(url).rstrip("/") for url in value]
            if not value:
                raise ValueError("at least one upstream URL is required")
        return value
