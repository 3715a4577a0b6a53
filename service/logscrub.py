"""Scrub a whole batch of texts at once: the same output as ``loragate.common.scrub.scrub``, text by text.

Runs in the request log's conversion process (it imports pyarrow). ``scrub`` tries every rule
its cheap facts allow on each text, and most of those tries find nothing: a Python regex with a
lookbehind scans every position of the text. Here each costly rule is first run as a *gate*
over the whole batch in Arrow (RE2, one C++ pass over all texts): a pattern that matches every
text the rule could change (the rule with its lookarounds and backreference dropped; where Python's
``\\d``, ``\\s`` or a case-insensitive letter could match a non-ASCII character, any non-ASCII
character). Only the texts the gate lets through get the Python rule, with its replacement
function (Luhn, mod-97, address validation: what RE2 cannot express), in the same order and
under the same facts as ``scrub``. A gate is a necessary condition, so skipping a text it
rejects changes nothing: the output is ``scrub``'s exactly (tests/unit/test_logscrub.py checks
it on the PII corpus). Rules without a gate (the keyword-gated secrets) run as in ``scrub``.
"""

from __future__ import annotations

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
    15: "(?s)" + _ci_any("passport", "national", "id", "tax", "tin", "ssn", "sin", "nino", "dni", "nie", "nif",
                       "cpf", "aadhaar", "pesel", "bsn", "personnummer", "steuer") + f".*{_D}",  # keyword ... digit
}
assert set(_GATES) == set(range(len(rules._RULES))), "every rule needs a gate"
_ANY_GATE = "|".join(f"(?:{gate})" for gate in _GATES.values())  # a text no gate lets through stays as it is


class _Facts:
    """scrub's facts about an original text, found lazily: only texts some gate let through need them."""

    __slots__ = ("text", "digits", "long_run", "_lower", "_six_digits")

    def __init__(self, text: str, digits: int, long_run: bool) -> None:
        self.text = text
        self.digits = digits  # ASCII digits, as scrub counts them
        self.long_run = long_run
        self._lower: str | None = None
        self._six_digits: bool | None = None

    @property
    def lower(self) -> str:
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    @property
    def six_digits(self) -> bool:
        if self._six_digits is None:
            self._six_digits = self.digits >= 6 and rules._SIX_DIGITS.search(self.text) is not None
        return self._six_digits


def scrub_many(texts: list[str]) -> list[str]:
    """``[scrub(text) for text in texts]``, computed a rule at a time over the whole batch."""
    out = list(texts)
    if not out:
        return out
    try:
        column: pa.Array | None = pa.array(out, pa.string())
    except (pa.ArrowException, UnicodeError):  # e.g. a lone surrogate: not UTF-8, text by text then
        return [rules.scrub(text) for text in out]
    # Only the texts some gate lets through can change: work on those (``live``: their indexes in ``out``).
    live = pc.indices_nonzero(pc.match_substring_regex(column, _ANY_GATE)).to_pylist()
    if not live:
        return out
    current = [out[i] for i in live]
    column = pa.array(current, pa.string())
    # Facts are taken from the original texts, before any replacement, as scrub takes them.
    digits = pc.count_substring_regex(column, "[0-9]").to_pylist()
    long_runs = pc.match_substring_regex(column, rules._LONG_RUN.pattern).to_pylist()
    facts: list[_Facts | None] = [None] * len(current)
    for index, (pattern, replace, applies) in enumerate(rules._RULES):
        if column is None:  # the texts as they are now, after the rules before this one
            column = pa.array(current, pa.string())
        for j in pc.indices_nonzero(pc.match_substring_regex(column, _GATES[index])).to_pylist():
            fact = facts[j]
            if fact is None:
                fact = facts[j] = _Facts(texts[live[j]], digits[j], long_runs[j])
            if applies(fact):
                text = current[j]
                changed = pattern.sub(replace, text)
                if changed != text:
                    current[j] = changed
                    column = None
    for j, i in enumerate(live):
        out[i] = current[j]
    return out
