# The C module service/requestlog/_lognative.c (built by setup.py where a C compiler is).
from collections.abc import Callable, Sequence

def stream_answer(stream: bytes, /) -> tuple[str | None, str | None] | None: ...
def body_answer(body: bytes, /) -> tuple[str | None, str | None] | None: ...
def chat_turns(body: bytes, roles: list[str], contents: list[str], /) -> bool | None: ...
def read_turns(
    endpoints: Sequence[str],
    payloads: Sequence[bytes],
    roles: list[str],
    contents: list[str],
    offsets: list[int],
    no_turns: list[bool],
    general: Callable[[int], bool],
    /,
) -> None: ...
def read_answers(
    streams: Sequence[bool],
    statuses: Sequence[int],
    answers: Sequence[bytes | None],
    general: Callable[[int], tuple[str | None, str | None]],
    /,
) -> tuple[list[str | None], list[str | None]]: ...
