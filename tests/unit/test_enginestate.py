"""Reading a vLLM replica's /metrics into an EngineState (service/enginestate.py)."""

from __future__ import annotations

import time

import pytest

from loragate.service.enginestate import (
    MAX_METRICS_BYTES,
    MetricsFormatError,
    parse_engine_metrics,
    parse_labels,
)

# The shape vLLM 0.32 (CPU build) writes; series and label order as seen on the real engine.
VLLM = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="base"} 3.0
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="base",reason="capacity"} 9.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="base"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="base"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="base"} 100.0
vllm:prefix_cache_hits_total{engine="0",model_name="base"} 40.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.6e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a1,a2",waiting_lora_adapters="a3"} 1.7e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="older",waiting_lora_adapters=""} 1.5e+09
"""


def test_reads_every_series_the_picker_uses():
    state = parse_engine_metrics(VLLM)
    assert (state.running, state.waiting, state.kv_usage) == (3.0, 2.0, 0.25)
    assert (state.prefix_queries, state.prefix_hits) == (100.0, 40.0)
    assert state.max_lora == 4
    # The newest series of the timestamp gauge, not the first or the last written.
    assert state.running_adapters == {"a1", "a2"} and state.waiting_adapters == {"a3"}
    assert state.active_adapters == {"a1", "a2", "a3"}
    assert state.missing == ()


def test_a_series_prefix_of_another_is_not_confused_with_it():
    # num_requests_waiting_by_reason (9) must not be read as num_requests_waiting.
    state = parse_engine_metrics(b'vllm:num_requests_waiting_by_reason{reason="capacity"} 9.0\n')
    assert state.waiting is None


def test_several_engines_of_one_server_are_summed_and_kv_is_the_fullest():
    text = (
        b'vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_running{engine="1"} 2\n'
        b'vllm:kv_cache_usage_perc{engine="0"} 0.2\nvllm:kv_cache_usage_perc{engine="1"} 0.7\n'
    )
    state = parse_engine_metrics(text)
    assert state.running == 3 and state.kv_usage == 0.7


def test_missing_series_are_named():
    state = parse_engine_metrics(b"# an engine that exposes nothing we know\nother_metric 1\n")
    assert state.running is None and state.max_lora is None and state.running_adapters is None
    assert state.missing == ("running", "waiting", "kv_usage", "prefix_cache", "lora_info")


def test_labels_with_escapes_and_braces_in_values():
    text = b'x{a="q\\"}{",b="back\\\\slash",c="new\\nline"} 1'
    labels, end = parse_labels(text, 1)
    assert labels == {"a": 'q"}{', "b": "back\\slash", "c": "new\nline"}
    assert text[end:] == b" 1"
    text = b'vllm:lora_requests_info{waiting_lora_adapters="",max_lora="2",running_lora_adapters="x}y"} 5\n'
    assert parse_engine_metrics(text).running_adapters == {"x}y"}


@pytest.mark.parametrize(
    "text",
    [
        b'vllm:num_requests_running{engine="0} 1\n',  # unterminated value
        b"vllm:lora_requests_info{max_lora=4} 1\n",  # unquoted
        b'vllm:lora_requests_info{max_lora="4"',  # no closing brace, no value
    ],
)
def test_broken_label_sets_are_refused_not_misread(text):
    with pytest.raises(MetricsFormatError):
        parse_engine_metrics(text)


def test_unparsable_values_are_skipped():
    assert parse_engine_metrics(b"vllm:num_requests_running{} NaNx\n").running is None
    assert parse_engine_metrics(b'vllm:lora_requests_info{max_lora="many"} 1\n').max_lora is None


def test_a_body_over_the_limit_is_refused():
    with pytest.raises(MetricsFormatError):
        parse_engine_metrics(b"#" * (MAX_METRICS_BYTES + 1))


def _seconds(text: bytes) -> float:
    started = time.perf_counter()
    try:
        parse_engine_metrics(text)
    except MetricsFormatError:
        pass
    return time.perf_counter() - started


@pytest.mark.parametrize(
    ("head", "unit"),
    [
        (b"", b"vllm:num_requests_running\n"),  # the wanted name again and again, never a sample
        (b"", b'vllm:lora_requests_info{a="\\\\\\\\"} 1\n'),  # escapes in many label sets
        (b"", b"\n"),
        (b"", b'vllm:lora_requests_info{max_lora="4",running_lora_adapters="' + b"a," * 40 + b'"} 1\n'),
        (b"vllm:lora_requests_info{", b'a="x",'),  # one label set that never closes, as long as the body
        (b'vllm:lora_requests_info{a="', b'\\"'),  # one label value of escaped quotes, as long as the body
    ],
)
def test_worst_cases_stay_linear(head, unit):
    """Time grows with size, not faster: 1/4 of the limit against the whole limit, ratio ~4 (not ~16)."""
    small = head + unit * ((MAX_METRICS_BYTES // 4 - len(head)) // len(unit))
    large = head + unit * ((MAX_METRICS_BYTES - len(head)) // len(unit))
    t_small = min(_seconds(small) for _ in range(5))
    t_large = min(_seconds(large) for _ in range(5))
    assert t_large < 10 * t_small + 0.02, (t_small, t_large)  # quadratic would be ~16x
    assert t_large < 2.0  # parsed in a worker thread (service/replicas.py), yet bounded
