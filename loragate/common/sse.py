"""Server-sent events as the OpenAI-compatible APIs stream them: whole events, their data, the error event.

The SSE specification lets a line end in CRLF, LF or CR. Everything here turns line ends into LF
first, so a whole event is the bytes up to and including a blank line, ``b"\\n\\n"``; the gateway
passes events on in that form.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson

DONE = b"data: [DONE]\n\n"
_ERROR = b'{"error"'


def normalize(data: bytes) -> bytes:
    """CRLF and CR line ends as LF."""
    if b"\r" not in data:
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


class EventSplitter:
    """Cuts a byte stream into whole events as its chunks come in (an event, or a CRLF, may span chunks)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Every event this chunk completes, in LF form, each ending in a blank line; b"" if none."""
        data = self._buffer + chunk if self._buffer else chunk
        held = b""
        if b"\r" in data:
            if data.endswith(b"\r"):  # maybe the first half of a CRLF: decide with the next chunk
                data, held = data[:-1], b"\r"
            data = normalize(data)
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data + held
            return b""
        self._buffer = data[end + 2 :] + held
        return data[: end + 2]

    def finish(self) -> bytes:
        """What is left when the stream closes: an event without its blank line, completed; b"" if nothing."""
        rest, self._buffer = normalize(self._buffer), b""
        return rest.rstrip(b"\n") + b"\n\n" if rest.strip() else b""

    def drop_partial(self) -> None:
        """Forget a half-received event (the stream broke in its middle)."""
        self._buffer = b""


def encode(data: bytes) -> bytes:
    """One event carrying ``data`` (a single line, e.g. compact JSON)."""
    return b"data: " + data + b"\n\n"


def event_data(event: bytes) -> bytes | None:
    """The data of one LF-form event: its ``data:`` lines joined by LF (one space after the colon dropped)."""
    if event.startswith(b"data: ") and b"\n" not in event.rstrip(b"\n"):
        return event[6:].rstrip(b"\n")  # the usual case: one data line
    lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)


def events(stream: bytes) -> Iterator[bytes]:
    """The events of a whole stream (any line ends), LF form, without their blank line."""
    for event in normalize(stream).split(b"\n\n"):
        if event.strip(b"\n"):
            yield event.strip(b"\n")


def json_objects(stream: bytes) -> Iterator[dict]:
    """The JSON-object data of each event in a whole stream; ``[DONE]``, comments and bad JSON are skipped."""
    for event in events(stream):
        data = event_data(event)
        if not data or not data.startswith(b"{"):
            continue
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            yield parsed


def find_error_event(stream: bytes) -> int:
    """Where the first event whose data is an error object (``{"error": ...}``) starts in LF-form events; -1 if none.

    Inside JSON strings quotes are escaped, so the raw bytes ``{"error"`` after ``data:`` open an error object.
    """
    at = stream.find(_ERROR)
    while at >= 0:
        line = (
            at - 6
            if at >= 6 and stream[at - 6 : at] == b"data: "
            else (at - 5 if at >= 5 and stream[at - 5 : at] == b"data:" else -1)
        )
        if line == 0 or (line > 0 and stream[line - 1] == 10):  # the data line starts there (10: LF)
            start = stream.rfind(b"\n\n", 0, line)
            return 0 if start < 0 else start + 2
        at = stream.find(_ERROR, at + 1)
    return -1
