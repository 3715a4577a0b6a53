"""Replace personal data and secrets in free text with typed placeholders, e.g. ``[EMAIL]``.

Runs on the request-log writer, never on the request path. The rules lean
towards scrubbing too much: a version string that looks like an IPv4 address
is lost, a leaked card number is not. Patterns start with a character class rather than a
lookbehind (the lookbehind follows the first character), so that the regex engine
skips ahead to candidate characters instead of trying every position. Order matters: secrets and e-mail
addresses go first (they contain digit runs the later rules would half-match),
then the checksummed numbers (IBAN, card), then the national ids, addresses and
phone numbers.

What is caught:

- ``[SECRET]``: API keys and tokens: OpenAI/Anthropic style ``sk-...``, loragate's ``lg-...``, AWS
  access key ids (``AKIA``/``ASIA``), GitHub (``ghp_`` ...), Slack (``xox.-``),
  Google (``AIza``), JWTs, ``Bearer <token>``, ``password=``/``api_key:``-style
  assignments, and long hex (32+) or mixed-case base64 (40+) runs.
- ``[EMAIL]``.
- ``[IBAN]``: bank account numbers (ISO 13616, mod-97 checked).
- ``[CARD]``: 13-19 digit card numbers, spaces or dashes allowed, Luhn checked
  (a run that fails Luhn is left to the other rules).
- ``[NATIONAL_ID]``: US SSN (``123-45-6789``, ranges the SSA never issues
  excluded), UK National Insurance numbers (``AB 12 34 56 C``), and any id
  introduced by a keyword (``passport``, ``national id``, ``tax id``, ``SSN``,
  ``DNI``, ``NIE``, ``Aadhaar`` ...): country formats are too many to list,
  but people introduce them.
- ``[IP]``: IPv4 and IPv6 addresses (IPv6 candidates validated with ``ipaddress``).
- ``[PHONE]``: international numbers (``+`` or ``00`` prefix, 8-15 digits),
  North American ``(555) 123-4567`` / ``555-123-4567``, and trunk-prefixed
  national numbers (``020 7946 0958``, ``0151 234 5678``).

Every rule runs in time linear in the text's length, whatever the text (a client sends it): no rule
gives back what an unbounded run took where giving back could never make it match (possessive
quantifiers, ``\\s*+``), and where every start inside a run would read the run to its end for the same
outcome as the run's first start, a guard lets only that one start (the e-mail rule's lookbehind, waived
where a search starts; the JWT rule's run read up to its first ``eyJ``). tests/unit/test_scrub.py runs an
adversarial corpus for every rule (tests/scrub_corpus.py) on every path; bench/scrub_worst.py measures it.

Where the package was built with a C compiler and PCRE2 (setup.py), ASCII texts go through the same
rules compiled by PCRE2 (``_scrubnative.c``, about 10x fewer instructions), with the replacement
functions written in C too; other texts, and whatever that path cannot decide, through
Python's re. Both give the same output (tests/unit/test_scrub.py compares them, fuzzes one against the
other, and runs the C under AddressSanitizer and UBSan).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from loragate.common._scrubnative import Scrubber

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
CARD = "[CARD]"
IBAN = "[IBAN]"
NATIONAL_ID = "[NATIONAL_ID]"
IP = "[IP]"
SECRET = "[SECRET]"

_NON_DIGIT = re.compile(r"\D")
_SPACE = re.compile(r"\s")
_LONG_RUN = re.compile(r"[A-Za-z0-9+/_-]{32}")
# Two letters, then six digits in pairs: the shape the UK NI rule needs (its letter classes, case-folded, are
# within these; no replacement puts a letter before digits, as every placeholder ends with "]").
_NI_SHAPE = re.compile(r"[A-Za-z][A-Za-z]\s?\d\d\s?\d\d\s?\d\d", re.IGNORECASE)
# A superset of the national-id keywords below: a cheap test before the costly pattern (the native scrubber
# looks for the words, and for id cards as written here, in C).
_ID_WORDS = (
    "passport",
    "national",
    "identity",
    "tax",
    "tin",
    "ssn",
    "sin",
    "nino",
    "dni",
    "nie",
    "nif",
    "cpf",
    "aadhaar",
    "pesel",
    "bsn",
    "personnummer",
    "steuer",
)
_ID_KEYWORDS = re.compile("|".join(_ID_WORDS) + r"|id[\s_-]?card")


class _Facts:
    """Cheap facts about a text: each rule runs only when its necessary condition holds.

    Taken once, before any replacement; replacements only remove digits, dots and
    colons, so a rule skipped on these facts could not have matched.
    """

    __slots__ = ("text", "lower", "digits", "long_run", "ni_shape")

    def __init__(self, text: str) -> None:
        self.text = text
        self.lower = text.lower()
        self.digits = ascii_digits(text)
        self.long_run = _LONG_RUN.search(text) is not None
        self.ni_shape = self.digits >= 6 and _NI_SHAPE.search(text) is not None


def ascii_digits(text: str) -> int:
    """How many of 0-9 ``text`` holds, in one C pass over its UTF-8 (no byte of a multi-byte character is ASCII)."""
    data = text.encode("utf-8", "surrogatepass")
    return len(data) - len(data.translate(None, b"0123456789"))


def _digit_count(text: str) -> int:
    """How many characters of ``text`` Python's ``\\d`` matches (any Unicode decimal digit)."""
    return ascii_digits(text) if text.isascii() else len(_NON_DIGIT.sub("", text))


