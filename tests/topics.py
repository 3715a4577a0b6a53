"""Real user questions by topic, for the semantic-drift tests and benchmark.

The text is the English ChatterBot corpus (PyPI ``chatterbot-corpus``, BSD, in the ``dev``
extra): human-written dialogs by topic. The user side of each dialog (its 1st, 3rd, ...
turns) is a prompt. Two populations: ``tech`` (coding, AI, computers) and
``everyday`` (trivia, psychology, small talk, emotions). The pools are small (a few hundred
distinct prompts each): windows larger than a pool repeat prompts, as real traffic does.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

TOPICS = {
    "tech": ("coding", "ai", "computers"),
    "everyday": ("trivia", "psychology", "conversations", "greetings", "emotion"),
}


def corpus_dir() -> Path:
    import chatterbot_corpus  # the dev extra; ImportError names the package

    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


@lru_cache(maxsize=None)
def prompts(topic: str) -> tuple[str, ...]:
    """The distinct user-side turns of the topic's files, in file order."""
    import yaml

    seen: dict[str, None] = {}
    for name in TOPICS[topic]:
        for dialog in yaml.safe_load((corpus_dir() / f"{name}.yml").read_text())["conversations"]:
            for turn in dialog[0::2]:
                if isinstance(turn, str) and turn.strip():
                    seen.setdefault(" ".join(turn.split()), None)
    return tuple(seen)


def _words(text: str) -> int:
    return len(text.split())


def window(
    rows: int, *, seed: int, shifted: float = 0.0, base: str = "tech", other: str = "everyday", max_words: int = 20
) -> list[str]:
    """``rows`` prompts: a share ``shifted`` from ``other``, the rest from ``base`` (with replacement).

    Only prompts of at most ``max_words`` words are drawn, and each ``other`` prompt is drawn with
    the word count of a ``base`` prompt drawn first, so a change of topic comes without a change
    of length.
    """
    rng = random.Random(seed)
    base_pool = [p for p in prompts(base) if _words(p) <= max_words]
    by_length: dict[int, list[str]] = {}
    for p in prompts(other):
        if _words(p) <= max_words:
            by_length.setdefault(_words(p), []).append(p)
    lengths = sorted(by_length)
    out = []
    for _ in range(rows):
        text = rng.choice(base_pool)
        if rng.random() < shifted:
            k = min(lengths, key=lambda n: (abs(n - _words(text)), rng.random()))
            text = rng.choice(by_length[k])
        out.append(text)
    return out
