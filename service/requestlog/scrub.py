"""Scrub a whole batch of texts at once: the same output as ``loragate.common.scrub.scrub``, text by text.

ASCII texts go to the native scrubber where it is built (loragate.common.scrub.native_scrubber); the
rest, below, is how the Python rules take the other texts (or all of them, without the native build).

Runs in the request log's conversion process (it imports pyarrow). ``scrub`` tries every rule
its cheap facts allow on each text, and most of those tries find nothing: a Python regex with a
lookbehind scans every position of the text. Here each costly rule is first run as a *gate*
over the whole batch in Arrow (RE2, one C++ pass over all texts): a pattern that matches every
text the rule could change (the rule with its lookarounds and backreference dropped; where Python's
``\\d``, ``\\s`` or a case-insensitive letter could match a non-ASCII character, any non-ASCII
character). Only the texts the gate lets through get the Python rule, with its replacement
function (Luhn, mod-97, address validation: what RE2 cannot express), in the same order and
under the same facts as ``scrub``. A gate is a necessary condition, so skipping a text it
rejects changes nothing: the output is ``scrub``'s exactly (tests/unit/test_log_fastpaths.py checks
it on the PII corpus). Rules without a gate (the keyword-gated secrets) run as in ``scrub``.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

from loragate.common import scrub as rules

# Wider than Python's classes on str whatever the two Unicode versions: any non-ASCII character may be one.
_ANY_NON_ASCII = r"\x{80}-\x{10FFFF}"
_S = rf"[\t-\r\x1c-\x20{_ANY_NON_ASCII}]"  # Python's \s (str.isspace)
_D = rf"[0-9{_ANY_NON_ASCII}]"  # Python's \d (Unicode decimal digits)
_L = rf"[A-Za-z{_ANY_NON_ASCII}]"  # a letter under re.IGNORECASE (the Kelvin sign matches k)


def _ci(word: str) -> str:
    """``word`` as Python's re.IGNORECASE may match it (a non-ASCII character may fold to a letter)."""
    return "".join(f"[{c.lower()}{c.upper()}{_ANY_NON_ASCII}]" if c.isalpha() else c for c in word)


def _ci_any(*words: str) -> str:
    return "(?:" + "|".join(_ci(word) for word in words) + ")"


# The index of a rule in loragate.common.scrub._RULES -> its gate (RE2).
_GATES = {
    0: rf"{_ci_any('bearer', 'basic')}{_S}",  # Bearer/Basic <token>
    1: rf"{_ci_any('password', 'passwd', 'pwd', 'secret', 'key', 'token', 'auth')}[\"']?{_S}*[:=]",  # key = value
    2: r"(?:sk|lg)-[A-Za-z0-9_-]{16}",
    3: r"(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}",
    4: r"gh[pousr]_[A-Za-z0-9]{30}",
    5: r"xox[abprs]-[A-Za-z0-9-]{10}",
    6: r"AIza[0-9A-Za-z_-]{35}",
    7: r"eyJ[A-Za-z0-9_-]{8}",
    8: r"[A-Za-z0-9._%+-]@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2}",  # e-mail
    9: r"[0-9a-fA-F]{32}",  # hex run
    10: r"[A-Za-z0-9+/_-]{40}",  # base64 run
    11: rf"[A-Z][A-Z]{_D}{_D}{_S}?[A-Z0-9]{{4}}{_S}?[A-Z0-9]{{4}}",  # IBAN
    12: rf"{_D}(?:[ -]?{_D}){{12}}",  # card
    13: rf"{_D}{_D}{_D}[- ]{_D}{_D}[- ]{_D}{_D}{_D}{_D}",  # SSN
    14: rf"{_L}{_L}{_S}?{_D}{_D}{_S}?{_D}{_D}{_S}?{_D}{_D}{_S}?{_L}",  # UK NI (case-insensitive in Python)
    16: r":[0-9A-Fa-f]{0,4}:",  # IPv6: at least two colons with at most 4 hex digits between
    17: rf"{_D}\.{_D}{{1,3}}\.{_D}{{1,3}}\.{_D}",  # IPv4
    18: rf"(?:\+|00){_D}{{1,3}}(?:[.-]|{_S})?\(?{_D}",  # international phone (its start)
    19: rf"(?:\({_D}{{3}}\){_S}?|{_D}{{3}}(?:[.-]|{_S})){_D}{{3}}(?:[.-]|{_S}){_D}{{4}}",  # North American phone
    20: rf"0{_D}{{2,4}}(?:-|{_S})?{_D}{{3,4}}(?:-|{_S})?{_D}{{3}}",  # national phone
    15: "(?s)" + _ci_any("id", *rules._ID_WORDS) + f".*{_D}",  # keyword ... digit ("id" covers id cards)
}
assert set(_GATES) == set(range(len(rules._RULES))), "every rule needs a gate"
_ANY_GATE = "|".join(f"(?:{gate})" for gate in _GATES.values())  # a text no gate lets through stays as it is

# The rules in runs of neighbours, each run with one gate for all of it: most texts pass no gate of a run
# (secrets, opaque runs, checksummed numbers and ids, addresses), and one RE2 pass then skips the whole run.
_RUNS = [range(0, 8), range(8, 9), range(9, 18), range(18, 21)]
assert [index for run in _RUNS for index in run] == list(range(len(rules._RULES)))
_RUN_GATES = ["|".join(f"(?:{_GATES[index]})" for index in run) for run in _RUNS]

