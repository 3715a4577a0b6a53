"""The ``loragate`` command: demo-model, engine, serve, hash-key, demo (all of it, locally), and the loop's
adapters, train, evaluate and pipeline."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

DEMO_DIR = Path(".demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loragate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("demo-model", help="build the tiny random-weight Llama and N LoRA adapters")
    p.add_argument("dir", type=Path)
    p.add_argument("--adapters", type=int, default=2)
    p.set_defaults(run=_demo_model)

    p = commands.add_parser("engine", help="start a local vLLM (CPU build) with LoRA enabled")
    p.add_argument("--model-dir", type=Path, required=True, help="a directory made by demo-model, or any HF model dir")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="register an adapter at start (default: a1 and a2 of a demo-model dir)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18000)
    p.set_defaults(run=_engine)

    p = commands.add_parser("serve", help="start the gateway")
    p.add_argument("--config", type=Path, help="routes file (env LORAGATE_ROUTES_FILE)")
    p.add_argument("--upstream", action="append", help="vLLM base URL, repeatable (env LORAGATE_UPSTREAMS)")
    p.add_argument("--host", help="env LORAGATE_HOST (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="env LORAGATE_PORT (default 8080)")
    p.add_argument("--workers", type=int, help="worker processes (env LORAGATE_WORKERS, default 1)")
    p.set_defaults(run=_serve)

    p = commands.add_parser("hash-key", help="make a new random API key and print its keys-file entry")
    p.add_argument("--id", default="my-key", help="the key's id in the keys file (safe to log)")
    p.add_argument("--routes", default="*", help="comma-separated route names, or * (default)")
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    p.add_argument("--priority", help="its requests' class without x-loragate-priority (critical, standard, sheddable)")
    p.add_argument("--priorities", help="comma-separated classes it may ask for (default: its class and below)")
    p.set_defaults(run=_hash_key)

    p = commands.add_parser("config-reference", help="every LORAGATE_* setting: default and meaning (Markdown)")
    p.add_argument("--out", type=Path, help="write it here (docs/configuration.md) instead of printing it")
    p.set_defaults(run=_config_reference)

    p = commands.add_parser("demo", help="build the demo model if missing, start vLLM and the gateway")
    p.add_argument("--dir", type=Path, default=DEMO_DIR)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--engine-port", type=int, default=18000)
    p.set_defaults(run=_demo)

    p = commands.add_parser("drift", help="one drift report (HTML + JSON); exit 1 when the traffic drifted")
    from loragate.monitoring.commands import add_drift_arguments, add_monitor_arguments  # light: no pandas/evidently

    add_drift_arguments(p)
    p.set_defaults(run=_lazy("loragate.monitoring.commands", "drift_command"))

    p = commands.add_parser("monitor", help="the drift monitor: scheduled checks, retraining triggers, /metrics")
    add_monitor_arguments(p)
    p.set_defaults(run=_lazy("loragate.monitoring.commands", "monitor_command"))

    p = commands.add_parser("rollout", help="a rollout's status or plan, or promote / roll back by hand")
    from loragate.monitoring.commands import add_rollout_arguments

    add_rollout_arguments(p)
    p.set_defaults(run=_lazy("loragate.monitoring.commands", "rollout_command"))

    p = commands.add_parser("log", help="the request log: compact closed hours into a few large files")
    from loragate.monitoring.commands import add_log_arguments

    add_log_arguments(p)
    p.set_defaults(run=_lazy("loragate.monitoring.commands", "log_command"))

    p = commands.add_parser("shadow", help="shadow traffic: compare shadow answers with the primary's (report)")
    from loragate.monitoring.shadowcli import add_shadow_arguments

    add_shadow_arguments(p)
    p.set_defaults(run=_lazy("loragate.monitoring.shadowcli", "shadow_command"))

    from loragate.pipeline.commands import (
        add_adapters_arguments,
        add_evaluate_arguments,
        add_pipeline_arguments,
        add_train_arguments,
    )

    p = commands.add_parser("adapters", help="the adapter registry: list, show, retire, approve, register")
    add_adapters_arguments(p)
    p.set_defaults(run=_lazy("loragate.pipeline.commands", "adapters_command"))

    p = commands.add_parser("train", help="LoRA fine-tune on a chat JSONL dataset; registers a candidate version")
    add_train_arguments(p)
    p.set_defaults(run=_lazy("loragate.pipeline.commands", "train_command"))

    p = commands.add_parser("evaluate", help="the evaluation gate: candidate vs baseline on the real engine")
    add_evaluate_arguments(p)
    p.set_defaults(run=_lazy("loragate.pipeline.commands", "evaluate_command"))

    p = commands.add_parser("pipeline", help="train -> evaluate -> approval for one route, resumable")
    add_pipeline_arguments(p)
    p.set_defaults(run=_lazy("loragate.pipeline.commands", "pipeline_command"))

    args = parser.parse_args(argv)
    return args.run(args) or 0


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``name`` of ``module``, imported when it runs: `loragate serve` loads no pandas or torch."""

    def run(args: argparse.Namespace) -> int:
        command: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
        return command(args)

    return run


