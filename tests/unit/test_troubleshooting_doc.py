"""docs/troubleshooting.md quotes what the gateway and the monitor print: each quoted message must still be in the
code (change both together)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Fragments of the messages the page quotes, as the source writes them (format fields left out).
MESSAGES = [
    "is in use; stop what holds it or pass --port/--engine-port",  # loragate/cli.py
    "not valid YAML",  # common/catalog.py
    "cannot read: ",
    "expected a mapping with a 'routes' key",
    "routes file rejected, keeping the last good catalog",  # service/app.py
    "loragate: bad settings: ",  # loragate/cli.py
    "does not resolve",  # service/discovery.py
    "not a usable Redis URL",  # service/settings.py
    "no healthy upstream replica",  # service/upstreams.py
    "could answer (",  # service/forwarding.py
    "is now %s",  # upstreams: "upstream %s is now healthy|unhealthy"
    "limits: Redis unreachable (%s: %s); %s until it is back",  # service/limits.py
    "enforcing limits in this process only",
    "limits: Redis is reachable again; limits are shared again",
    "loading adapter %s on %s failed: %s",  # service/upstreams.py
    "loaded on %s is not applied: %s",  # service/adapterloads.py
    "STALLED after",  # monitoring/rollout/controller.py
    "inconclusive analyses (held; never promoted)",
    "not in a serving state",  # common/cardcheck.py
]
REASONS = [
    "no_healthy_upstream",
    "overloaded",
    "adapter_unavailable",
    "adapter_missing",
    "circuit_open",
    "connect_error",
    "timeout",
    "upstream_5xx",
]


def _source() -> str:
    return "\n".join(
        p.read_text() for folder in ("loragate", "service", "monitoring") for p in sorted((ROOT / folder).rglob("*.py"))
    )


@pytest.fixture(scope="module")
def source() -> str:
    return _source()


@pytest.mark.parametrize("fragment", MESSAGES)
def test_a_quoted_message_is_still_printed_by_the_code(source: str, fragment: str) -> None:
    assert fragment in source, f"the code no longer says {fragment!r}: update docs/troubleshooting.md"


def test_the_page_quotes_them_and_names_only_reasons_that_exist(source: str) -> None:
    page = " ".join((ROOT / "docs/troubleshooting.md").read_text().split())  # lines joined
    for fragment in MESSAGES:
        pieces = [piece.strip() for piece in fragment.split("%s") if piece.strip(" :;()")]
        assert all(piece in page for piece in pieces), fragment
    for reason in REASONS:
        assert f'"{reason}"' in source and reason in page, reason
