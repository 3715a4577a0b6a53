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
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Protocol

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
_SIX_DIGITS = re.compile(r"\d\d\s?\d\d\s?\d\d")
# A superset of the national-id keywords below: a cheap test before the costly pattern.
_ID_KEYWORDS = re.compile(r"passport|national|identity|id[\s_-]?card|tax|tin|ssn|sin|nino|dni|nie|nif|cpf|"
                          r"aadhaar|pesel|bsn|personnummer|steuer")


class _Facts:
    """Cheap facts about a text: each rule runs only when its necessary condition holds.

    Taken once, before any replacement; replacements only remove digits, dots and
    colons, so a rule skipped on these facts could not have matched.
    """

    __slots__ = ("text", "lower", "digits", "long_run", "six_digits")

    def __init__(self, text: str) -> None:
        self.text = text
        self.lower = text.lower()
        self.digits = ascii_digits(text)
        self.long_run = _LONG_RUN.search(text) is not None
        self.six_digits = self.digits >= 6 and _SIX_DIGITS.search(text) is not None


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
    def six_digits(self) -> bool: ...


_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str], Callable[[Facts], bool]]


def _always(placeholder: str) -> Callable[[re.Match[str]], str]:
    return lambda _match: placeholder


def _luhn_ok(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    """The longest Luhn-valid card number at the start of the run; what follows it is kept."""
    text = match.group()
    digits = _NON_DIGIT.sub("", text)
    for length in range(min(len(digits), 19), 12, -1):
        if _luhn_ok(digits[:length]):
            end = [i for i, char in enumerate(text) if char.isdigit()][length - 1] + 1
            return CARD + text[end:]
    return text


def _iban(match: re.Match[str]) -> str:
    compact = _SPACE.sub("", match.group()).upper()
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return IBAN if int(number) % 97 == 1 else match.group()


def _ipv6(match: re.Match[str]) -> str:
    candidate = match.group()
    if candidate.count(":") < 3 and not re.search(r"[0-9A-Fa-f]{3}", candidate):
        return candidate  # "1::2" is a valid address but far more often a slice or a ratio
    try:
        ipaddress.IPv6Address(candidate.split("%", 1)[0])
    except ValueError:
        return candidate
    return IP


def _ipv4(match: re.Match[str]) -> str:
    return IP if all(int(part) <= 255 for part in match.group().split(".")) else match.group()


def _international_phone(match: re.Match[str]) -> str:
    number = match.group()
    digits = _digit_count(number) - (2 if number.startswith("00") else 0)  # "00": the prefix, not the number
    return PHONE if 8 <= digits <= 15 else number


def _national_phone(match: re.Match[str]) -> str:
    number = match.group()
    return PHONE if 10 <= _digit_count(number) <= 11 else number


def _base64_secret(match: re.Match[str]) -> str:
    text = match.group()
    mixed = (any(c.isdigit() for c in text) and any(c.isupper() for c in text)
             and any(c.islower() for c in text))
    return SECRET if mixed else text


def _keep_prefix(placeholder: str) -> Callable[[re.Match[str]], str]:
    """``Bearer abc`` -> ``Bearer [SECRET]``: the keyword stays, it helps reading the log."""
    return lambda match: match.group("prefix") + placeholder


_RULES: list[_Rule] = [
    # --- secrets ---
    (re.compile(r"(?P<prefix>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{16,}", re.I), _keep_prefix(SECRET),
     lambda t: "bearer" in t.lower or "basic" in t.lower),
    (re.compile(r"(?P<prefix>\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|token|auth)"
                r"[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]{6,}", re.I), _keep_prefix(SECRET),
     lambda t: any(k in t.lower for k in ("pass", "pwd", "secret", "key", "token", "auth"))),
    (re.compile(r"\b(?:sk|lg)-[A-Za-z0-9_-]{16,}"), _always(SECRET),
     lambda t: "sk-" in t.text or "lg-" in t.text),  # lg-: loragate's own keys
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b"), _always(SECRET),
     lambda t: any(k in t.text for k in ("AKIA", "ASIA", "AGPA", "AIDA", "AROA"))),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), _always(SECRET),
     lambda t: any(k in t.text for k in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"))),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), _always(SECRET),
     lambda t: "xox" in t.text),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), _always(SECRET),
     lambda t: "AIza" in t.text),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), _always(SECRET),
     lambda t: "eyJ" in t.text),
    # --- e-mail before the digit rules: local parts hold digits ---
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), _always(EMAIL),
     lambda t: "@" in t.text),
    # --- long opaque runs: hex digests and keys, base64 blobs ---
    (re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}(?![A-Za-z0-9])"), _always(SECRET),
     lambda t: t.long_run),
    (re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{40,}={0,2}"), _base64_secret,
     lambda t: t.long_run),
    # --- checksummed numbers ---
    (re.compile(r"[A-Z](?<!\w[A-Z])[A-Z]\d{2}(?:\s?[A-Z0-9]{4}){2,7}(?:\s?[A-Z0-9]{1,4})?\b"), _iban,
     lambda t: t.digits >= 2),
    (re.compile(r"\d(?<![\d-]\d)(?:[ -]?\d){12,18}(?![\d-])"), _card,
     lambda t: t.digits >= 13),
    # --- national ids ---
    (re.compile(r"\d(?<![\d-]\d)\d\d(?<!000|666)(?<!9\d\d)([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])"),
     _always(NATIONAL_ID),
     lambda t: t.digits >= 9),
    (re.compile(r"[A-CEGHJ-PR-TW-Z](?<!\w[A-Z])[A-CEGHJ-NPR-TW-Z](?<!BG|GB|NK|KN|TN|NT|ZZ)"
                r"\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b",
                re.I), _always(NATIONAL_ID),
     lambda t: t.six_digits),
    (re.compile(r"(?P<prefix>\b(?:passport|national[\s_-]?id(?:entity)?|id[\s_-]?card|identity[\s_-]?card|"
                r"tax[\s_-]?id|tin|ssn|sin|nino|dni|nie|nif|cpf|aadhaar|pesel|bsn|personnummer|steuer-?id)"
                r"(?:\s*(?:number|no\.?|num|#))?\s*(?:is\s+)?[:#]?\s*)(?=[A-Z]*\d)[A-Z0-9][A-Z0-9./-]{3,}(?:\s\d[\d./-]{2,})*",
                re.I),
     _keep_prefix(NATIONAL_ID),
     lambda t: t.digits >= 1 and _ID_KEYWORDS.search(t.lower) is not None),
    # --- network addresses ---
    (re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?:%\w+)?"
                r"(?![\w:])"), _ipv6,
     lambda t: "::" in t.text or t.text.count(":") >= 7),
    (re.compile(r"\d(?<![\d.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\d|\.\d)"), _ipv4,
     lambda t: t.digits >= 4 and t.text.count(".") >= 3),
    # --- phone numbers ---
    (re.compile(r"(?:\+(?<![\w+]\+)|00(?<![\w+]00))\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){1,5}[\s.-]?\d{2,4}(?!\d)"),
     _international_phone,
     lambda t: t.digits >= 8 and ("+" in t.text or "00" in t.text)),
    (re.compile(r"(?:\((?<![\w)]\()\d{3}\)\s?|\d(?<![\w)]\d)\d\d[\s.-])\d{3}[\s.-]\d{4}(?!\d)"), _always(PHONE),
     lambda t: t.digits >= 10),
    (re.compile(r"0(?<!\w0)\d{2,4}[\s-]?\d{3,4}[\s-]?\d{3,4}(?!\d)"), _national_phone,
     lambda t: t.digits >= 10),
]


def scrub(text: str) -> str:
    """``text`` with every match of the rules above replaced by its placeholder."""
    facts = _Facts(text)
    for pattern, replace, applies in _RULES:
        if applies(facts):
            text = pattern.sub(replace, text)
    return text