def _demo_model(args: argparse.Namespace) -> int:
    from loragate.service.demo_model import build_demo_model

    print(json.dumps(build_demo_model(args.dir, adapters=args.adapters), indent=2))
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    from loragate.service.apikeys import ApiKey, hash_key, new_key

    from pydantic import ValidationError

    key = new_key()
    routes = "*" if args.routes.strip() == "*" else tuple(r.strip() for r in args.routes.split(",") if r.strip())
    priorities = None if args.priorities is None else tuple(p.strip() for p in args.priorities.split(",") if p.strip())
    try:
        entry = ApiKey(
            id=args.id,
            sha256=hash_key(key),
            routes=routes,
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
            priority=args.priority,
            priorities=priorities,
        )  # validates the id, the limits and the classes
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
        print(f"loragate hash-key: {problems}", file=sys.stderr)
        return 2
    print(f"# the key: give it to its holder; it is shown once and never stored\n{key}\n")
    print("# the entry for the keys file (LORAGATE_API_KEYS_FILE), under `keys:`")
    print(f"  - {json.dumps(entry.model_dump(exclude_none=True))}")
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    from loragate.service.configdoc import UndocumentedError, render

    try:
        text = render()
    except UndocumentedError as exc:
        print(f"loragate: {exc}", file=sys.stderr)
        return 1
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _engine_adapters(model_dir: Path, given: list[str]) -> tuple[Path, dict[str, str]]:
    adapters = dict(item.split("=", 1) for item in given)
    manifest = model_dir / "manifest.json"
    if manifest.exists():
        info = json.loads(manifest.read_text())
        if not given:
            adapters = {name: path for name, path in sorted(info["adapters"].items())[:2]}
        return Path(info["base"]), adapters
    return model_dir, adapters


def _engine(args: argparse.Namespace) -> int:
    from loragate.service.engine import engine_command, engine_env

    base, adapters = _engine_adapters(args.model_dir, args.adapter)
    command = engine_command(base, adapters, host=args.host, port=args.port)
    os.execve(command[0], command, engine_env())


def _serve(args: argparse.Namespace) -> int:
    for flag, env in (("config", "ROUTES_FILE"), ("host", "HOST"), ("port", "PORT"), ("workers", "WORKERS")):
        value = getattr(args, flag)
        if value is not None:
            os.environ[f"LORAGATE_{env}"] = str(value)
    if args.upstream:
        os.environ["LORAGATE_UPSTREAMS"] = ",".join(args.upstream)
    return serve_from_env()


