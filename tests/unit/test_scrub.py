"""The scrubber: planted personal data and secrets become typed placeholders; ordinary text survives."""

from __future__ import annotations

import pytest

from loragate.common.scrub import scrub

PLANTED = [
    ("write to john.doe+list@example.co.uk today", "john.doe+list@example.co.uk", "[EMAIL]"),
    ("call +44 20 7946 0958", "+44 20 7946 0958", "[PHONE]"),
    ("call 0044 20 7946 0958", "0044 20 7946 0958", "[PHONE]"),
    ("call (555) 123-4567 now", "(555) 123-4567", "[PHONE]"),
    ("call 555.123.4567 now", "555.123.4567", "[PHONE]"),
    ("ring 020 7946 0958 or", "020 7946 0958", "[PHONE]"),
    ("mobile 07700 900123", "07700 900123", "[PHONE]"),
    ("card 4111 1111 1111 1111 exp", "4111 1111 1111 1111", "[CARD]"),
    ("card 5500-0055-5555-5559.", "5500-0055-5555-5559", "[CARD]"),
    ("amex 378282246310005", "378282246310005", "[CARD]"),
    ("card 4111111111111111 2025", "4111111111111111", "[CARD]"),
    ("ssn 123-45-6789 ok", "123-45-6789", "[NATIONAL_ID]"),
    ("NI AB 12 34 56 C ok", "AB 12 34 56 C", "[NATIONAL_ID]"),
    ("ni number ab123456c", "ab123456c", "[NATIONAL_ID]"),
    ("passport number: X1234567 thanks", "X1234567", "[NATIONAL_ID]"),
    ("my DNI is 12345678Z", "12345678Z", "[NATIONAL_ID]"),
    ("aadhaar 1234 5678 9012", "1234 5678 9012", "[NATIONAL_ID]"),
    ("iban GB82 WEST 1234 5698 7654 32 please", "GB82 WEST 1234 5698 7654 32", "[IBAN]"),
    ("iban DE89370400440532013000", "DE89370400440532013000", "[IBAN]"),
    ("from 192.168.1.10.", "192.168.1.10", "[IP]"),
    ("v6 2001:db8::8a2e:370:7334 x", "2001:db8::8a2e:370:7334", "[IP]"),
    ("link-local fe80::1%eth0", "fe80::1", "[IP]"),
    ("key sk-proj-abcdefghijklmnop1234567890", "sk-proj-abcdefghijklmnop1234567890", "[SECRET]"),
    ("key lg-Zx8_abcdefghijklmnopqrstu", "lg-Zx8_abcdefghijklmnopqrstu", "[SECRET]"),
    ("aws AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE", "[SECRET]"),
    ("Authorization: Bearer abcdef0123456789abcdef", "abcdef0123456789abcdef", "Bearer [SECRET]"),
    ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdefghijklmnopqrstuvwxyz0123456789", "[SECRET]"),
    ("slack xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij", "[SECRET]"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "eyJhbGciOiJIUzI1NiJ9", "[SECRET]"),
    ("md5 d41d8cd98f00b204e9800998ecf8427e", "d41d8cd98f00b204e9800998ecf8427e", "[SECRET]"),
    ("blob dGhpcyBpcyBhIHNlY3JldCB0b2tlbiB3aXRoIDEyMw==", "dGhpcyBpcyBhIHNlY3JldCB0b2tlbiB3aXRoIDEyMw", "[SECRET]"),
    ("password=hunter22 ok", "hunter22", "password=[SECRET]"),
    ('"api_key": "abc123def456"', "abc123def456", "[SECRET]"),
]


@pytest.mark.parametrize(("text", "secret", "placeholder"), PLANTED)
def test_planted_data_is_replaced(text, secret, placeholder):
    scrubbed = scrub(text)
    assert secret not in scrubbed
    assert placeholder in scrubbed


KEPT = [
    "In 2023-2024 we sold 1,234,567 units at 19.99 each.",
    "Python 3.11.7 on Debian; see RFC 7231 section 6.5.1.",
    "def f(a): return a[1:3] + a[::2]  # time 09:30, ratio 3:2",
    "The meeting is on 2024-01-15 at 12:30:45 in room 101.",
    "sin(x) + cos(y) and tin cans; the token was invalid",
    "Order #12345 shipped, 3 items, total 42.50 EUR.",
    "A long word: antidisestablishmentarianism.",
]


@pytest.mark.parametrize("text", KEPT)
def test_ordinary_text_is_kept(text):
    assert scrub(text) == text


def test_card_numbers_need_a_valid_luhn_checksum():
    assert scrub("ref 4111 1111 1111 1112") == "ref 4111 1111 1111 1112"
    assert scrub("card 4111 1111 1111 1111") == "card [CARD]"


def test_several_kinds_in_one_text():
    text = ("I'm Jane (jane@corp.io, +1 415 555 0100), card 4012888888881881, "
            "server 10.0.0.7, token sk-live-ABCDEF1234567890abcdef.")
    scrubbed = scrub(text)
    for secret in ("jane@corp.io", "415 555 0100", "4012888888881881", "10.0.0.7", "sk-live-ABCDEF1234567890abcdef"):
        assert secret not in scrubbed
    assert scrubbed.startswith("I'm Jane ([EMAIL], [PHONE]), card [CARD], server [IP], token [SECRET]")
