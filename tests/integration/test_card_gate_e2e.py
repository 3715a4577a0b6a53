"""The gateway and the registry on real parts: a route to a registered adapter on the real vLLM engine.

v1 (the demo adapter a1, registered stable) is served through its registry directory, loaded on
demand. An edit that gives traffic to a candidate's card, or that follows a change of v1's weights
after registration, is refused: the last good catalog keeps serving v1, and the candidate cannot
even be pinned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.processes import ROOT, start_gateway, wait_http


def loragate(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loragate", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def ask(url: str, model: str) -> tuple[int, dict, str]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def write_routes(path, v1, v2=None, v2_weight=0) -> None:
    text = (
        f"routes:\n  support:\n    variants:\n      - {{name: v1, adapter: cardgate-v1, path: '{v1}', weight: 100}}\n"
    )
    if v2 is not None:
        text += f"      - {{name: v2, adapter: cardgate-v2, card: '{v2}', path: '{v2}', weight: {v2_weight}}}\n"
    path.write_text(text)
    os.utime(path, ns=(time.time_ns(), time.time_ns()))


def test_gateway_refuses_cards_that_do_not_allow_traffic(engine, demo_model, tmp_path):
    # Its own adapter names: on the shared engine a name stays bound to the path it was first loaded from.
    registry = tmp_path / "registry"
    adapters, base = demo_model["adapters"], demo_model["base"]
    loragate(
        "adapters",
        "register",
        adapters["a1"],
        "--registry",
        str(registry),
        "--name",
        "cardgate",
        "--version",
        "v1",
        "--base-model",
        base,
        "--state",
        "stable",
    )
    loragate(
        "adapters",
        "register",
        adapters["a2"],
        "--registry",
        str(registry),
        "--name",
        "cardgate",
        "--version",
        "v2",
        "--base-model",
        base,
        "--state",
        "candidate",
    )
    v1, v2 = registry / "cardgate" / "v1", registry / "cardgate" / "v2"
    routes = tmp_path / "routes.yaml"
    write_routes(routes, v1)
    log = tmp_path / "gateway.log"
    service, url = start_gateway(routes, [engine], log)
    try:
        wait_http(f"{url}/readyz", service.process, 30, log)
        status, headers, body = ask(url, "support")
        assert status == 200 and headers["x-loragate-variant"] == "v1", body

        # A candidate (no gate verdict) with half the traffic: refused, the last good catalog serves.
        write_routes(routes, v1, v2, v2_weight=100)
        deadline = time.monotonic() + 20
        while "variants.1.card" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "is candidate, not in a serving state" in log.read_text()
        served = [ask(url, "support")[1].get("x-loragate-variant") for _ in range(6)]
        assert served == ["v1"] * 6
        status, _, body = ask(url, "support:v2")
        assert status == 400 and "no variant 'v2'" in body

        # At weight 0 the candidate is staged but left out (not pinnable); v1's weights then change on disk.
        write_routes(routes, v1, v2, v2_weight=0)
        time.sleep(2)
        assert ask(url, "support:v2")[0] == 400
        weights = v1 / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
        write_routes(routes, v1)
        deadline = time.monotonic() + 20
        while "changed after registration" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "variants.0.path: cardgate/v1: the weights" in log.read_text()
    finally:
        service.stop()