class Facts(Protocol):
    """What a rule's condition may ask of a text (_Facts here; the batch scrubber has its own, lazy)."""

    @property
    def text(self) -> str: ...
    @property
    def lower(self) -> str: ...
    @property
    def digits(self) -> int: ...
    @property
    def long_run(self) -> bool: ...
    @property
    def ni_shape(self) -> bool: ...


class Need(NamedTuple):
    """A rule's necessary condition, on facts of the original text: the rule runs only where all of it holds.

    Data rather than code, so that the native scrubber (_scrubnative.c) tests the same condition.
    """

    digits: int = 0  # at least this many ASCII digits
    # One of these holds (no condition when all three are empty): a substring of the text, a substring
    # of the lowercased text, a character occurring at least so many times.
    any_of: tuple[str, ...] = ()
    any_of_lower: tuple[str, ...] = ()
    repeated: tuple[str, int] | None = None
    long_run: bool = False  # _LONG_RUN occurs
    ni_shape: bool = False  # _NI_SHAPE occurs (and 6 ASCII digits)
    id_keyword: bool = False  # _ID_KEYWORDS occurs in the lowercased text

    def holds(self, facts: Facts) -> bool:
        if self.digits and facts.digits < self.digits:
            return False
        if (self.any_of or self.any_of_lower or self.repeated) and not (
            any(part in facts.text for part in self.any_of)
            or any(part in facts.lower for part in self.any_of_lower)
            or (self.repeated is not None and facts.text.count(self.repeated[0]) >= self.repeated[1])
        ):
            return False
        return (
            (not self.long_run or facts.long_run)
            and (not self.ni_shape or facts.ni_shape)
            and (not self.id_keyword or _ID_KEYWORDS.search(facts.lower) is not None)
        )


class KeepPrefix(NamedTuple):
    """Replace a match by its group ``prefix`` and the placeholder: ``Bearer abc`` -> ``Bearer [SECRET]``."""

    placeholder: str


# How a rule replaces a match: a placeholder, KeepPrefix, or a function of the matched text.
Replacement = str | KeepPrefix | Callable[[str], str]


class Rule(NamedTuple):
    pattern: re.Pattern[str]
    replacement: Replacement
    need: Need
    # The pattern without its leading guard (a lookbehind that skips the starts inside a run, where the match
    # could only be the one already tried at the run's start): tried alone where each search starts, as
    # PCRE2's \G does in ``(?:\G|guard)``. None: the pattern has no such guard.
    unguarded: re.Pattern[str] | None = None


def _rule(pattern: str, replacement: Replacement, need: Need, flags: int = 0, guard: str = "") -> Rule:
    """A rule; ``guard`` (a lookbehind) is put before ``pattern`` and waived where a search starts."""
    return Rule(re.compile(guard + pattern, flags), replacement, need, re.compile(pattern, flags) if guard else None)


def _sub_argument(replacement: Replacement) -> str | Callable[[re.Match[str]], str]:
    """What re.sub takes for ``replacement``: a template for the fixed ones (no backslash in a placeholder)."""
    if isinstance(replacement, KeepPrefix):
        assert "\\" not in replacement.placeholder
        return r"\g<prefix>" + replacement.placeholder
    if isinstance(replacement, str):
        assert "\\" not in replacement
        return replacement
    return lambda match: replacement(match.group())


