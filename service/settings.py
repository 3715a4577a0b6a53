"""Every knob of the gateway, read from the environment (prefix LORAGATE_) or passed in."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from loragate.common.adapterprobe import PROMPTS as PROBE_PROMPTS, TOLERANCE as PROBE_TOLERANCE
from loragate.service.priority import DEFAULT_SHARES, format_shares, shares_named


_LOG_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss", "az")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAGATE_", extra="ignore")

    routes_file: Path = Field(Path("routes.yaml"), description="YAML routes catalog")
    # Comma-separated base URLs of the vLLM replicas (OpenAI API), e.g. http://vllm-0:8000
    upstreams: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["http://127.0.0.1:18000"])

    # The address the gateway listens on (0.0.0.0: every interface, as in a container).
    host: str = "127.0.0.1"
    # The port the gateway listens on.
    port: int = 8080
    # Worker processes (uvicorn); more than one switches the metrics to multiprocess mode.
    workers: int = 1

    # A request body larger than this is refused with 413.
    max_body_bytes: int = 1_048_576
    # Time allowed to connect to a replica (then the next replica, or the fallback chain).
    connect_timeout_s: float = 5.0
    # Streams: time allowed until the first event, and the longest silence between events.
    first_token_timeout_s: float = 60.0
    # Everything, non-streaming generation included.
    total_timeout_s: float = 600.0
    # Attempts per request across replicas and fallback variants, before any byte is sent.
    max_attempts: int = 4
    # Admission control: requests in flight per replica, and the bounded wait for a free slot.
    max_in_flight_per_upstream: int = 256
    # Requests that may wait for a free slot at once; more are refused at once with 503 and Retry-After.
    max_waiting: int = 512
    # The longest a request waits for a free slot before a 503 with Retry-After.
    max_wait_s: float = 10.0
    # Priority classes (service/priority.py, service/admission.py) order that wait: critical, then standard, then
    # sheddable requests get the free slots; sheddable ones wait at most this long (0: refused as soon as every
    # replica is full) and are the ones shed when the wait queue is full.
    sheddable_max_wait_s: float = Field(2.0, ge=0)
    # Shares of the freed slots between classes waiting at the same time, class=share: while a class with a share
    # has waiters it gets at least share/total of the slots handed off, however overloaded the classes above it
    # are (the default: standard at least 1 in 5); the rest go by class order, so a class waiting alone gets every
    # slot. Share 0: only slots no class with a share can use. critical=1,standard=0,sheddable=0 is strict priority.
    # A lower class's share may not exceed a higher one's; shedding (above) is the same whatever the shares.
    priority_shares: str = format_shares(DEFAULT_SHARES)
    # The class of requests without an x-loragate-priority header whose API key names none (with auth off: of
    # every such request; the header may then ask for any class).
    default_priority: Literal["critical", "standard", "sheddable"] = "standard"
    # The HTTP client of the request path to plain http:// replicas: "lean" (service/httpclient.py, less CPU
    # per request) or "aiohttp". https:// endpoints, health checks and adapter loads always use aiohttp.
    upstream_client: Literal["lean", "aiohttp"] = "lean"
    # Circuit breakers (per replica, and per adapter on a replica): consecutive failures that open one.
    circuit_failures: int = 5
    # How long an open circuit stays open before one probe request is let through.
    circuit_open_s: float = 10.0

    # Seconds between health checks of every replica (GET /health and the adapters it holds, GET /v1/models).
    health_interval_s: float = 5.0
    # A health check slower than this counts as failed.
    health_timeout_s: float = 2.0
    # Seconds between checks of the routes file (and the keys file) for changes.
    routes_reload_interval_s: float = 2.0
    # An adapter that failed to load is not retried on that replica for this long.
    adapter_failure_ttl_s: float = 30.0
    # After each adapter load it makes, the gateway probes that replica (docs/scheduling.md, "Adapter loads"): a few
    # greedy completions with logprobs naming the base model and the adapter. Identical answers = the engine does
    # not apply the adapter (vllm#55193): it is unloaded there, marked failed for adapter_failure_ttl_s, and the
    # request goes on as after a failed load (another replica, or the fallback chain). An unanswered probe keeps it.
    # Off by default: on the vLLM CPU engine in CI it twice found a working adapter (the loop scenario's v1)
    # not applied right after its load, for a cause not yet found (docs/scheduling.md).
    adapter_probe: bool = False
    # Fixed prompts the probe asks (each twice: base model and adapter, all at once).
    adapter_probe_prompts: int = Field(2, ge=1, le=len(PROBE_PROMPTS))
    # Tokens in each probe answer (their logprobs are compared).
    adapter_probe_max_tokens: int = Field(4, ge=1, le=32)
    # Logprob differences up to this are float noise, not an adapter.
    adapter_probe_tolerance: float = Field(PROBE_TOLERANCE, ge=0)
    # Each probe ask's time limit; past it the probe counts as error and the adapter is kept.
    adapter_probe_timeout_s: float = Field(5.0, gt=0)
    # Replica scheduling (docs/scheduling.md): each replica's /metrics is scraped this often for its queue,
    # KV-cache usage and LoRA slots (between scrapes the gateway's own in-flight counts move it).
    engine_scrape_interval_s: float = Field(1.0, gt=0)
    # Adapters per replica before the least recently used one the gateway loaded, idle for
    # adapter_min_idle_s, is unloaded to make room (0: never unload; the engine swaps LoRA slots itself).
    max_adapters_per_replica: int = Field(0, ge=0)
    # Seconds an adapter must have gone without requests on a replica before it may be unloaded (hysteresis).
    adapter_min_idle_s: float = Field(30.0, ge=0)

    # Request log (service/requestlog/sink.py): a directory or s3://bucket/prefix; unset = off.
    # Needs pyarrow (pip install 'loragate[requestlog]'). S3 credentials: the usual AWS_* environment.
    request_log_url: str | None = None
    # Prompt/answer text in the log: full, scrubbed (personal data and secrets replaced), none.
    request_log_text: Literal["full", "scrubbed", "none"] = "scrubbed"
    # Seconds after which a batch is written even if it is not full.
    request_log_flush_interval_s: float = Field(10.0, gt=0)
    # Records per written batch (a file per batch and day): each batch has a fixed cost (regex compiles,
    # a Parquet file, an fsync), ~2 us a record at 5000 against ~9 at 1000 (measured).
    request_log_batch_size: int = Field(5000, ge=1)
    # Records waiting to be written at most; past it records are dropped and counted (never blocking a request).
    request_log_queue_size: int = Field(20_000, ge=1)
    # Where records become rows (answer parsing, scrubbing, Parquet encoding): "process" = one
    # conversion process per gateway worker, off the event loop's GIL; "thread" = the writer thread.
    request_log_convert: Literal["process", "thread"] = "process"
    # A batch the conversion process has not written in 5x the time its size takes, and at least this long, is
    # written again record by record, the text of a record that stalls it withheld (never stored unscrubbed).
    request_log_stall_floor_s: float = Field(2.0, gt=0)
    # Graceful shutdown: the log's last flush and the conversion process's end take at most this long (after the
    # up to 30 s for requests in flight: 40 s in all, the Helm chart's terminationGracePeriodSeconds).
    request_log_close_timeout_s: float = Field(10.0, gt=0)
    # File names start with it; default: host-pid-random. Must be unique per writer process.
    request_log_writer_id: str | None = None
    # An S3-compatible endpoint (MinIO, moto, ...), e.g. http://minio:9000; unset = AWS.
    request_log_s3_endpoint: str | None = None
    # The S3 region; unset = AWS_REGION or AWS_DEFAULT_REGION.
    request_log_s3_region: str | None = None
    # POST /v1/feedback: labels counted by name in loragate_feedback_total (others count as "other"),
    # and how many recent request ids are remembered (at least; at most twice as many) to attach route and
    # variant to feedback.
    feedback_labels: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["good", "bad", "neutral", "correct", "incorrect"]
    )
    # Recent request ids remembered for feedback (see above).
    feedback_recent_requests: int = Field(100_000, ge=1)

    @field_validator("priority_shares")
    @classmethod
    def _valid_shares(cls, value: str) -> str:
        return format_shares(shares_named(value))  # ValueError: what is wrong with them

    @field_validator("feedback_labels", mode="before")
    @classmethod
    def _split_labels(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator(
        "request_log_url", "request_log_writer_id", "request_log_s3_endpoint", "request_log_s3_region", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("request_log_url")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        # Checked here because the store itself is built in the conversion process, after start.
        if value is not None and "://" in value and value.split("://", 1)[0] not in _LOG_SCHEMES:
            raise ValueError(f"request_log_url: unsupported scheme in {value!r} (use a path, file://, s3://, gs://)")
        return value

    # API keys (service/auth.py; the keys file: service/apikeys.py): off for local use, on in the Helm chart.
    # LORAGATE_AUTH=on|off.
    auth: bool = False
    # YAML keys file (hashes, routes, limits, revoked), reloaded like the routes file.
    api_keys_file: Path | None = None
    # The same YAML/JSON document inline; its keys are added to the file's.
    api_keys: str | None = None
    # Bearer token for /admin/*; without one, admin endpoints are closed while auth is on.
    admin_token: SecretStr | None = None

    # Shared per-key limits (service/limits.py): redis://[:password@]host:port/db, rediss:// (TLS) or
    # unix:///path.sock; unset = limits in each process. While Redis is unreachable the gateway serves on
    # in-process limits (fail open) or, with limits_fail_closed, answers limited keys with 503.
    limits_url: SecretStr | None = None
    # The Redis password, when it is not in the URL (e.g. from a Kubernetes Secret).
    limits_password: SecretStr | None = None
    # While Redis is unreachable: answer limited keys with 503 instead of serving on in-process limits.
    limits_fail_closed: bool = False
    # One Redis round trip may take this long before Redis counts as unreachable.
    limits_timeout_s: float = Field(0.5, gt=0)
    # Spend budgets of teams (service/budgets.py), JSON: {"support": {"usd_per_day": 50, "usd_per_month": 1000}};
    # a key joins a team with `team:` in the keys file. Counted in the Redis of limits_url when set.
    team_budgets: dict[str, dict[Literal["usd_per_day", "usd_per_month"], float]] = {}
    # Days and months of the spend budgets start at midnight in this IANA time zone (zoneinfo).
    budget_timezone: str = "UTC"
    # An upstream entry naming a host (DNS discovery, service/upstreams.py) must resolve within this
    # long at start, else the gateway stops.
    discovery_start_timeout_s: float = Field(30.0, ge=0)

    @field_validator("budget_timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as Europe/Paris)") from None
        return value

    @field_validator("limits_url", mode="before")
    @classmethod
    def _valid_limits_url(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str) or not value.strip():
            return None
        problem = limits_url_problem(value.strip())
        if problem:
            raise ValueError(f"not a usable Redis URL: {problem}")
        return value.strip()

    @field_validator("api_keys_file", "api_keys", "admin_token", "limits_password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("upstreams", mode="before")
    @classmethod
    def _split_upstreams(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            value = [str(url).rstrip("/") for url in value]
            if not value:
                raise ValueError("at least one upstream URL is required")
            for url in value:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ValueError(f"upstream {url!r}: expected http(s)://host[:port]")
        return value


def limits_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL (never quoting its password), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return f"scheme must be redis://, rediss:// or unix://, not {parts.scheme + '://' if parts.scheme else 'none'}"
    try:
        port = parts.port
    except ValueError:
        return "the port must be a number from 1 to 65535"
    if parts.scheme == "unix":
        return None if parts.path else "unix:// needs the socket's path (unix:///run/redis.sock)"
    if not parts.hostname:
        return "no host (expected redis://host:6379/0)"
    if port == 0:
        return "the port must be a number from 1 to 65535"
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        return f"the database after the host must be a number (redis://host:6379/0), not {db!r}"
    return None
