"""API keys and limits through a real gateway process in front of the STUB upstream (not vLLM)."""

from __future__ import annotations

import time

import httpx
import pytest

from loragate.service.apikeys import hash_key, new_key
from tests.metrics_text import sample_sum, scrape
from tests.processes import start_gateway, start_stub

ROUTES = """
routes:
  plain:
    variants: [{name: base, weight: 1}]
  other:
    variants: [{name: base, weight: 1}]
"""
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
KEYS = {name: new_key() for name in ("user", "rpm", "tpm", "stream", "narrow", "doomed")}
ADMIN = "admin-" + new_key()


def keys_yaml(revoked: frozenset[str] = frozenset()) -> str:
    limits = {
        "rpm": "requests_per_minute: 2",
        "tpm": "tokens_per_minute: 20",
        "stream": "tokens_per_minute: 20",
        "narrow": "routes: [other]",
    }
    lines = ["keys:"]
    for name, key in KEYS.items():
        extra = [limits[name]] if name in limits else []
        if name in revoked:
            extra.append("revoked: true")
        lines.append(f'  - {{id: {name}, sha256: "{hash_key(key)}"{"".join(", " + e for e in extra)}}}')
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    service, url = start_stub(tmp_path_factory.mktemp("stub") / "stub.log")
    yield url
    service.stop()


