"""Who is calling: API keys checked per request, per-key limits, and the admin token.

The keys and the file they come from are service/apikeys.py. Auth is on with ``LORAGATE_AUTH=on``;
admin endpoints take ``LORAGATE_ADMIN_TOKEN``. Clients send ``Authorization: Bearer <key>`` or ``x-api-key``.

Why the lookup is constant-time enough: the presented key is hashed first and
the digest is looked up in a dict. Whatever the lookup's timing depends on is
the digest of what the caller sent, never a prefix of a stored key, so timing
cannot be used to guess a key byte by byte (that would need SHA-256 preimages).
The admin token is compared with ``hmac.compare_digest`` over both digests, so
not even its length shows.

Limits are token buckets that refill continuously (a sliding minute), enforced by a
limiter (service/limits.py): in this process, or shared by every gateway process through
Redis (``LORAGATE_LIMITS_URL``). Requests are taken on admission; tokens are charged after
the answer with the real usage (``Retry-After`` says when a refused key may retry).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from loragate.service.apikeys import ApiKey, KeysError, KeyStore, hash_key
from loragate.service.budgets import BudgetRefusal, Budgets
from loragate.service.errors import GatewayError
from loragate.service.limits import Limiter, LocalLimiter, Refusal
from loragate.service.metrics import Metrics
from loragate.service.priority import Priority, PriorityPolicy, key_policy, priority_named
from loragate.service.settings import Settings

log = logging.getLogger("loragate.auth")

_MAX_KEY_CHARS = 512

# The reasons a request is refused: the only values of loragate_auth_rejections_total{reason}.
REJECTION_REASONS = (
    "missing_key",  # no Authorization: Bearer / x-api-key header
    "invalid_key",  # unknown key
    "revoked_key",  # a key marked revoked
    "route_forbidden",  # the key may not call this route
    "request_rate",  # over requests_per_minute
    "token_rate",  # over tokens_per_minute
    "budget_exceeded",  # a key or its team has spent its daily or monthly budget (429)
    "limiter_unavailable",  # a limited key while the shared limiter is unreachable and fails closed (503)
    "admin_forbidden",  # a user key on an admin endpoint, or admin endpoints disabled
    "admin_invalid",  # a missing or wrong token on an admin endpoint
)


_LIMIT_REASONS = frozenset({"request_rate", "token_rate", "limiter_unavailable", "budget_exceeded"})


# --- who is calling ---------------------------------------------------------------


class Principal:
    """The caller of one request. ``admit`` before forwarding, ``charge`` after the answer.

    ``admit`` raises GatewayError when refused, and returns None when admitted, or an awaitable
    to await (a shared limiter's round trip) that raises or returns None in the same way.
    """

    key_id: str | None = None
    priorities: PriorityPolicy | None = None  # the classes it may use (service/priority.py); None: the gateway's

    def allows(self, route: str) -> bool:
        return True

    def admit(self, route: str) -> Awaitable[None] | None:
        return None

    def charge(self, tokens: int, cost_usd: float = 0.0) -> None:
        pass


ANONYMOUS = Principal()  # auth off: everything allowed, nothing counted


@dataclass(slots=True, eq=False)
class KeyPrincipal(Principal):
    key: ApiKey
    limiter: Limiter
    reject: Callable[..., GatewayError]
    limited: bool  # the key has a requests or tokens limit
    budgets: Budgets | None = None  # spend budgets (service/budgets.py)
    priorities: PriorityPolicy | None = None  # its default priority class and the ones it may ask for

    @property
    def key_id(self) -> str:  # type: ignore[override]
        return self.key.id

    def allows(self, route: str) -> bool:
        return self.key.allows(route)

    def admit(self, route: str) -> Awaitable[None] | None:
        if not self.key.allows(route):
            raise self.reject(
                "route_forbidden",
                403,
                f"this API key may not use the model `{route}`",
                code="model_not_allowed",
                key_id=self.key.id,
            )
        budget = self.budgets.check(self.key) if self.budgets is not None else None
        if isinstance(budget, BudgetRefusal):
            raise self._over_budget(budget)
        outcome = self.limiter.admit(self.key) if self.limited else None
        if isinstance(outcome, Refusal):
            if inspect.iscoroutine(budget):
                budget.close()  # the budget's round trip is not awaited: the request is refused anyway
            raise self._refused(outcome)
        if outcome is None and budget is None:
            return None
        return self._settle(outcome, budget)

    async def _settle(
        self, pending: Awaitable[Refusal | None] | None, budget: Awaitable[BudgetRefusal | None] | None
    ) -> None:
        if budget is not None and (over := await budget) is not None:
            raise self._over_budget(over)
        if pending is not None and (outcome := await pending) is not None:
            raise self._refused(outcome)

    def _over_budget(self, refusal: BudgetRefusal) -> GatewayError:
        assert self.budgets is not None
        retry_after = refusal.retry_after_s(self.budgets.periods.clock())
        return self.reject(
            "budget_exceeded",
            429,
            f"spend budget exceeded: {refusal.message()}",
            code="budget_exceeded",
            key_id=self.key.id,
            headers={"retry-after": str(retry_after)},
        )

    def _refused(self, refusal: Refusal) -> GatewayError:
        retry_after = max(1, math.ceil(refusal.wait_s))
        headers = {"retry-after": str(retry_after)}
        if refusal.reason == "limiter_unavailable":
            return self.reject(
                refusal.reason,
                503,
                f"rate limits cannot be checked right now; retry after {retry_after}s",
                code="limiter_unavailable",
                key_id=self.key.id,
                headers=headers,
            )
        what = "requests" if refusal.reason == "request_rate" else "tokens"
        return self.reject(
            refusal.reason,
            429,
            f"rate limit exceeded ({what} per minute); retry after {retry_after}s",
            code="rate_limit_exceeded",
            key_id=self.key.id,
            headers=headers,
        )

    def charge(self, tokens: int, cost_usd: float = 0.0) -> None:
        if self.limited and tokens > 0:
            self.limiter.charge(self.key, tokens)
        if self.budgets is not None and cost_usd > 0:
            self.budgets.add(self.key, cost_usd)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer <key>``, else ``x-api-key``; None when absent."""
    key = bearer(headers.get("authorization")) or headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def bearer(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header; None for another scheme or none."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


class AllowAll:
    """Auth off: every request is the anonymous principal; admin endpoints are open."""

    enabled = False

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        return ANONYMOUS

    def authorize_admin(self, headers: Mapping[str, str]) -> None:
        pass

    def keys(self) -> list[ApiKey]:
        return []


class Authenticator:
    """Checks API keys against a KeyStore (``store=None``: auth off) and the admin token.

    Admin endpoints need the admin token whenever one is set. Without one they are
    open while auth is off (local use) and closed (403) while auth is on.
    """

    def __init__(
        self,
        store: KeyStore | None,
        *,
        admin_token: str | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        limiter: Limiter | None = None,
        budgets: Budgets | None = None,
        default_priority: Priority = Priority.STANDARD,
    ) -> None:
        self.store = store
        self.default_priority = default_priority  # of keys that name no priority class of their own
        self.budgets = budgets
        self._admin_digest = hashlib.sha256(admin_token.encode()).digest() if admin_token else None
        self._digests: dict[str, str] = {}  # presented key -> its SHA-256 hex (see _digest)
        self._principals: dict[str, KeyPrincipal] = {}  # key id -> the principal of that ApiKey object
        # Authorization header -> the principal it was admitted as, for the keys in _admitted_keys only
        self._admitted: dict[str, KeyPrincipal] = {}
        self._admitted_keys: dict[str, ApiKey] | None = None
        self.metrics = metrics
        self.limiter = limiter or LocalLimiter(clock)
        if metrics is not None and store is not None:
            for reason in REJECTION_REASONS:  # every series exists from the start, at 0
                metrics.auth_rejections.labels(reason)

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def keys(self) -> list[ApiKey]:
        return self.store.keys() if self.store else []

    def reload_if_changed(self) -> bool:
        """Reload the keys file if it changed (KeysError on a bad one); forget the buckets of removed keys."""
        if self.store is None or not self.store.reload_if_changed():
            return False
        self.limiter.forget(key.id for key in self.store.by_hash.values())
        return True

    async def refresh(self) -> None:
        """The periodic reload job: a bad file is logged and counted, and the last good keys stay."""
        try:
            changed = self.reload_if_changed()
        except KeysError as exc:
            if self.metrics is not None:
                self.metrics.api_keys_reloads.labels("error").inc()
            log.error("API keys file rejected, keeping the last good keys: %s", exc)
            return
        if changed:
            if self.metrics is not None:
                self.metrics.api_keys_reloads.labels("success").inc()
            log.info("API keys reloaded: %d keys (ids: %s)", len(self.keys()), ", ".join(k.id for k in self.keys()))

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller's principal; raises GatewayError (401) for a missing, unknown or revoked key.

        A client sends the same ``Authorization`` header with every request: the principal it was
        admitted as is remembered, for the keys loaded now only. A reload loads new keys (a new dict),
        and everything remembered is forgotten at the next request: a key revoked or removed by a reload
        is refused at once. Refusals are never remembered; bounded (cleared when full).
        """
        if self.store is None:
            return ANONYMOUS
        keys = self.store.by_hash
        if keys is not self._admitted_keys:
            self._admitted, self._admitted_keys = {}, keys
        authorization = headers.get("authorization")
        principal = self._admitted.get(authorization) if authorization is not None else None
        if principal is None:
            principal = self._principal(headers)
            if authorization is not None and bearer(authorization) is not None:  # the key came from this header
                if len(self._admitted) >= 1024:
                    self._admitted.clear()
                self._admitted[authorization] = principal
        return principal

    def _principal(self, headers: Mapping[str, str]) -> KeyPrincipal:
        key = self._lookup(headers)
        if key.revoked:
            raise self._reject(
                "revoked_key", 401, "this API key has been revoked", code="invalid_api_key", key_id=key.id
            )
        # One principal per key, not one per request: it holds nothing of the request. A reload makes new
        # ApiKey objects, and so new principals.
        principal = self._principals.get(key.id)
        if principal is None or principal.key is not key:
            if len(self._principals) >= 4096:
                self._principals.clear()
            principal = self._principals[key.id] = KeyPrincipal(
                key,
                self.limiter,
                self._reject,
                key.requests_per_minute is not None or key.tokens_per_minute is not None,
                self.budgets,
                key_policy(key.priority, key.priorities, self.default_priority),
            )
        return principal

    def authorize_admin(self, headers: Mapping[str, str]) -> None:
        presented = presented_key(headers)
        if self._admin_digest is None:
            if self.store is None:
                return
            raise self._reject(
                "admin_forbidden", 403, "admin endpoints are disabled (no admin token is set)", code="admin_disabled"
            )
        if presented is None:
            raise self._reject(
                "admin_invalid",
                401,
                "an admin token is required (Authorization: Bearer <token>)",
                code="invalid_api_key",
            )
        digest = hashlib.sha256(presented.encode()).digest()
        if hmac.compare_digest(digest, self._admin_digest):
            return
        if self.store is not None and digest.hex() in self.store.by_hash:
            raise self._reject(
                "admin_forbidden", 403, "this endpoint needs the admin token, not an API key", code="admin_required"
            )
        raise self._reject("admin_invalid", 401, "invalid admin token", code="invalid_api_key")

    # --- internals ------------------------------------------------------------

    def _lookup(self, headers: Mapping[str, str]) -> ApiKey:
        assert self.store is not None
        presented = presented_key(headers)
        if presented is None:
            raise self._reject(
                "missing_key",
                401,
                "missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`",
                code="invalid_api_key",
            )
        key = self.store.by_hash.get(self._digest(presented)) if len(presented) <= _MAX_KEY_CHARS else None
        if key is None:
            raise self._reject("invalid_key", 401, "invalid API key", code="invalid_api_key")
        return key

    def _digest(self, presented: str) -> str:
        """hash_key(presented), remembered for the last few keys presented: a client sends the same key every time.

        The digest depends on the key alone, so it is kept across reloads (the verdict is not: see
        authenticate). Bounded (cleared when full), so keys sprayed by a guesser cost memory only up to the bound.
        """
        digests = self._digests
        digest = digests.get(presented)
        if digest is None:
            if len(digests) >= 1024:
                digests.clear()
            digest = digests[presented] = hash_key(presented)
        return digest

    def _reject(
        self,
        reason: str,
        status: int,
        message: str,
        *,
        code: str,
        key_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> GatewayError:
        if self.metrics is not None:
            self.metrics.auth_rejections.labels(reason).inc()
            if key_id is not None and reason in _LIMIT_REASONS:
                self.metrics.limit_rejections.labels(key_id, reason).inc()
        # The key itself is never logged; unknown keys are logged at debug so a flood cannot fill the log.
        (log.info if key_id else log.debug)("auth rejected: %s (key id %s)", reason, key_id or "-")
        if status == 401:
            headers = {**(headers or {}), "www-authenticate": "Bearer"}
        return GatewayError(status, message, code=code, headers=headers)


def authenticator_from_settings(
    settings: Settings, metrics: Metrics | None = None, limiter: Limiter | None = None, budgets: Budgets | None = None
) -> Authenticator:
    """Auth on: keys from ``api_keys_file`` and ``api_keys`` (KeysError on a bad file). Off: no key checks."""
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    if not settings.auth:
        return Authenticator(None, admin_token=admin_token, metrics=metrics)
    store = KeyStore(settings.api_keys_file, settings.api_keys)
    if not store.by_hash:
        log.warning("auth is on but no API keys are configured: every request will be refused")
    return Authenticator(
        store,
        admin_token=admin_token,
        metrics=metrics,
        limiter=limiter,
        budgets=budgets,
        default_priority=priority_named(settings.default_priority),
    )
