"""Signed webhooks as the Standard Webhooks specification (v1.0.0, symmetric) has them.

The sender signs ``{webhook-id}.{webhook-timestamp}.{body}`` with HMAC-SHA256 and sends three
headers: ``webhook-id`` (stays the same across retries: the receiver's idempotency key),
``webhook-timestamp`` (unix seconds of this attempt) and ``webhook-signature``
(``v1,<base64 signature>``; a space-separated list during a secret rotation). A receiver
checks the signature over the raw body and rejects timestamps too far from its clock, so a
captured request cannot be replayed later.

A secret is ``whsec_<base64 key>`` (the specification's form) or, for existing setups, any
other string, whose UTF-8 bytes are the key. Receivers in other languages can use the
Standard Webhooks libraries with the same secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
import uuid
from collections.abc import Mapping

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300  # the specification's recommendation: 5 minutes either way


class WebhookVerificationError(ValueError):
    """The webhook is not authentic or not fresh; the message says why (never the expected signature)."""


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key: ``whsec_<base64>`` decoded, other strings as UTF-8, bytes as they are."""
    if isinstance(secret, bytes):
        return secret
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except binascii.Error as exc:
            raise ValueError("webhook secret: the part after whsec_ is not valid base64") from exc
    return secret.encode()


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def signature(secret: str | bytes, message_id: str, timestamp: int | str, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of id.timestamp.body>``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(
    secret: str | bytes, body: bytes, *, message_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    """The three headers for one delivery attempt of ``body``.

    Pass the same ``message_id`` for every retry of one event; ``timestamp`` defaults to now.
    """
    message_id = message_id or new_message_id()
    if "." in message_id:
        raise ValueError("webhook id must not contain '.'")
    timestamp = int(time.time()) if timestamp is None else int(timestamp)
    return {
        ID_HEADER: message_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, message_id, timestamp, body),
    }


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> str:
    """Check one received webhook; returns its ``webhook-id`` (store it to drop duplicates).

    ``headers``: any mapping (header names in any case); ``body``: the raw bytes as received,
    before any JSON parsing. Raises WebhookVerificationError when a header is missing, the
    timestamp is more than ``tolerance_s`` from ``now`` (past or future), or no ``v1``
    signature matches (compared in constant time).
    """
    lowered = {str(name).lower(): value for name, value in headers.items()}
    values = [lowered.get(name) for name in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)]
    missing = [name for name, value in zip((ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER), values) if not value]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    message_id, stamp, signatures = (str(value) for value in values)
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"{TIMESTAMP_HEADER} is not an integer: {stamp[:40]!r}") from None
    now = time.time() if now is None else now
    if timestamp < now - tolerance_s:
        raise WebhookVerificationError(f"{TIMESTAMP_HEADER} too old ({now - timestamp:.0f} s > {tolerance_s:g} s)")
    if timestamp > now + tolerance_s:
        raise WebhookVerificationError(
            f"{TIMESTAMP_HEADER} too far in the future ({timestamp - now:.0f} s > {tolerance_s:g} s)"
        )
    expected = signature(secret, message_id, stamp, body).encode()  # the header as received is signed
    matched = False
    for candidate in signatures.split(" "):
        if candidate.startswith("v1,"):
            matched |= hmac.compare_digest(expected, candidate.encode())
    if not matched:
        raise WebhookVerificationError("no matching v1 signature")
    return message_id