def _card(text: str) -> str:
    """The longest Luhn-valid card number (13-19 digits) at the start of the run; what follows it is kept."""
    digits = [int(char) for char in _NON_DIGIT.sub("", text)[:19]]
    # The Luhn sums of every prefix, in one pass: a digit is doubled where an odd number of digits follow it in
    # the prefix, so at the odd indexes of a prefix of odd length and at the even ones of a prefix of even length.
    even_doubled, odd_doubled = [0], [0]
    for index, value in enumerate(digits):
        twice = value * 2 - 9 if value > 4 else value * 2
        even_doubled.append(even_doubled[-1] + (value if index % 2 else twice))
        odd_doubled.append(odd_doubled[-1] + (twice if index % 2 else value))
    for length in range(len(digits), 12, -1):
        if (odd_doubled if length % 2 else even_doubled)[length] % 10 == 0:
            end = [i for i, char in enumerate(text) if char.isdigit()][length - 1] + 1
            return CARD + text[end:]
    return text


def _iban(text: str) -> str:
    compact = _SPACE.sub("", text).upper()
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return IBAN if int(number) % 97 == 1 else text


def _ipv6(candidate: str) -> str:
    if candidate.count(":") < 3 and not re.search(r"[0-9A-Fa-f]{3}", candidate):
        return candidate  # "1::2" is a valid address but far more often a slice or a ratio
    address = candidate.split("%", 1)[0]
    if ":::" in address or address.count("::") > 1:
        return candidate  # two empty groups: never an address (ipaddress would say so, at the cost of an exception)
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return candidate
    return IP


def _ipv4(address: str) -> str:
    return IP if all(int(part) <= 255 for part in address.split(".")) else address


def _international_phone(number: str) -> str:
    digits = _digit_count(number) - (2 if number.startswith("00") else 0)  # "00": the prefix, not the number
    return PHONE if 8 <= digits <= 15 else number


def _national_phone(number: str) -> str:
    return PHONE if 10 <= _digit_count(number) <= 11 else number


def _base64_secret(text: str) -> str:
    mixed = any(c.isdigit() for c in text) and any(c.isupper() for c in text) and any(c.islower() for c in text)
    return SECRET if mixed else text


