"""The routes catalog: which logical model names exist and how each is served.

A route maps a model name that clients send (e.g. ``support``) to variants: LoRA
adapters or the base model, each with a rollout weight. The file is YAML,
validated here; a bad file is rejected with a message that says where.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loragate.common.cardcheck import CardCheck, CardRefused
from loragate.common.watched import ReloadingFile

BASE = "base"  # the name of the implicit variant that serves the base model
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CatalogError(ValueError):
    """The routes file cannot be used; the message says why and where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pricing(_Strict):
    """USD per 1K tokens: what this deployment costs, and what the hosted API it replaces charges."""

    prompt_per_1k: float = Field(0.0, ge=0)
    completion_per_1k: float = Field(0.0, ge=0)
    reference_prompt_per_1k: float = Field(0.0, ge=0)
    reference_completion_per_1k: float = Field(0.0, ge=0)
    reference_name: str = "hosted-api"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_1k + completion_tokens * self.completion_per_1k) / 1000

    def reference_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.reference_prompt_per_1k + completion_tokens * self.reference_completion_per_1k
        ) / 1000


class Timeouts(_Strict):
    """Per-route overrides of the gateway's timeouts (seconds); unset ones use the settings."""

    connect_s: float | None = Field(None, gt=0)
    # Streams: until the first event, and the longest silence between events after it.
    first_token_s: float | None = Field(None, gt=0)
    total_s: float | None = Field(None, gt=0)


class Limits(_Strict):
    """Bounds on request parameters; a request beyond them gets a 400."""

    max_tokens: int | None = Field(None, ge=1)
    max_n: int = Field(4, ge=1)


class Scheduling(_Strict):
    """How the replica picker weighs its scorers for this route's requests (docs/scheduling.md); 0 turns one off.

    load: queued and running requests and KV-cache pressure; adapter: a replica where the adapter is
    active or loaded over one that must load it; prefix: the replica whose prefix cache holds the prompt's
    beginning (raise it for long shared system prompts, lower it for short unrelated prompts).
    """

    load: float = Field(1.0, ge=0)
    adapter: float = Field(1.0, ge=0)
    prefix: float = Field(1.0, ge=0)


class Variant(_Strict):
    name: str
    # The adapter's name on the vLLM server; None means the base model.
    adapter: str | None = None
    # Where the replica can load the adapter from (a directory or URI it understands).
    # Without it the adapter must already be registered on the replicas.
    path: str | None = None
    # The version's registry card (a directory with card.json; loragate/common/cardcheck.py). Without it a
    # local ``path`` holding a card.json is checked the same way.
    card: str | None = None
    weight: float = Field(0.0, ge=0)
    # Or another OpenAI-compatible endpoint outside the vLLM pool (e.g. the hosted API the
    # adapters replace, as the last fallback): its base URL with /v1, the model name there,
    # and the environment variable holding its API key (never the key itself).
    endpoint: str | None = None
    model: str | None = None
    api_key_env: str | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"variant name {value!r} must match {_NAME.pattern}")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> "Variant":
        if self.path is not None and self.adapter is None:
            raise ValueError(f"variant {self.name!r} has a path but no adapter name")
        if self.card is not None and self.adapter is None:
            raise ValueError(f"variant {self.name!r}: a card goes with an adapter")
        if self.name == BASE and (self.adapter is not None or self.endpoint is not None):
            raise ValueError(f"variant name {BASE!r} is reserved for the base model")
        if self.endpoint is not None:
            if self.adapter is not None:
                raise ValueError(f"variant {self.name!r}: an endpoint variant takes `model`, not `adapter`")
            if not self.model:
                raise ValueError(f"variant {self.name!r}: an endpoint needs the `model` to ask it for")
            if not self.endpoint.startswith(("http://", "https://")):
                raise ValueError(f"variant {self.name!r}: endpoint must be an http(s) URL")
        elif self.model is not None or self.api_key_env is not None:
            raise ValueError(f"variant {self.name!r}: `model` and `api_key_env` go with an `endpoint`")
        return self

    @property
    def is_base(self) -> bool:
        return self.adapter is None and self.endpoint is None


class Shadow(_Strict):
    """A copy of a share of the route's requests, sent to ``variant`` in the dark (service/shadow.py).

    The client only ever gets the primary answer; the shadow answer goes to the request log,
    paired with the primary by request id, for the monitor to compare (monitoring/shadow.py).
    """

    variant: str
    percent: float = Field(10.0, ge=0, le=100)  # share of the route's requests that are copied
    max_in_flight: int = Field(8, ge=1)  # shadow requests of this route at once; more are dropped
    deadline_s: float = Field(30.0, gt=0)  # how long a shadow may run on after its primary finished


