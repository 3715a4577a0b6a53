"""Replace personal data and secrets in free text with typed placeholders, e.g. ``[EMAIL]``.

Runs on the request-log writer, never on the request path. The rules lean
towards scrubbing too much: a version string that looks like an IPv4 address
is lost, a leaked card number is not. Order matters: secrets and e-mail
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

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
CARD = "[CARD]"
IBAN = "[IBAN]"
NATIONAL_ID = "[NATIONAL_ID]"
IP = "[IP]"
SECRET = "[SECRET]"

_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


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
    digits = re.sub(r"\D", "", text)
    for length in range(min(len(digits), 19), 12, -1):
        if _luhn_ok(digits[:length]):
            end = [i for i, char in enumerate(text) if char.isdigit()][length - 1] + 1
            return CARD + text[end:]
    return text


def _iban(match: re.Match[str]) -> str:
    compact = re.sub(r"\s", "", match.group()).upper()
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


def _international_phone(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    if match.group().startswith("00"):
        digits = digits[2:]
    return PHONE if 8 <= len(digits) <= 15 else match.group()


def _national_phone(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return PHONE if 10 <= len(digits) <= 11 else match.group()


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
    (re.compile(r"(?P<prefix>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{16,}", re.I), _keep_prefix(SECRET)),
    (re.compile(r"(?P<prefix>\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|token|auth)"
                r"[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]{6,}", re.I), _keep_prefix(SECRET)),
    (re.compile(r"\b(?:sk|lg)-[A-Za-z0-9_-]{16,}"), _always(SECRET)),  # lg-: loragate's own keys
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b"), _always(SECRET)),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), _always(SECRET)),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), _always(SECRET)),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), _always(SECRET)),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), _always(SECRET)),
    # --- e-mail before the digit rules: local parts hold digits ---
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), _always(EMAIL)),
    # --- long opaque runs: hex digests and keys, base64 blobs ---
    (re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}(?![A-Za-z0-9])"), _always(SECRET)),
    (re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{40,}={0,2}"), _base64_secret),
    # --- checksummed numbers ---
    (re.compile(r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]{4}){2,7}(?:\s?[A-Z0-9]{1,4})?\b"), _iban),
    (re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _card),
    # --- national ids ---
    (re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])"), _always(NATIONAL_ID)),
    (re.compile(r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b",
                re.I), _always(NATIONAL_ID)),
    (re.compile(r"(?P<prefix>\b(?:passport|national[\s_-]?id(?:entity)?|id[\s_-]?card|identity[\s_-]?card|"
                r"tax[\s_-]?id|tin|ssn|sin|nino|dni|nie|nif|cpf|aadhaar|pesel|bsn|personnummer|steuer-?id)"
                r"(?:\s*(?:number|no\.?|num|#))?\s*(?:is\s+)?[:#]?\s*)(?=[A-Z]*\d)[A-Z0-9][A-Z0-9./-]{3,}(?:\s\d[\d./-]{2,})*",
                re.I),
     _keep_prefix(NATIONAL_ID)),
    # --- network addresses ---
    (re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?:%\w+)?"
                r"(?![\w:])"), _ipv6),
    (re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                r"(?!\d|\.\d)"), _always(IP)),
    # --- phone numbers ---
    (re.compile(r"(?<![\w+])(?:\+|00)\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){1,5}[\s.-]?\d{2,4}(?!\d)"), _international_phone),
    (re.compile(r"(?<![\w)])(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\d)"), _always(PHONE)),
    (re.compile(r"(?<![\w])0\d{2,4}[\s-]?\d{3,4}[\s-]?\d{3,4}(?!\d)"), _national_phone),
]


def scrub(text: str) -> str:
    """``text`` with every match of the rules above replaced by its placeholder."""
    for pattern, replace in _RULES:
        text = pattern.sub(replace, text)
    return text
