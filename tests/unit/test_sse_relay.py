import orjson

from loragate.service.proxy import SseRelay


def event(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


TOKEN = event({"choices": [{"delta": {"content": "hi"}}]})
USAGE = event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
DONE = b"data: [DONE]\n\n"


def test_events_pass_through_whole_as_they_complete():
    relay = SseRelay(hide_usage=True)
    stream = TOKEN + TOKEN
    assert relay.feed(stream[:10]) == b""  # half an event is held back
    assert relay.feed(stream[10:]) == stream


def test_usage_chunk_is_read_and_hidden_unless_asked():
    relay = SseRelay(hide_usage=True)
    out = relay.feed(TOKEN + USAGE[:7]) + relay.feed(USAGE[7:] + DONE)
    assert out == TOKEN + DONE
    assert (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (5, 2)

    shown = SseRelay(hide_usage=False)
    assert shown.feed(TOKEN + USAGE + DONE) == TOKEN + USAGE + DONE
    assert shown.usage.completion_tokens == 2


def test_null_usage_and_garbage_are_left_alone():
    relay = SseRelay(hide_usage=True)
    weird = event({"choices": [{"delta": {}}], "usage": None}) + b'data: {"usage": broken\n\n'
    assert relay.feed(weird) == weird
    assert relay.usage is None


def test_trailing_event_without_blank_line_is_flushed():
    relay = SseRelay(hide_usage=True)
    assert relay.feed(TOKEN + b"data: [DONE]") == TOKEN
    assert relay.finish() == DONE


def test_crlf_and_cr_line_ends_are_accepted_across_chunk_cuts():
    crlf = TOKEN.replace(b"\n", b"\r\n") + USAGE.replace(b"\n", b"\r\n") + DONE.replace(b"\n", b"\r\n")
    for cut in range(1, len(crlf)):  # every cut, including one between the CR and the LF of a line end
        relay = SseRelay(hide_usage=True)
        out = relay.feed(crlf[:cut]) + relay.feed(crlf[cut:]) + relay.finish()
        assert out == TOKEN + DONE, cut
        assert relay.usage.completion_tokens == 2
    cr = (TOKEN + DONE).replace(b"\n", b"\r")
    relay = SseRelay(hide_usage=False)
    assert relay.feed(cr) + relay.finish() == TOKEN + DONE