# Rules RE2 can apply itself, with the same result as Python's re.sub: a constant placeholder, and the
# rule's pattern without its guard and possessive quantifiers (RE2 has neither, and needs neither: it runs in
# linear time) nor lookarounds, backreferences or Unicode-dependent classes (\b, \w, \d, \s, re.I), so that
# RE2's leftmost-first matching finds exactly the matches Python's backtracking finds. Their ``applies``
# condition is implied by the gate. The e-mail rule (its gate is a necessary condition of "@" in the text).
_RE2_RULES = {8: (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", rules.EMAIL)}
assert all(
    (unguarded := rules._RULES[index].unguarded) is not None
    and not unguarded.flags & re.IGNORECASE
    and unguarded.pattern.replace("++", "+") == pattern
    for index, (pattern, _) in _RE2_RULES.items()
)


class _Facts:
    """scrub's facts about an original text, each found when a rule first asks: only texts a gate let through."""

    __slots__ = ("text", "_digits", "_long_run", "_lower", "_ni_shape")

    def __init__(self, text: str) -> None:
        self.text = text
        self._digits: int | None = None
        self._long_run: bool | None = None
        self._lower: str | None = None
        self._ni_shape: bool | None = None

    @property
    def digits(self) -> int:  # ASCII digits, as scrub counts them
        if self._digits is None:
            self._digits = rules.ascii_digits(self.text)
        return self._digits

    @property
    def long_run(self) -> bool:
        if self._long_run is None:
            self._long_run = rules._LONG_RUN.search(self.text) is not None
        return self._long_run

    @property
    def lower(self) -> str:
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    @property
    def ni_shape(self) -> bool:
        if self._ni_shape is None:
            self._ni_shape = self.digits >= 6 and rules._NI_SHAPE.search(self.text) is not None
        return self._ni_shape


def scrub_many(texts: list[str]) -> list[str]:
    """``[scrub(text) for text in texts]``: the native scrubber's where it takes the text, else gated (below)."""
    native = rules.native_scrubber()
    if native is None:
        return _scrub_gated(texts)
    out: list[str] = []
    rest: list[int] = []  # what the native scrubber left to Python (non-ASCII texts)
    for text in texts:
        scrubbed = native.scrub(text)
        if scrubbed is None:
            rest.append(len(out))
            scrubbed = text
        out.append(scrubbed)
    if rest:
        for i, scrubbed in zip(rest, _scrub_gated([texts[i] for i in rest])):
            out[i] = scrubbed
    return out


def _scrub_gated(texts: list[str]) -> list[str]:
    """``[scrub(text) for text in texts]`` with Python's rules, computed a rule at a time over the whole batch."""
    out = list(texts)
    if not out:
        return out
    try:
        every = pa.array(out, pa.string())
    except (pa.ArrowException, UnicodeError):  # e.g. a lone surrogate: not UTF-8, text by text then
        return [rules.scrub(text) for text in out]
    # Only the texts some gate lets through can change: work on those (``live``: their indexes in ``out``).
    live = pc.indices_nonzero(pc.match_substring_regex(every, _ANY_GATE)).to_pylist()
    if not live:
        return out
    current = [out[i] for i in live]
    column: pa.Array | None = every.take(live)
    # Facts are taken from the original texts, before any replacement, as scrub takes them.
    facts: list[_Facts | None] = [None] * len(current)
    for run, run_gate in zip(_RUNS, _RUN_GATES):
        if column is None:  # the texts as they are now, after the rules before this run
            column = pa.array(current, pa.string())
        # A text outside the run's gate, and not changed by a rule of this run since, passes none of its gates.
        run_column: pa.Array = column
        passed = pc.indices_nonzero(pc.match_substring_regex(run_column, run_gate)).to_pylist()
        changed: set[int] = set()

        def now(indexes: list[int]) -> pa.Array:
            """The texts at ``indexes`` as they are now (the run's column while this run changed nothing)."""
            return run_column.take(indexes) if not changed else pa.array([current[j] for j in indexes], pa.string())

        for index in run:
            candidates = sorted(changed.union(passed)) if changed else passed
            if not candidates:
                break
            if len(run) > 1:  # this rule's own gate, on the candidates as they are now
                candidates = [
                    candidates[k]
                    for k in pc.indices_nonzero(pc.match_substring_regex(now(candidates), _GATES[index])).to_pylist()
                ]
            if index in _RE2_RULES:
                re2_pattern, placeholder = _RE2_RULES[index]
                replaced = pc.replace_substring_regex(now(candidates), re2_pattern, placeholder)
                for j, text in zip(candidates, replaced.to_pylist()):
                    if text != current[j]:
                        current[j] = text
                        changed.add(j)
                continue
            sub, holds = rules._SUBS[index]
            for j in candidates:
                fact = facts[j]
                if fact is None:
                    fact = facts[j] = _Facts(texts[live[j]])
                if holds(fact):
                    text = current[j]
                    new = sub(text)
                    if new != text:
                        current[j] = new
                        changed.add(j)
        if changed:
            column = None
    for j, i in enumerate(live):
        out[i] = current[j]
    return out
