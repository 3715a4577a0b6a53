"""Request-log windows from Parquet, reference datasets, Prometheus range queries, the monitor service."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from loragate.monitoring.prometheus import Prometheus, PrometheusError, label
from loragate.monitoring.sources import RequestLog, Window, load_reference, variant_queries, variant_series
from tests.synthetic import requests_frame
from tests.local_http import serve

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def write_log(root, frame, table="requests", name="w1-0.parquet"):
    for day, part in frame.groupby(frame["timestamp"].dt.strftime("%Y-%m-%d")):
        directory = root / table / f"date={day}"
        directory.mkdir(parents=True, exist_ok=True)
        part = part.assign(timestamp=part["timestamp"].astype("datetime64[ms, UTC]"))
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), directory / name)


def test_request_log_window_filters_route_variant_and_time_across_days(tmp_path):
    frame = pd.concat(
        [
            requests_frame(100, seed=1, route="support", variant="v1", start=T0, span_s=86_400 * 2),
            requests_frame(100, seed=2, route="support", variant="v2", start=T0, span_s=86_400 * 2),
            requests_frame(50, seed=3, route="other", variant="v1", start=T0, span_s=86_400 * 2),
        ]
    )
    write_log(tmp_path, frame)
    (tmp_path / "requests" / "date=2025-06-16" / "torn.parquet").write_bytes(b"PAR1 not really")
    log = RequestLog(tmp_path)
    window = Window.between(T0 + 3600, T0 + 86_400 * 1.5)
    got = log.requests(window, "support", "v1")
    expected = frame[
        (frame.route == "support")
        & (frame.variant == "v1")
        & (frame.timestamp >= pd.Timestamp(window.start))
        & (frame.timestamp < pd.Timestamp(window.end))
    ]
    assert len(got) == len(expected) > 0
    assert set(got.request_id) == set(expected.request_id)
    assert got.timestamp.is_monotonic_increasing and str(got.timestamp.dt.tz) == "UTC"
    assert len(log.requests(window, "support")) > len(got)  # both variants
    assert log.requests(Window.between(T0 - 86_400 * 10, T0 - 86_400 * 9)).empty


def test_feedback_window(tmp_path):
    feedback = pd.DataFrame(
        {
            "request_id": ["a", "b"],
            "timestamp": pd.to_datetime([T0, T0 + 10], unit="s", utc=True),
            "route": ["support", None],
            "variant": ["v1", None],
            "score": [0.5, None],
            "label": [None, "bad"],
            "correction": [None, "better"],
        }
    )
    write_log(tmp_path, feedback, table="feedback")
    got = RequestLog(tmp_path).feedback(Window.between(T0 - 1, T0 + 60))
    assert list(got.request_id) == ["a", "b"] and got.correction.iloc[1] == "better"


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_reference_dataset_formats(tmp_path, suffix):
    frame = pd.DataFrame({"prompt": ["hi", "reset my password"], "response": ["hello", "sure"]})
    path = tmp_path / f"train.{suffix}"
    {
        "parquet": lambda: frame.to_parquet(path),
        "csv": lambda: frame.to_csv(path, index=False),
        "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
    }[suffix]()
    got = load_reference(path)
    assert list(got.prompt_text) == ["hi", "reset my password"] and list(got.response_text) == ["hello", "sure"]


def test_reference_chat_jsonl_matches_the_request_log_prompt_format(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        )
        + "\n"
    )
    got = load_reference(path)
    assert got.prompt_text[0] == "system: be brief\nuser: hi" and got.response_text[0] == "hello"
    with pytest.raises(ValueError):
        load_reference(tmp_path / "train.txt")


def test_variant_queries_escape_labels_and_cover_the_series():
    queries = variant_queries('sup"port', "v1")
    assert set(queries) == {
        "latency_p50_s",
        "latency_p95_s",
        "latency_p99_s",
        "requests_per_s",
        "cost_per_request_usd",
        "error_rate",
        "fallback_rate",
    }
    assert 'route="sup\\"port",variant="v1"' in queries["latency_p95_s"]
    assert "loragate_request_duration_seconds_bucket" in queries["latency_p95_s"]
    assert 'status_class=~"5xx"' in queries["error_rate"]
    assert "loragate_fallbacks_total" in queries["fallback_rate"]
    assert "loragate_cost_usd_total" in queries["cost_per_request_usd"]


async def test_prometheus_range_queries_over_http():
    seen = []

    async def query_range(request):
        seen.append(dict(request.query))
        query = request.query["query"]
        values = [[T0, "0.5"], [T0 + 60, "NaN"]] if "histogram_quantile" in query else [[T0, "2"], [T0 + 60, "3"]]
        return web.json_response(
            {"status": "success", "data": {"resultType": "matrix", "result": [{"metric": {}, "values": values}]}}
        )

    app = web.Application()
    app.router.add_get("/api/v1/query_range", query_range)
    async with serve(app) as port:
        frame = await variant_series(
            Prometheus(f"http://127.0.0.1:{port}"), "support", "v1", Window.between(T0, T0 + 60), step_s=60
        )
    assert len(seen) == 7 and seen[0]["step"] == "60"
    assert frame["requests_per_s"].tolist() == [2.0, 3.0]
    assert frame["latency_p95_s"].iloc[0] == 0.5 and pd.isna(frame["latency_p95_s"].iloc[1])


async def test_prometheus_refusal_is_a_typed_error_and_labels_are_escaped():
    async def refuse(request):
        return web.json_response({"status": "error", "errorType": "bad_data", "error": "parse error"}, status=400)

    app = web.Application()
    app.router.add_get("/api/v1/query", refuse)
    async with serve(app) as port:
        with pytest.raises(PrometheusError, match="bad_data: parse error"):
            await Prometheus(f"http://127.0.0.1:{port}").value("up")
    assert label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert 'route="a\\"b"' in variant_queries('a"b', None)["requests_per_s"]


async def test_monitor_check_metrics_and_trigger(tmp_path):
    from loragate.monitoring.config import MonitorConfig
    from loragate.monitoring.service import Monitor, make_app

    now = T0 + 7200
    write_log(
        tmp_path / "log",
        pd.concat(
            [
                requests_frame(200, seed=1, start=now - 7200, span_s=3500),
                requests_frame(200, seed=2, start=now - 3600, span_s=3500, prompt_words=30, new_vocabulary=0.4),
            ]
        ),
    )
    config = MonitorConfig.model_validate(
        {
            "request_log": str(tmp_path / "log"),
            "output_dir": str(tmp_path / "out"),
            "state_file": str(tmp_path / "state.json"),
            "drift": {"drift_share": 0.3},
            "checks": [
                {
                    "route": "support",
                    "variant": "v1",
                    "window_s": 3600,
                    "reference": {"window_s": 3600},
                    "policy": {"drift_share_above": 0.3, "consecutive_runs": 1, "cooldown_s": 3600},
                    "actions": [{"type": "dataset", "location": str(tmp_path / "datasets")}],
                }
            ],
        }
    )
    monitor = Monitor(config)
    run = await monitor.run_check(0, now=now)
    assert run.result.dataset_drift and run.outcome.decision.fire
    assert run.outcome.actions[0].ok and list((tmp_path / "datasets").glob("*.jsonl"))
    again = await monitor.run_check(0, now=now + 60)
    assert again.result.dataset_drift and not again.outcome.decision.fire  # cool-down

    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(make_app(monitor))) as client:
        text = await (await client.get("/metrics")).text()
        health = await (await client.get("/healthz")).json()
    assert 'loragate_drift_detected{group="inputs",route="support",variant="v1"} 1.0' in text
    assert 'loragate_drift_share{route="support",variant="v1"}' in text
    assert 'loragate_drift_feature_score{feature="prompt_words",route="support",variant="v1"}' in text
    assert 'loragate_drift_last_run_timestamp_seconds{route="support",variant="v1"}' in text
    assert 'loragate_retraining_triggers_total{action="dataset",result="ok",route="support",variant="v1"} 1.0' in text
    assert health["checks"]["support/v1"]["status"] == "drift"