@pytest.fixture(scope="module")
def setup(stub, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gw-auth")
    (directory / "routes.yaml").write_text(ROUTES)
    keys_file = directory / "api-keys.yaml"
    keys_file.write_text(keys_yaml())
    log = directory / "gateway.log"
    service, url = start_gateway(
        directory / "routes.yaml",
        [stub],
        log,
        extra_env={
            "LORAGATE_AUTH": "on",
            "LORAGATE_API_KEYS_FILE": str(keys_file),
            "LORAGATE_ADMIN_TOKEN": ADMIN,
        },
    )
    yield url, keys_file, log
    assert service.stop() in (0, -15)
    text = log.read_text()
    assert "Traceback" not in text


@pytest.fixture(scope="module")
def gateway(setup) -> str:
    return setup[0]


def post(
    url: str, key: str | None = None, *, model: str = "plain", header: str = "authorization", **body
) -> httpx.Response:
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "authorization" else key
    return httpx.post(f"{url}/v1/chat/completions", json={"model": model, **CHAT, **body}, headers=headers, timeout=10)


def assert_error(response: httpx.Response, status: int, kind: str, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (kind, code)
    assert set(error) == {"message", "type", "param", "code"}


def test_missing_key_is_401(gateway):
    response = post(gateway)
    assert_error(response, 401, "authentication_error", "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert "x-loragate-route" not in response.headers  # refused before the body is read or a route resolved


def test_wrong_key_is_401_even_for_an_unknown_model(gateway):
    assert_error(post(gateway, "lg-not-a-key"), 401, "authentication_error", "invalid_api_key")
    assert_error(post(gateway, "lg-not-a-key", model="nope"), 401, "authentication_error", "invalid_api_key")


def test_good_key_by_bearer_or_x_api_key(gateway):
    for header in ("authorization", "x-api-key"):
        response = post(gateway, KEYS["user"], header=header)
        assert response.status_code == 200, response.text
        assert response.headers["x-loragate-route"] == "plain"


def test_models_need_a_key_and_show_only_allowed_routes(gateway):
    assert httpx.get(f"{gateway}/v1/models", timeout=10).status_code == 401
    listed = httpx.get(f"{gateway}/v1/models", headers={"authorization": f"Bearer {KEYS['narrow']}"}, timeout=10)
    assert {m["id"].split(":")[0] for m in listed.json()["data"]} == {"other"}


def test_route_not_allowed_is_403(gateway):
    assert_error(post(gateway, KEYS["narrow"]), 403, "permission_error", "model_not_allowed")
    assert post(gateway, KEYS["narrow"], model="other").status_code == 200


def test_requests_per_minute_gives_429_with_retry_after(gateway):
    assert [post(gateway, KEYS["rpm"]).status_code for _ in range(2)] == [200, 200]
    response = post(gateway, KEYS["rpm"])
    assert_error(response, 429, "rate_limit_error", "rate_limit_exceeded")
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 30
    assert post(gateway, KEYS["user"]).status_code == 200  # another key is not affected


def test_tokens_per_minute_are_charged_from_the_real_usage(gateway):
    # The stub answers max_tokens completion tokens + 7 prompt tokens: 7 + 16 = 23 > 20 a minute.
    first = post(gateway, KEYS["tpm"], max_tokens=16)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == 23
    response = post(gateway, KEYS["tpm"], max_tokens=1)
    assert_error(response, 429, "rate_limit_error", "rate_limit_exceeded")
    assert "tokens per minute" in response.json()["error"]["message"]
    assert int(response.headers["retry-after"]) in (12, 13)  # 4 tokens short at 1 token per 3 s


def test_streamed_usage_is_charged_too(gateway):
    # The client does not ask for usage; the gateway still learns it (7 + 16 = 23 > 20 a minute).
    with httpx.stream(
        "POST",
        f"{gateway}/v1/chat/completions",
        json={"model": "plain", **CHAT, "max_tokens": 16, "stream": True},
        headers={"authorization": f"Bearer {KEYS['stream']}"},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        body = b"".join(response.iter_bytes())
    assert b"[DONE]" in body and b'"usage"' not in body
    assert_error(post(gateway, KEYS["stream"], max_tokens=1), 429, "rate_limit_error", "rate_limit_exceeded")


def test_admin_endpoints_need_the_admin_token(gateway):
    for path in ("/admin/keys", "/admin/upstreams"):
        user = httpx.get(f"{gateway}{path}", headers={"authorization": f"Bearer {KEYS['user']}"}, timeout=10)
        assert_error(user, 403, "permission_error", "admin_required")
        assert httpx.get(f"{gateway}{path}", timeout=10).status_code == 401
        assert httpx.get(f"{gateway}{path}", headers={"authorization": "Bearer wrong"}, timeout=10).status_code == 401
    admin = {"authorization": f"Bearer {ADMIN}"}
    keys = httpx.get(f"{gateway}/admin/keys", headers=admin, timeout=10)
    assert keys.status_code == 200
    listed = {k["id"]: k for k in keys.json()["keys"]}
    assert set(listed) == set(KEYS)
    assert listed["rpm"]["requests_per_minute"] == 2 and listed["narrow"]["routes"] == ["other"]
    assert "sha256" not in keys.text and hash_key(KEYS["user"]) not in keys.text
    upstreams = httpx.get(f"{gateway}/admin/upstreams", headers=admin, timeout=10).json()["upstreams"]
    assert len(upstreams) == 1 and upstreams[0]["healthy"] is True
    assert set(upstreams[0]) == {"url", "healthy", "draining", "in_flight", "adapters", "loaded_by_gateway", "engine"}


def test_revoking_a_key_by_editing_the_file(setup):
    gateway, keys_file, _ = setup
    assert post(gateway, KEYS["doomed"]).status_code == 200
    keys_file.write_text("keys: [broken")  # a bad edit is rejected; the last good keys stay
    time.sleep(1.5)
    assert post(gateway, KEYS["doomed"]).status_code == 200
    keys_file.write_text(keys_yaml(revoked=frozenset({"doomed"})))
    deadline = time.monotonic() + 10
    while (response := post(gateway, KEYS["doomed"])).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_error(response, 401, "authentication_error", "invalid_api_key")
    assert "revoked" in response.json()["error"]["message"]
    assert post(gateway, KEYS["user"]).status_code == 200


def test_rejections_are_counted_by_reason(gateway):
    metrics = scrape(gateway)
    for reason in (
        "missing_key",
        "invalid_key",
        "route_forbidden",
        "request_rate",
        "token_rate",
        "admin_forbidden",
        "admin_invalid",
        "revoked_key",
    ):
        assert sample_sum(metrics, "loragate_auth_rejections_total", reason=reason) >= 1, reason
    assert sample_sum(metrics, "loragate_api_keys_reloads_total", result="error") >= 1
    assert sample_sum(metrics, "loragate_api_keys_reloads_total", result="success") >= 1
    assert sample_sum(metrics, "loragate_requests_total", route="plain", status_class="4xx") >= 1
    for key in [*KEYS.values(), ADMIN]:
        assert key not in metrics


def test_no_key_ever_reaches_the_log(setup):
    _, _, log = setup
    text = log.read_text()
    assert "API keys reloaded" in text  # the log is written to, and it names ids
    for key in [*KEYS.values(), ADMIN]:
        assert key not in text
        assert hash_key(key) not in text
