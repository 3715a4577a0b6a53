"""Texts for the scrubber's tests and benchmarks: typical text, an adversarial corpus, and the rules as they were.

- ``ADVERSARIAL``: for every rule of loragate.common.scrub, inputs built to make a backtracking engine work
  hard on it (long runs of whitespace, digits, separators, near-misses of each pattern), each a unit repeated
  to any size, with or without non-ASCII characters (which send a text off the native path).
- ``typical_text``: personal data among ordinary support-thread prose, the cost per KB to compare with.
- ``old_scrub``: the rules as they were before they were made linear (same replacements and conditions, the
  old patterns): the output to keep on ordinary text.
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

from loragate.common import scrub as rules


class Adversarial(NamedTuple):
    rules: tuple[int, ...]  # the indexes (in scrub._RULES) of the rules it is built against
    head: str
    unit: str  # repeated to the size asked
    tail: str = ""


ADVERSARIAL: dict[str, Adversarial] = {
    # the keyword rules: a keyword, then a long run of whitespace, then a near-miss
    "bearer_spaces": Adversarial((0,), "Authorization: bearer", " ", "short"),
    "bearer_repeated": Adversarial((0,), "", "bearer basic\t"),
    "password_spaces": Adversarial((1,), "password", " ", "x"),
    "password_equals_spaces": Adversarial((1,), 'api_key"=', " ", "x"),
    "password_repeated": Adversarial((1,), "", "pwd: x "),
    "passport_spaces": Adversarial((15,), "passport", " ", "x1"),  # the reported case
    "passport_number_spaces": Adversarial((15,), "passport number", " ", "x1"),
    "passport_is_spaces": Adversarial((15,), "passport no. is", " ", "#x1"),
    "tin_mixed_spaces": Adversarial((15,), "tin", "\t\n \x1c", "x1"),
    "passport_nbsp": Adversarial((15,), "passport", "\u00a0", "x1"),  # non-ASCII whitespace
    "passport_letters": Adversarial((15,), "passport ", "A", "."),
    "passport_digit_groups": Adversarial((15,), "passport 1234", " 1/2"),
    "id_words": Adversarial((15,), "", "passport tin ssn 1 "),
    # secrets
    "sk_repeated": Adversarial((2,), "", "sk-"),
    "sk_near": Adversarial((2,), "", "sk-abcdefghij "),
    "akia_near": Adversarial((3,), "", "AKIAABCDEFGHIJKLMNO "),
    "ghp_run": Adversarial((4,), "ghp_", "a", "_"),
    "xox_near": Adversarial((5,), "", "xoxb-abcdefghi "),
    "aiza_near": Adversarial((6,), "", "AIza" + "b" * 34 + " "),
    "jwt_dashes": Adversarial((7,), "", "eyJ-"),
    "jwt_two_parts": Adversarial((7,), "eyJ", "a", ".eyJaaaaaaaa.aa"),
    # e-mail
    "email_local_run": Adversarial((8,), "", "a", "@"),
    "email_dotted_run": Adversarial((8,), "", "a.", "@"),
    "email_domain_run": Adversarial((8,), "x@", "a.", "1"),
    "email_ats": Adversarial((8,), "", "a@b."),
    "email_after_email": Adversarial((8,), "", "a@b.cc1"),
    # opaque runs
    "hex_run": Adversarial((9,), "", "0", "g"),
    "hex_near": Adversarial((9, 10), "", "0123456789abcdef0123456789abcde "),
    "base64_run": Adversarial((10,), "", "aB1/", "!"),
    # checksummed numbers
    "iban_run": Adversarial((11,), "", "GB82" + "ABCD" * 9 + " "),
    "iban_spaced": Adversarial((11,), "", "GB82 ABCD ABCD ABCD ABCD ABCD ABCD ABCD ABCD1 "),
    "digits": Adversarial((12, 13, 17, 18, 19, 20), "", "1"),
    "digits_spaced": Adversarial((12,), "", "1 "),
    "digits_dashed": Adversarial((12, 13), "", "1-"),
    "card_near": Adversarial((12,), "", "4111 1111 1111 111 "),
    "arabic_digits": Adversarial((12, 13, 20), "", "\u0661"),  # Python's \d: any Unicode decimal digit
    "arabic_digits_spaced": Adversarial((12,), "", "\u0661 "),
    # national ids
    "ssn_near": Adversarial((13,), "", "123-45-678 "),
    "ni_near": Adversarial((14,), "", "AB 12 34 56 E "),
    # network addresses
    "ipv6_colons": Adversarial((16,), "", "1:"),
    "colons": Adversarial((16,), "", ":"),
    "ipv6_zone": Adversarial((16,), "fe80::1%", "a", ":"),
    "ipv6_groups": Adversarial((16,), "", " 1:2:3:4:5:6:7:8:9"),
    "ipv6_short": Adversarial((16,), "", "ff\t::a"),  # a candidate every 6 characters, too short to be one
    "ipv6_invalid": Adversarial((16,), "", " 1:2:3:4"),  # a candidate every 8 characters, not an address
    "ipv4_dots": Adversarial((17,), "", "1."),
    "ipv4_near": Adversarial((17,), "", "1.2.3."),
    # phone numbers
    "intl_long": Adversarial((18,), "", " +1" + "1" * 40),
    "intl_zeros": Adversarial((18,), "", " 00" + "1" * 30),
    "intl_parens": Adversarial((18,), "", " +1 (1) (1) (1) (1) (1) (1) 1"),
    "intl_dashes": Adversarial((18,), "", " +11-1111-1111-1111-1111-1111-1111"),
    "na_near": Adversarial((19,), "", " (555) 123-456"),
    "national_near": Adversarial((20,), "", " 0" + "1" * 20),
    "national_spaced": Adversarial((20, 12), "", " 012 345 678 901 234"),
    # separators alone
    "dashes": Adversarial((), "", "-"),
    "dots": Adversarial((), "", "."),
    "slashes": Adversarial((), "", "/"),
    "python_only_spaces": Adversarial((), "", "\x1c"),
}


def adversarial_text(name: str, size: int, non_ascii: bool = False) -> str:
    """``ADVERSARIAL[name]`` repeated to about ``size`` characters; ``non_ascii`` appends " é" (off the native path)."""
    case = ADVERSARIAL[name]
    count = max(1, (size - len(case.head) - len(case.tail)) // len(case.unit))
    text = case.head + case.unit * count + case.tail
    return text + " \u00e9" if non_ascii else text


_FILLER = [
    "Thanks for getting back to me so quickly.",
    "We upgraded to version 3.11.7 on 2024-01-15 at 12:30.",
    "The dashboard shows 1,234 requests per minute and a p99 of 250 ms.",
    "Ticket {n} was reopened twice.",
    "I tried clearing the cache and restarting the service, as the docs suggest.",
    "Our plan is the Team tier, 25 seats, billed yearly.",
    "Error code E-4021 appears in the logs (see below).",
    "The export finished, but rows 100-250 are missing from the CSV file.",
    "Can you escalate this, please?",
    "It worked fine until last Tuesday; nothing changed on our side.",
    "Regards, the operations team",
]
_DETAILS = [
    "You can reach me at sam.lee{n}@example.org.",
    "My direct line is +1 415 555 {n:04d}.",
    "Card on file ends 4242, the invoice id is INV-{n}.",
    "Server 10.0.{a}.{b} returned 502.",
    "My passport number is X{n}7654.",
    "The key was sk-live-{n}abcdefghijklmnopq, now revoked.",
]


def typical_text(size: int, seed: int = 7) -> str:
    """A pasted support thread of about ``size`` characters: ordinary prose, numbers, dates and versions, with a
    few personal details and secrets (about one sentence in 15)."""
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < size:
        pool = _DETAILS if rng.random() < 0.07 else _FILLER
        part = rng.choice(pool).format(n=rng.randint(1000, 9999), a=rng.randint(0, 255), b=rng.randint(0, 255))
        parts.append(part)
        length += len(part) + 1
    return " ".join(parts)


# The rules' patterns before they were made linear (possessive quantifiers, guards; loragate.common.scrub).
_OLD_PATTERNS = [
    r"(?P<prefix>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{16,}",
    (
        r"(?P<prefix>\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|token|auth)[\"']?\s*[:=]\s*[\"']?)"
        r"[^\s\"',;]{6,}"
    ),
    r"\b(?:sk|lg)-[A-Za-z0-9_-]{16,}",
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    r"\bAIza[0-9A-Za-z_-]{35}\b",
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}(?![A-Za-z0-9])",
    r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{40,}={0,2}",
    r"[A-Z](?<!\w[A-Z])[A-Z]\d{2}(?:\s?[A-Z0-9]{4}){2,7}(?:\s?[A-Z0-9]{1,4})?\b",
    r"\d(?<![\d-]\d)(?:[ -]?\d){12,18}(?![\d-])",
    r"\d(?<![\d-]\d)\d\d(?<!000|666)(?<!9\d\d)([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])",
    r"[A-CEGHJ-PR-TW-Z](?<!\w[A-Z])[A-CEGHJ-NPR-TW-Z](?<!BG|GB|NK|KN|TN|NT|ZZ)\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b",
    (
        r"(?P<prefix>\b(?:passport|national[\s_-]?id(?:entity)?|id[\s_-]?card|identity[\s_-]?card|tax[\s_-]?id|tin|"
        r"ssn|sin|nino|dni|nie|nif|cpf|aadhaar|pesel|bsn|personnummer|steuer-?id)(?:\s*(?:number|no\.?|num|#))?\s*"
        r"(?:is\s+)?[:#]?\s*)(?=[A-Z]*\d)[A-Z0-9][A-Z0-9./-]{3,}(?:\s\d[\d./-]{2,})*"
    ),
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?:%\w+)?(?![\w:])",
    r"\d(?<![\d.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\d|\.\d)",
    r"(?:\+(?<![\w+]\+)|00(?<![\w+]00))\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){1,5}[\s.-]?\d{2,4}(?!\d)",
    r"(?:\((?<![\w)]\()\d{3}\)\s?|\d(?<![\w)]\d)\d\d[\s.-])\d{3}[\s.-]\d{4}(?!\d)",
    r"0(?<!\w0)\d{2,4}[\s-]?\d{3,4}[\s-]?\d{3,4}(?!\d)",
]
_OLD_SUBS = [
    (re.compile(old, rule.pattern.flags & re.IGNORECASE), rules._sub_argument(rule.replacement), rule.need.holds)
    for old, rule in zip(_OLD_PATTERNS, rules._RULES, strict=True)
]
# The JWT rule keeps the run before its "eyJ" as a prefix now; it replaced from the "eyJ" on before.
_OLD_SUBS[7] = (_OLD_SUBS[7][0], rules.SECRET, _OLD_SUBS[7][2])


def old_scrub(text: str) -> str:
    """What scrub gave before its rules were made linear (quadratic or worse on adversarial text: keep it short)."""
    facts = rules._Facts(text)
    for pattern, replacement, holds in _OLD_SUBS:
        if holds(facts):
            text = pattern.sub(replacement, text)
    return text