_RULES: list[Rule] = [
    # --- secrets ---
    Rule(
        re.compile(r"(?P<prefix>\b(?:bearer|basic)\s++)[A-Za-z0-9._~+/=-]{16,}", re.IGNORECASE),
        KeepPrefix(SECRET),
        Need(any_of_lower=("bearer", "basic")),
    ),
    Rule(
        re.compile(
            r"(?P<prefix>\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|token|auth)"
            r"[\"']?\s*+[:=]\s*+[\"']?)[^\s\"',;]{6,}",
            re.IGNORECASE,
        ),
        KeepPrefix(SECRET),
        Need(any_of_lower=("pass", "pwd", "secret", "key", "token", "auth")),
    ),
    Rule(
        re.compile(r"\b(?:sk|lg)-[A-Za-z0-9_-]{16,}"), SECRET, Need(any_of=("sk-", "lg-"))
    ),  # lg-: loragate's own keys
    Rule(
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b"),
        SECRET,
        Need(any_of=("AKIA", "ASIA", "AGPA", "AIDA", "AROA")),
    ),
    Rule(re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}+\b"), SECRET, Need(any_of=("ghp_", "gho_", "ghu_", "ghs_", "ghr_"))),
    Rule(re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), SECRET, Need(any_of=("xox",))),
    Rule(re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), SECRET, Need(any_of=("AIza",))),
    # From the start of a run of its characters to the run's first "eyJ" (a later one in the run could only
    # fail where the first did), kept: each run is read once, not once for every "eyJ" in it.
    Rule(
        re.compile(
            r"(?<![A-Za-z0-9_-])(?P<prefix>(?:(?!\beyJ)[A-Za-z0-9_-])*+)"
            r"\beyJ[A-Za-z0-9_-]{8,}+\.eyJ[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}"
        ),
        KeepPrefix(SECRET),
        Need(any_of=("eyJ",)),
    ),
    # --- e-mail before the digit rules: local parts hold digits ---
    # (Each start inside a run of the local part's characters would find the same "@" as the run's start: the
    # guard skips them, except where a search starts, which may be inside a run.)
    _rule(
        r"[A-Za-z0-9._%+-]++@[A-Za-z0-9-]++(?:\.[A-Za-z0-9-]++)*\.[A-Za-z]{2,}",
        EMAIL,
        Need(any_of=("@",)),
        guard=r"(?<![A-Za-z0-9._%+-])",
    ),
    # --- long opaque runs: hex digests and keys, base64 blobs ---
    Rule(re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}+(?![A-Za-z0-9])"), SECRET, Need(long_run=True)),
    Rule(re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{40,}={0,2}"), _base64_secret, Need(long_run=True)),
    # --- checksummed numbers ---
    Rule(
        re.compile(r"[A-Z](?<!\w[A-Z])[A-Z]\d{2}(?:\s?[A-Z0-9]{4}){2,7}(?:\s?[A-Z0-9]{1,4}+)?\b"), _iban, Need(digits=2)
    ),
    Rule(re.compile(r"\d(?<![\d-]\d)(?:[ -]?\d){12,18}(?![\d-])"), _card, Need(digits=13)),
    # --- national ids ---
    Rule(
        re.compile(r"\d(?<![\d-]\d)\d\d(?<!000|666)(?<!9\d\d)([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])"),
        NATIONAL_ID,
        Need(digits=9),
    ),
    Rule(
        re.compile(
            r"[A-CEGHJ-PR-TW-Z](?<!\w[A-Z])[A-CEGHJ-NPR-TW-Z](?<!BG|GB|NK|KN|TN|NT|ZZ)"
            r"\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b",
            re.IGNORECASE,
        ),
        NATIONAL_ID,
        Need(ni_shape=True),
    ),
    Rule(
        re.compile(
            r"(?P<prefix>\b(?:passport|national[\s_-]?id(?:entity)?|id[\s_-]?card|identity[\s_-]?card|"
            r"tax[\s_-]?id|tin|ssn|sin|nino|dni|nie|nif|cpf|aadhaar|pesel|bsn|personnummer|steuer-?id)"
            r"(?:\s*+(?:number|no\.?|num|#))?\s*+(?:is\s++)?[:#]?\s*+)(?=[A-Z]*+\d)[A-Z0-9][A-Z0-9./-]{3,}+"
            r"(?:\s\d[\d./-]{2,}+)*+",
            re.IGNORECASE,
        ),
        KeepPrefix(NATIONAL_ID),
        Need(digits=1, id_keyword=True),
    ),
    # --- network addresses ---
    Rule(
        re.compile(
            r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?:%\w++)?"
            r"(?![\w:])"
        ),
        _ipv6,
        Need(any_of=("::",), repeated=(":", 7)),
    ),
    Rule(
        re.compile(r"\d(?<![\d.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\d|\.\d)"),
        _ipv4,
        Need(digits=4, repeated=(".", 3)),
    ),
    # --- phone numbers ---
    Rule(
        re.compile(r"(?:\+(?<![\w+]\+)|00(?<![\w+]00))\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){1,5}[\s.-]?\d{2,4}(?!\d)"),
        _international_phone,
        Need(digits=8, any_of=("+", "00")),
    ),
    Rule(
        re.compile(r"(?:\((?<![\w)]\()\d{3}\)\s?|\d(?<![\w)]\d)\d\d[\s.-])\d{3}[\s.-]\d{4}(?!\d)"),
        PHONE,
        Need(digits=10),
    ),
    Rule(re.compile(r"0(?<!\w0)\d{2,4}[\s-]?\d{3,4}[\s-]?\d{3,4}(?!\d)"), _national_phone, Need(digits=10)),
]


def substitution(rule: Rule) -> Callable[[str], str]:
    """``re.sub`` of ``rule`` as a function of the text: its pattern's own, or, for a guarded rule, a loop that
    tries the unguarded pattern where each search starts (after the previous match) and the guarded one after."""
    argument = _sub_argument(rule.replacement)
    if rule.unguarded is None:
        return functools.partial(rule.pattern.sub, argument)
    guarded, unguarded = rule.pattern, rule.unguarded
    if callable(argument):
        replace = argument
    else:
        template = argument
        replace = lambda match: match.expand(template)  # noqa: E731

    def sub(text: str) -> str:
        parts: list[str] = []
        last = 0
        while last <= len(text):
            match = unguarded.match(text, last) or guarded.search(text, last + 1)
            if match is None:
                break
            assert match.end() > last, "a rule never matches the empty string"
            parts += (text[last : match.start()], replace(match))
            last = match.end()
        return "".join(parts) + text[last:] if parts else text

    return sub