def serve_from_env() -> int:
    # Settings are read before prometheus_client is imported: with several workers its
    # multiprocess mode must be switched on (PROMETHEUS_MULTIPROC_DIR) first.
    from pydantic import ValidationError

    from loragate.service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"LORAGATE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"loragate: bad settings: {problems}", file=sys.stderr)
        return 2
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="loragate-metrics-")
    try:
        from loragate.common.cardcheck import CardCheck
        from loragate.common.catalog import CatalogError, load_catalog

        # A bad routes file (or a variant whose registry card refuses it) stops here with a clear message.
        load_catalog(settings.routes_file, CardCheck())
        if settings.auth:
            from loragate.service.apikeys import KeyStore

            KeyStore(settings.api_keys_file, settings.api_keys)  # and so does a bad keys file
        from loragate.service.discovery import wait_until_resolved

        # Host names in LORAGATE_UPSTREAMS (DNS discovery) must resolve, after a grace for a starting engine.
        wait_until_resolved(settings.upstreams, settings.discovery_start_timeout_s)
    except (CatalogError, ValueError, RuntimeError) as exc:  # KeysError: a ValueError; DiscoveryError: a RuntimeError
        print(f"loragate: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(
        "loragate.service.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    return 0


DEMO_ROUTES = """\
# The demo catalog: two routes over the tiny base model and its adapters.
routes:
  support:
    base_model: base
    sticky_key: x-user-id
    variants:
      - {{name: v1, adapter: a1, path: {a1}, weight: 90}}
      - {{name: v2, adapter: a2, path: {a2}, weight: 10}}
    fallback: [v1, base]
    pricing:
      prompt_per_1k: 0.0001
      completion_per_1k: 0.0002
      reference_name: gpt-4o-mini
      reference_prompt_per_1k: 0.00015
      reference_completion_per_1k: 0.0006
  plain:
    variants:
      - {{name: base, weight: 1}}
"""


def _demo(args: argparse.Namespace) -> int:
    from loragate.service.demo_model import build_demo_model, demo_model_ready
    from loragate.service.engine import engine_command, engine_env

    for port in (args.port, args.engine_port):
        if not _port_free(port):
            print(
                f"loragate: port {port} on 127.0.0.1 is in use; stop what holds it or pass --port/--engine-port",
                file=sys.stderr,
            )
            return 1
    model_dir = args.dir / "model"
    if not demo_model_ready(model_dir):
        print(f"building the demo model in {model_dir} ...", flush=True)
        build_demo_model(model_dir, adapters=2)
    base, adapters = _engine_adapters(model_dir, [])
    routes = args.dir / "routes.yaml"
    routes.write_text(DEMO_ROUTES.format(**adapters))
    engine_log = open(args.dir / "engine.log", "ab")
    print(f"starting vLLM (CPU) on :{args.engine_port}, log in {engine_log.name} (about a minute) ...", flush=True)
    engine = subprocess.Popen(
        engine_command(base, adapters, port=args.engine_port),
        env=engine_env(),
        stdout=engine_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        if not _wait_ready(f"http://127.0.0.1:{args.engine_port}/health", engine, timeout_s=300):
            print(f"vLLM did not become ready; see {engine_log.name}", file=sys.stderr)
            return 1
        print(
            f"\nloragate is up: http://127.0.0.1:{args.port}  (Ctrl-C stops it)\n\n"
            f"  curl -s localhost:{args.port}/v1/chat/completions -H 'content-type: application/json' \\\n"
            f'    -H \'x-user-id: alice\' -i -d \'{{"model":"support","max_tokens":16,\n'
            f'    "messages":[{{"role":"user","content":"hi"}}]}}\'\n'
            f"  curl -s localhost:{args.port}/v1/models\n"
            f"  curl -s localhost:{args.port}/metrics | grep loragate_\n",
            flush=True,
        )
        os.environ.update(
            LORAGATE_ROUTES_FILE=str(routes),
            LORAGATE_PORT=str(args.port),
            LORAGATE_UPSTREAMS=f"http://127.0.0.1:{args.engine_port}",
        )
        return serve_from_env()
    finally:
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(timeout=30)


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now. SO_REUSEADDR as servers bind (uvicorn, vLLM): a port
    that only connections in TIME_WAIT still hold (a server stopped a moment ago) is free; a listener is not."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


if __name__ == "__main__":
    sys.exit(main())
