"""API keys: hashing, the keys file, route allow-lists, rate limits, revocation, the admin token."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from loragate.service.apikeys import ApiKey, KeysError, KeyStore, hash_key, new_key, parse_keys
from loragate.service.auth import ANONYMOUS, REJECTION_REASONS, AllowAll, Authenticator, presented_key
from loragate.cli import main as cli_main
from loragate.service.errors import GatewayError
from loragate.service.metrics import Metrics

ALICE, BOB, REVOKED = "lg-alice-secret", "lg-bob-secret", "lg-revoked-secret"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keys_yaml(*entries: str) -> str:
    return "keys:\n" + "".join(entries)


def entry(key_id: str, key: str, extra: str = "") -> str:
    return f'  - {{id: {key_id}, sha256: "{hash_key(key)}"{", " + extra if extra else ""}}}\n'


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(
        keys_yaml(
            entry("alice", ALICE, "routes: [support], requests_per_minute: 2, tokens_per_minute: 60"),
            entry("bob", BOB),
            entry("old", REVOKED, "revoked: true"),
        )
    )
    return path


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def auth(keys_file: Path, clock: Clock, metrics: Metrics) -> Authenticator:
    return Authenticator(KeyStore(keys_file), admin_token="admin-secret", metrics=metrics, clock=clock)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def rejected(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("loragate_auth_rejections_total", {"reason": reason}) or 0.0


def refusal(call, *args) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        call(*args)
    return info.value


# --- hashing and the keys file ------------------------------------------------------


def test_hash_is_sha256_hex_and_new_keys_are_random() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    first, second = new_key(), new_key()
    assert first != second and first.startswith("lg-") and len(first) > 40


def test_store_indexes_by_hash_and_never_keeps_the_key(keys_file: Path) -> None:
    store = KeyStore(keys_file)
    assert store.by_hash[hash_key(ALICE)].id == "alice"
    assert ALICE not in repr(store.by_hash) and ALICE not in keys_file.read_text()
    assert "sha256" not in store.by_hash[hash_key(BOB)].public()


def test_a_plaintext_key_or_a_bad_hash_is_rejected_without_echoing_it() -> None:
    with pytest.raises(KeysError) as info:
        parse_keys("keys:\n  - {id: a, key: lg-plaintext-secret}\n", "k.yaml")
    assert "lg-plaintext-secret" not in str(info.value)
    with pytest.raises(KeysError) as info:
        parse_keys("keys:\n  - {id: a, sha256: lg-pasted-secret}\n", "k.yaml")
    assert "lg-pasted-secret" not in str(info.value) and "sha256" in str(info.value)
    with pytest.raises(KeysError) as info:
        parse_keys("keys: [ {id: a, sha256: 'lg-secret-in-broken-yaml' \n", "k.yaml")
    assert "lg-secret-in-broken-yaml" not in str(info.value)


@pytest.mark.parametrize(
    "fields",
    [
        "id: 'has space'",
        "id: " + "x" * 65,
        "id: ok, requests_per_minute: 0",
        "id: ok, routes: support",
        "id: ok, revoked: maybe",
    ],
)
def test_invalid_entries_are_rejected(fields: str) -> None:
    with pytest.raises(KeysError):
        parse_keys(f"keys:\n  - {{sha256: '{hash_key('k')}', {fields}}}\n", "k")


def test_duplicate_ids_or_hashes_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml(entry("a", ALICE), entry("a", BOB)))
    with pytest.raises(KeysError, match="duplicate key id"):
        KeyStore(path)
    path.write_text(keys_yaml(entry("a", ALICE), entry("b", ALICE)))
    with pytest.raises(KeysError, match="same hash"):
        KeyStore(path)


def test_inline_keys_add_to_the_file(keys_file: Path) -> None:
    store = KeyStore(keys_file, inline=f'{{"keys": [{{"id": "ci", "sha256": "{hash_key("lg-ci")}"}}]}}')
    assert {k.id for k in store.keys()} == {"alice", "bob", "old", "ci"}
    assert KeyStore(None, inline=keys_yaml(entry("only", "lg-only"))).keys()[0].id == "only"


def test_reload_picks_up_changes_and_keeps_the_last_good(
    keys_file: Path, auth: Authenticator, metrics: Metrics
) -> None:
    keys_file.write_text(keys_yaml(entry("bob", BOB, "revoked: true")))
    os.utime(keys_file, ns=(1, 1))  # a different stamp even within the clock's resolution
    assert auth.reload_if_changed()
    assert refusal(auth.authenticate, bearer(BOB)).message == "this API key has been revoked"
    assert refusal(auth.authenticate, bearer(ALICE)).code == "invalid_api_key"  # removed

    keys_file.write_text("keys: [this is not: valid")
    with pytest.raises(KeysError):
        auth.reload_if_changed()
    assert auth.store.last_error is not None
    assert {k.id for k in auth.keys()} == {"bob"}  # the last good keys stay


async def test_refresh_counts_reloads(keys_file: Path, auth: Authenticator, metrics: Metrics) -> None:
    keys_file.write_text("keys: [")
    await auth.refresh()
    keys_file.write_text(keys_yaml(entry("bob", BOB)))
    os.utime(keys_file, ns=(2, 2))
    await auth.refresh()
    count = metrics.registry.get_sample_value
    assert count("loragate_api_keys_reloads_total", {"result": "error"}) == 1
    assert count("loragate_api_keys_reloads_total", {"result": "success"}) == 1


# --- presenting a key -----------------------------------------------------------------


def test_key_from_bearer_or_x_api_key() -> None:
    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "xyz"}) == "xyz"
    assert presented_key({"authorization": "Basic Zm9vOmJhcg==", "x-api-key": "xyz"}) == "xyz"
    assert presented_key({"authorization": "Basic Zm9vOmJhcg=="}) is None
    assert presented_key({"authorization": "Bearer "}) is None
    assert presented_key({}) is None


def test_missing_wrong_and_revoked_keys_are_401(auth: Authenticator, metrics: Metrics) -> None:
    for headers, reason in (({}, "missing_key"), (bearer("lg-wrong"), "invalid_key"), (bearer(REVOKED), "revoked_key")):
        error = refusal(auth.authenticate, headers)
        assert (error.status, error.code) == (401, "invalid_api_key")
        assert error.headers["www-authenticate"] == "Bearer"
        assert rejected(metrics, reason) == 1
    assert refusal(auth.authenticate, bearer("x" * 10_000)).status == 401


def test_a_good_key_is_accepted_by_either_header(auth: Authenticator) -> None:
    assert auth.authenticate(bearer(BOB)).key_id == "bob"
    assert auth.authenticate({"x-api-key": ALICE}).key_id == "alice"


def test_every_rejection_reason_has_a_series_from_the_start(auth: Authenticator, metrics: Metrics) -> None:
    for reason in REJECTION_REASONS:
        assert rejected(metrics, reason) == 0


# --- routes and limits ------------------------------------------------------------------


def test_route_allow_list(auth: Authenticator, metrics: Metrics) -> None:
    alice = auth.authenticate(bearer(ALICE))
    alice.admit("support")
    error = refusal(alice.admit, "plain")
    assert (error.status, error.code) == (403, "model_not_allowed")
    assert rejected(metrics, "route_forbidden") == 1
    assert alice.allows("support") and not alice.allows("plain")
    auth.authenticate(bearer(BOB)).admit("anything")  # routes: "*" by default
    assert ApiKey(id="x", sha256=hash_key("x"), routes=("a",)).allows("a")


def test_requests_per_minute_with_retry_after_and_refill(auth: Authenticator, clock: Clock, metrics: Metrics) -> None:
    auth.authenticate(bearer(ALICE)).admit("support")
    auth.authenticate(bearer(ALICE)).admit("support")
    error = refusal(auth.authenticate(bearer(ALICE)).admit, "support")
    assert (error.status, error.code) == (429, "rate_limit_exceeded")
    assert error.headers["retry-after"] == "30"  # 2 a minute: one back every 30 s
    assert rejected(metrics, "request_rate") == 1
    clock.now += 29
    assert refusal(auth.authenticate(bearer(ALICE)).admit, "support").headers["retry-after"] == "1"
    clock.now += 1
    auth.authenticate(bearer(ALICE)).admit("support")
    clock.now += 600  # a long pause refills to the per-minute capacity, not beyond
    for _ in range(2):
        auth.authenticate(bearer(ALICE)).admit("support")
    assert refusal(auth.authenticate(bearer(ALICE)).admit, "support").status == 429


def test_tokens_are_checked_before_and_charged_after(auth: Authenticator, clock: Clock, metrics: Metrics) -> None:
    alice = auth.authenticate(bearer(ALICE))
    alice.admit("support")
    alice.charge(90)  # 60 a minute: the answer overdraws the bucket by 30 (-30 left)
    clock.now += 30  # +30 → 0: still below 1
    error = refusal(auth.authenticate(bearer(ALICE)).admit, "support")
    assert error.status == 429 and error.headers["retry-after"] == "1"
    assert "tokens per minute" in error.message
    assert rejected(metrics, "token_rate") == 1
    clock.now += 1
    auth.authenticate(bearer(ALICE)).admit("support")


def test_retry_after_is_the_longer_wait(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(keys_yaml(entry("c", "lg-c", "requests_per_minute: 60, tokens_per_minute: 6")))
    auth = Authenticator(KeyStore(path), clock=clock)
    principal = auth.authenticate(bearer("lg-c"))
    principal.admit("r")
    principal.charge(66)  # -60 left at 6 a minute: 10 minutes and 10 s to get back to 1
    assert refusal(auth.authenticate(bearer("lg-c")).admit, "r").headers["retry-after"] == "610"


def test_limits_survive_a_reload_and_follow_new_limits(keys_file: Path, auth: Authenticator, clock: Clock) -> None:
    for _ in range(2):
        auth.authenticate(bearer(ALICE)).admit("support")
    keys_file.write_text(keys_yaml(entry("alice", ALICE, "routes: '*', requests_per_minute: 2")))
    os.utime(keys_file, ns=(3, 3))
    assert auth.reload_if_changed()
    assert refusal(auth.authenticate(bearer(ALICE)).admit, "plain").status == 429  # a reload is no reset
    keys_file.write_text(keys_yaml(entry("alice", ALICE, "routes: '*'")))
    os.utime(keys_file, ns=(4, 4))
    auth.reload_if_changed()
    for _ in range(10):
        auth.authenticate(bearer(ALICE)).admit("plain")  # no limit any more


def test_auth_off_allows_everything(metrics: Metrics) -> None:
    for auth in (Authenticator(None, metrics=metrics), AllowAll()):
        principal = auth.authenticate({})
        assert principal is ANONYMOUS
        principal.admit("anything")
        principal.charge(10**9)
        auth.authorize_admin({})
    assert not Authenticator(None).enabled and Authenticator(KeyStore(None)).enabled


# --- the admin token --------------------------------------------------------------------


def test_admin_token(auth: Authenticator, metrics: Metrics) -> None:
    auth.authorize_admin(bearer("admin-secret"))
    auth.authorize_admin({"x-api-key": "admin-secret"})
    user = refusal(auth.authorize_admin, bearer(BOB))
    assert (user.status, user.code) == (403, "admin_required")
    assert rejected(metrics, "admin_forbidden") == 1
    for headers in ({}, bearer("admin-secre"), bearer("admin-secret-and-more")):
        assert refusal(auth.authorize_admin, headers).status == 401
    assert rejected(metrics, "admin_invalid") == 3


def test_admin_endpoints_without_a_token(keys_file: Path) -> None:
    Authenticator(None).authorize_admin({})  # auth off, no token: open for local use
    closed = refusal(Authenticator(KeyStore(keys_file)).authorize_admin, bearer(BOB))
    assert (closed.status, closed.code) == (403, "admin_disabled")
    assert refusal(Authenticator(None, admin_token="t").authorize_admin, {}).status == 401


# --- the CLI ----------------------------------------------------------------------------


def test_hash_key_prints_a_key_and_its_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["hash-key", "--id", "team-a", "--routes", "support,plain", "--rpm", "10"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    key, entry_line = lines
    parsed = parse_keys("keys:\n" + entry_line + "\n", "out")[0]
    assert parsed.sha256 == hash_key(key)
    assert (parsed.id, parsed.routes, parsed.requests_per_minute) == ("team-a", ("support", "plain"), 10)


def test_hash_key_sets_the_keys_priorities_and_refuses_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["hash-key", "--id", "batch", "--priority", "sheddable", "--priorities", "standard, sheddable"]
    assert cli_main(args) == 0
    entry_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  - ")][0]
    parsed = parse_keys("keys:\n" + entry_line + "\n", "out")[0]
    assert (parsed.priority, parsed.priorities) == ("sheddable", ("standard", "sheddable"))
    assert cli_main(["hash-key", "--priority", "urgent"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "priority" in err and "Traceback" not in err  # no key printed for a refused entry
    assert cli_main(["hash-key", "--priority", "critical", "--priorities", "standard"]) == 2
    assert "must be one of its priorities" in capsys.readouterr().err


def test_the_example_keys_file_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "api-keys.example.yaml"
    keys = {k.id: k for k in KeyStore(example).keys()}
    assert set(keys) == {"team-support", "batch-jobs", "on-call", "old-laptop"}
    assert keys["batch-jobs"].priority == "sheddable" and keys["on-call"].priorities == (
        "critical",
        "standard",
        "sheddable",
    )