# Each rule's substitution and condition, made once.
_SUBS = [(substitution(rule), rule.need.holds) for rule in _RULES]


def _python_scrub(text: str) -> str:
    facts = _Facts(text)
    for sub, holds in _SUBS:
        if holds(facts):
            text = sub(text)
    return text


def scrub(text: str) -> str:
    """``text`` with every match of the rules above replaced by its placeholder."""
    if _NATIVE is not None:  # the same rules in C (the end of this module), for ASCII texts
        scrubbed = _NATIVE.scrub(text)
        if scrubbed is not None:
            return scrubbed
    return _python_scrub(text)


# --- the native scrubber ----------------------------------------------------------------------------------

_PY_SPACE = r"\t-\r\x1c-\x20"  # Python's \s on ASCII (str.isspace): PCRE2's \s lacks \x1c-\x1f


def pcre2_pattern(pattern: str) -> str:
    """``pattern`` (Python re syntax) as PCRE2 reads it with Python's meaning on ASCII text: ``\\s`` spelt out.

    The only other escapes the rules use (\\d, \\w, \\b, \\1, \\(, \\., ...) mean the same in both on ASCII.
    """
    out, in_class, i = [], False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            escape = pattern[i + 1]
            if escape in "SDWBAZ":
                raise ValueError(f"no PCRE2 translation for \\{escape} in {pattern!r}")
            out.append(
                _PY_SPACE if escape == "s" and in_class else f"[{_PY_SPACE}]" if escape == "s" else pattern[i : i + 2]
            )
            i += 2
            continue
        if char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


def pcre2_rule_pattern(rule: Rule) -> str:
    """``rule``'s pattern as PCRE2 reads it with Python's meaning on ASCII text, its guard waived where a search
    starts (``\\G``)."""
    pattern = rule.pattern.pattern
    if rule.unguarded is not None:
        body = rule.unguarded.pattern
        pattern = f"(?:\\G|{pattern[: len(pattern) - len(body)]}){body}"
    return pcre2_pattern(pattern)


def _native_rule(native: ModuleType, rule: Rule) -> tuple:
    """The tuple _scrubnative.Scrubber takes for ``rule``."""
    replacement, need = rule.replacement, rule.need
    kind, placeholder, prefix_group, call = native.CALL, "", 0, replacement
    if isinstance(replacement, KeepPrefix):
        kind, placeholder, prefix_group = native.PREFIX, replacement.placeholder, rule.pattern.groupindex["prefix"]
    elif isinstance(replacement, str):
        kind, placeholder = native.CONST, replacement
    elif replacement is _international_phone:  # every replacement function is written in C as well
        kind, placeholder = native.INTL_PHONE, PHONE
    elif replacement is _national_phone:
        kind, placeholder = native.NAT_PHONE, PHONE
    elif replacement is _ipv4:
        kind, placeholder = native.IPV4, IP
    elif replacement is _card:
        kind, placeholder = native.CARD, CARD
    elif replacement is _iban:
        kind, placeholder = native.IBAN, IBAN
    elif replacement is _base64_secret:
        kind, placeholder = native.BASE64, SECRET
    elif replacement is _ipv6:
        kind, placeholder = native.IPV6, IP
    count_char, count_min = need.repeated or ("", 0)
    return (
        pcre2_rule_pattern(rule),
        bool(rule.pattern.flags & re.IGNORECASE),
        kind,
        placeholder,
        prefix_group,
        call,
        need.digits,
        need.any_of,
        need.any_of_lower,
        count_char,
        count_min,
        need.long_run,
        need.ni_shape,
        need.id_keyword,
    )


def _native_scrubber() -> Scrubber | None:
    """The rules compiled, where the package was built with them (a C compiler and PCRE2's headers: setup.py)."""
    try:
        from loragate.common import _scrubnative
    except ImportError:  # the Python rules do all the work then
        return None
    return _scrubnative.Scrubber(
        tuple(_native_rule(_scrubnative, rule) for rule in _RULES), _ID_WORDS
    )  # _NI_SHAPE and _ID_KEYWORDS are written in C


_NATIVE = _native_scrubber()


def native_scrubber() -> Scrubber | None:
    """The rules compiled for ASCII texts (its ``scrub`` returns None where Python must decide), if built."""
    return _NATIVE