class Route(_Strict):
    name: str
    base_model: str = "base"
    variants: tuple[Variant, ...]
    # Request header whose value keeps a caller on one variant (e.g. x-user-id).
    sticky_key: str | None = None
    # Variants tried in order when the chosen one fails before any byte is sent.
    fallback: tuple[str, ...] = (BASE,)
    allow_pin: bool = True
    pricing: Pricing = Pricing()
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    shadow: Shadow | None = None
    scheduling: Scheduling = Scheduling()

    @field_validator("sticky_key")
    @classmethod
    def _lower_header(cls, value: str | None) -> str | None:
        return value.lower() if value else value

    @model_validator(mode="before")
    @classmethod
    def _add_base_variant(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("variants"), list):
            names = {v.get("name") for v in data["variants"] if isinstance(v, dict)}
            if BASE not in names:
                data = {**data, "variants": [*data["variants"], {"name": BASE, "weight": 0}]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Route":
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate variant names: {duplicates}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("at least one variant needs a weight above 0")
        unknown = [f for f in self.fallback if f not in names]
        if unknown:
            raise ValueError(f"fallback names unknown variants: {unknown} (known: {names})")
        if self.shadow is not None:
            self._check_shadow(self.shadow, names)
        return self

    def _check_shadow(self, shadow: Shadow, names: list[str]) -> None:
        """The shadow must exist and must not be the route's primary (the variant with the most weight)."""
        if shadow.variant not in names:
            raise ValueError(f"shadow.variant: unknown variant {shadow.variant!r} (known: {names})")
        top = max(v.weight for v in self.variants)
        primaries = [v.name for v in self.variants if v.weight == top]
        if shadow.variant in primaries:
            raise ValueError(
                f"shadow.variant: {shadow.variant!r} is the route's primary variant (weight {top:g}); "
                "a shadow must be another variant (weight 0, or a canary's smaller share)"
            )

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    def fallback_chain(self, chosen: Variant) -> list[Variant]:
        """The variants to try after ``chosen`` fails, in order, without repeats."""
        chain: list[Variant] = []
        for name in self.fallback:
            variant = self.variant(name)
            if variant is not None and name != chosen.name and all(v.name != name for v in chain):
                chain.append(variant)
        return chain

    def upstream_model(self, variant: Variant) -> str:
        return variant.model or variant.adapter or self.base_model


class Catalog(_Strict):
    routes: dict[str, Route]

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("routes"), dict):
            routes = {}
            for name, body in data["routes"].items():
                if isinstance(body, dict):
                    body = {**body, "name": name}
                routes[name] = body
            data = {**data, "routes": routes}
        return data

    @field_validator("routes")
    @classmethod
    def _route_names(cls, routes: dict[str, Route]) -> dict[str, Route]:
        if not routes:
            raise ValueError("no routes defined")
        for name in routes:
            if not _NAME.match(name):
                raise ValueError(f"route name {name!r} must match {_NAME.pattern}")
        return routes

    @model_validator(mode="after")
    def _one_version_per_adapter_name(self) -> "Catalog":
        """An adapter name stands for one version: two load paths under one name would let vLLM serve one
        version's cached prefix blocks to the other (vllm#30931). The registry names versions ``name-version``."""
        paths: dict[str, tuple[str, str]] = {}
        for route in self.routes.values():
            for variant in route.variants:
                if not variant.adapter or not variant.path:
                    continue
                seen = paths.setdefault(variant.adapter, (variant.path, route.name))
                if seen[0] != variant.path:
                    raise ValueError(
                        f"adapter name {variant.adapter!r} has two paths ({seen[0]!r} in route {seen[1]!r}, "
                        f"{variant.path!r} in route {route.name!r}): give each adapter version its own name "
                        "(vLLM can mix the prefix caches of adapters loaded under one name, vllm#30931)"
                    )
        return self

    def adapters(self) -> dict[str, str | None]:
        """Every adapter any route may use, with its load path."""
        found: dict[str, str | None] = {}
        for route in self.routes.values():
            for variant in route.variants:
                if variant.adapter:
                    found[variant.adapter] = variant.path or found.get(variant.adapter)
        return found


def parse_catalog(text: str, source: str = "<routes>") -> Catalog:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: expected a mapping with a 'routes' key")
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise CatalogError(f"{source}: {problems}") from None


def load_catalog(path: Path, cards: CardCheck | None = None) -> Catalog:
    """The catalog in ``path``; with ``cards``, checked against the variants' registry cards."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read: {exc.strerror}") from None
    catalog = parse_catalog(text, str(path))
    if cards is None:
        return catalog
    try:
        return cards.apply(catalog, str(path))
    except CardRefused as exc:
        raise CatalogError(str(exc)) from None


class CatalogFile(ReloadingFile[Catalog]):
    """The catalog from a file, reloaded when the file changes; a bad edit (CatalogError) keeps the last good one.

    Variants with a registry card are checked against it on every load (loragate/common/cardcheck.py).
    """

    def __init__(self, path: Path) -> None:
        cards = CardCheck()
        super().__init__(path, lambda: load_catalog(path, cards))
