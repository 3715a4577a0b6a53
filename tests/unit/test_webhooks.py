"""Standard Webhooks signing and verification (loragate.common.webhooks)."""

import base64
import hashlib
import hmac

import pytest

from loragate.common.webhooks import WebhookVerificationError, secret_key, sign, verify

BODY = b'{"event":"loragate.retraining_trigger","route":"support"}'
KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
NOW = 1_750_000_000


def test_signature_is_the_specified_hmac_of_id_timestamp_body():
    headers = sign(SECRET, BODY, message_id="msg_1", timestamp=NOW)
    expected = base64.b64encode(hmac.new(KEY, b"msg_1.%d." % NOW + BODY, hashlib.sha256).digest()).decode()
    assert headers == {"webhook-id": "msg_1", "webhook-timestamp": str(NOW), "webhook-signature": f"v1,{expected}"}
    assert secret_key("plain-secret") == b"plain-secret"  # a non-whsec_ secret: its UTF-8 bytes


def test_a_fresh_webhook_is_accepted_with_headers_in_any_case():
    headers = sign(SECRET, BODY, timestamp=NOW)
    shouted = {name.upper(): value for name, value in headers.items()}
    assert verify(SECRET, shouted, BODY, now=NOW + 10) == headers["webhook-id"]
    rotated = dict(headers, **{"webhook-signature": "v1,b2xk " + headers["webhook-signature"]})
    assert verify(SECRET, rotated, BODY, now=NOW) == headers["webhook-id"]  # one matching signature is enough


def test_a_replayed_webhook_is_rejected():
    headers = sign(SECRET, BODY, timestamp=NOW)
    assert verify(SECRET, headers, BODY, now=NOW + 299)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, headers, BODY, now=NOW + 301)  # the same request, captured and sent again later
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(SECRET, headers, BODY, now=NOW - 301)
    # Refreshing the timestamp without the secret breaks the signature.
    with pytest.raises(WebhookVerificationError, match="no matching v1 signature"):
        verify(SECRET, dict(headers, **{"webhook-timestamp": str(NOW + 400)}), BODY, now=NOW + 400)


@pytest.mark.parametrize("change", ["body", "id", "secret", "scheme", "missing", "timestamp"])
def test_tampered_or_incomplete_webhooks_are_rejected(change):
    headers, body, secret = sign(SECRET, BODY, timestamp=NOW), BODY, SECRET
    if change == "body":
        body = BODY.replace(b"support", b"billing")
    elif change == "id":
        headers["webhook-id"] = "msg_other"
    elif change == "secret":
        secret = "whsec_" + base64.b64encode(b"x" * 32).decode()
    elif change == "scheme":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v1a,")
    elif change == "missing":
        del headers["webhook-signature"]
    else:
        headers["webhook-timestamp"] = "soon"
    with pytest.raises(WebhookVerificationError):
        verify(secret, headers, body, now=NOW)


def test_bad_secrets_and_ids_fail_clearly():
    with pytest.raises(ValueError, match="whsec_"):
        secret_key("whsec_not base64!")
    with pytest.raises(ValueError, match="'.'"):
        sign(SECRET, BODY, message_id="msg.1")
