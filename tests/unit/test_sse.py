"""loragate.common.sse: events and their data under every line end the SSE specification allows."""

import orjson
import pytest

from loragate.common import sse

CHUNKS = [
    {"id": "c1", "choices": [{"index": 0, "delta": {"content": "a\nb"}}]},
    {"id": "c1", "choices": [{"index": 0, "delta": {"content": "c"}, "finish_reason": "stop"}]},
]
LF = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in CHUNKS) + sse.DONE


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_events_and_json_read_the_same_under_any_line_end(line_end):
    stream = LF.replace(b"\n", line_end)
    assert list(sse.json_objects(stream)) == CHUNKS
    assert list(sse.events(stream)) == list(sse.events(LF))
    splitter = sse.EventSplitter()
    out = b"".join(splitter.feed(stream[i : i + 3]) for i in range(0, len(stream), 3)) + splitter.finish()
    assert out == LF


def test_event_data_joins_data_lines_and_drops_one_space():
    assert sse.event_data(b"data: {}") == b"{}"
    assert sse.event_data(b'event: x\ndata:{"a":\ndata:  1}\nid: 3') == b'{"a":\n 1}'
    assert sse.event_data(b": comment only") is None
    assert list(sse.json_objects(b'data:{"a": 1}\n\ndata: [DONE]\n\ndata: {broken\n\n: ping\n\n')) == [{"a": 1}]


def test_error_event_is_found_at_its_start_and_not_inside_strings():
    token = b"data: " + orjson.dumps({"choices": [{"delta": {"content": '{"error": no'}}]}) + b"\n\n"
    error = b'event: error\ndata:{"error": {"message": "x"}}\n\n'
    assert sse.find_error_event(token) == -1
    assert sse.find_error_event(token + error) == len(token)
    assert sse.find_error_event(b'data: {"error": 1}\n\n') == 0
