"""Hypothesis throws arbitrary JSON at the gateway (in front of the STUB upstream): never a 5xx, never a crash.

The OpenAPI schema's paths are fuzzed too: every documented path with random methods and bodies.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.processes import start_gateway, start_stub

ROUTES = """
routes:
  ok:
    sticky_key: x-user-id
    variants:
      - {name: v1, adapter: good, path: /a, weight: 3}
      - {name: v2, adapter: other, path: /b, weight: 1}
"""

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
known_keys = st.sampled_from(
    [
        "model",
        "messages",
        "prompt",
        "stream",
        "stream_options",
        "max_tokens",
        "n",
        "user",
        "temperature",
        "max_completion_tokens",
        "continue_final_message",
    ]
)
models = st.sampled_from(["ok", "ok:v1", "ok:v2", "ok:nope", "nope", "", "ok:"]) | st.text(max_size=12) | scalars
messages = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=30)}
        ),
        max_size=3,
    )
    | json_values
)
bodies = (
    st.fixed_dictionaries(
        {"model": models},
        optional={
            "messages": messages,
            "prompt": st.text(max_size=30) | json_values,
            "stream": st.booleans() | scalars,
            "stream_options": json_values,
            "max_tokens": st.integers(-5, 50) | scalars,
            "n": st.integers(-1, 6) | scalars,
            "user": st.text(max_size=10) | scalars,
        },
    )
    | st.dictionaries(known_keys, json_values, max_size=6)
    | json_values
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    stub, stub_url = start_stub(directory / "stub.log", chunks=3)
    try:
        (directory / "routes.yaml").write_text(ROUTES)
        service, url = start_gateway(
            directory / "routes.yaml",
            [stub_url],
            directory / "gateway.log",
            extra_env={"LORAGATE_MAX_BODY_BYTES": "65536"},
        )
        try:
            with httpx.Client(base_url=url, timeout=10) as client:
                yield client
        finally:
            service.stop()
    finally:
        stub.stop()
    log = (directory / "gateway.log").read_text()
    assert "Traceback" not in log and "unhandled error" not in log


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=bodies,
    endpoint=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    sticky=st.none() | st.text("abcxyz019-_.", min_size=1, max_size=10),
)
def test_arbitrary_json_bodies_never_cause_a_5xx(gateway, body, endpoint, sticky):
    import json

    headers = {"x-user-id": sticky} if sticky else {}
    response = gateway.post(endpoint, content=json.dumps(body), headers={"content-type": "application/json", **headers})
    check(response)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), endpoint=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_arbitrary_bytes_never_cause_a_5xx(gateway, raw, endpoint):
    check(gateway.post(endpoint, content=raw, headers={"content-type": "application/json"}))


def test_every_path_of_the_openapi_schema_answers_without_a_5xx(gateway):
    schema = gateway.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    for path in schema["paths"]:
        for method in ("GET", "POST", "PUT", "DELETE"):
            for body in (None, b"{}", b"null", b'{"model": 1}'):
                check(gateway.request(method, path, content=body))
