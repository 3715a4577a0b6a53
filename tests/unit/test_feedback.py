"""POST /v1/feedback: validation, storage with the request log, and the metrics."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from loragate.service.app import create_app
from loragate.service.requestlog.store import read_table
from loragate.service.metrics import Metrics
from loragate.service.settings import Settings
from tests.unit.test_requestlog import chat_record


def _app(tmp_path, **settings):
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  support:\n    variants: [{name: v1, adapter: a1, weight: 1}]\n")
    metrics = Metrics()
    app = create_app(
        Settings(
            routes_file=routes,
            upstreams=["http://127.0.0.1:9"],
            health_timeout_s=0.2,
            feedback_labels=["good", "bad"],
            **settings,
        ),
        metrics,
    )
    return app, metrics


@pytest.fixture
def logged(tmp_path):
    app, metrics = _app(tmp_path, request_log_url=str(tmp_path / "log"))
    with TestClient(app) as client:
        yield client, app, metrics, tmp_path / "log"


@pytest.fixture(scope="module")
def validating(tmp_path_factory):
    """One gateway with the request log for the requests it refuses (each start spawns a conversion process:
    half a second of CPU per test otherwise); refused feedback writes nothing, so they can share it."""
    root = tmp_path_factory.mktemp("validating")
    app, _ = _app(root, request_log_url=str(root / "log"))
    with TestClient(app) as client:
        yield client


def test_feedback_is_stored_and_counted(logged):
    client, app, metrics, root = logged
    app.state.request_log.record(chat_record("known-1"))  # as the gateway does for an answered request
    answer = client.post(
        "/v1/feedback",
        json={"request_id": "known-1", "score": 4, "label": "good", "correction": "mail jane@example.com instead"},
    )
    assert answer.status_code == 200
    assert answer.json() == {"object": "feedback", "request_id": "known-1", "route": "support", "variant": "v1"}
    unknown = client.post("/v1/feedback", json={"request_id": "other-replica", "label": "meh"})
    assert unknown.status_code == 200 and unknown.json()["route"] is None
    sample = metrics.registry.get_sample_value
    assert sample("loragate_feedback_total", {"route": "support", "variant": "v1", "label": "good"}) == 1
    assert sample("loragate_feedback_total", {"route": "_unknown", "variant": "none", "label": "other"}) == 1
    assert sample("loragate_feedback_score_count", {"route": "support", "variant": "v1"}) == 1
    assert sample("loragate_feedback_score_sum", {"route": "support", "variant": "v1"}) == 4
    client.__exit__(None, None, None)  # shutdown flushes
    rows = {r["request_id"]: r for r in read_table(str(root), "feedback").to_pylist()}
    assert rows["known-1"]["route"] == "support" and rows["known-1"]["score"] == 4.0
    assert rows["known-1"]["correction"] == "mail [EMAIL] instead"
    assert rows["other-replica"]["route"] is None and rows["other-replica"]["label"] == "meh"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"score": 1}, "request_id", "invalid_request_id"),
        ({"request_id": "bad id!", "score": 1}, "request_id", "invalid_request_id"),
        ({"request_id": "r1"}, None, "empty_feedback"),
        ({"request_id": "r1", "score": "high"}, "score", "invalid_score"),
        ({"request_id": "r1", "score": True}, "score", "invalid_score"),
        ({"request_id": "r1", "label": ""}, "label", "invalid_label"),
        ({"request_id": "r1", "label": "x" * 65}, "label", "invalid_label"),
        ({"request_id": "r1", "correction": 5}, "correction", "invalid_correction"),
        ({"request_id": "r1", "score": 1, "user": "me"}, "user", "unknown_parameter"),
        ([1, 2], None, "invalid_json"),
    ],
)
def test_invalid_feedback_is_a_clear_400(validating, body, param, code):
    client = validating
    answer = client.post("/v1/feedback", json=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_not_json_and_too_large(validating):
    client = validating
    answer = client.post("/v1/feedback", content=b"{nope", headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
    answer = client.post("/v1/feedback", json={"request_id": "r1", "correction": "x" * 70_000})
    assert answer.status_code == 413


def test_feedback_is_404_without_the_request_log(tmp_path):
    app, _ = _app(tmp_path)
    with TestClient(app) as client:
        answer = client.post("/v1/feedback", json={"request_id": "r1", "score": 1})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "feedback_disabled"
