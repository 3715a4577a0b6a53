"""Argument parsing and handlers for ``loragate drift`` and ``loragate monitor``.

Imported by loragate/cli.py when it builds its parser, so this module stays light:
pandas, pyarrow and Evidently are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from loragate.monitoring.drift import DriftResult
    from loragate.monitoring.sources import Window

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def duration_s(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 1d)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


_UNIX = re.compile(r"^\s*\d+(?:\.\d*)?\s*$")


def moment(text: str) -> datetime:
    """``1764550000``, ``1764550000.25`` (unix seconds) or an ISO time (``2026-12-01T00:00:00Z``;
    without a zone: UTC) -> an aware UTC datetime."""
    try:
        if _UNIX.match(text):
            return datetime.fromtimestamp(float(text), tz=timezone.utc)
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (unix seconds like 1764550000 or 1764550000.5, or ISO like 2026-12-01T08:00:00Z)"
        ) from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def add_drift_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--request-log", required=True, help="request-log root: a directory or s3://bucket/prefix")
    p.add_argument("--route", required=True)
    p.add_argument("--variant", help="one variant (default: all of the route's traffic)")
    current = p.add_argument_group("current window (default: the last --window)")
    current.add_argument("--window", type=duration_s, default=3600.0, help="e.g. 1h (default)")
    current.add_argument("--since", type=moment, help="ISO time or unix seconds (e.g. 1764550000.5)")
    current.add_argument("--until", type=moment, help="ISO time or unix seconds (default now)")
    ref = p.add_argument_group("reference: a dataset file, or an earlier request-log window")
    ref.add_argument("--reference", help="Parquet/CSV/JSONL, e.g. the adapter's training set")
    ref.add_argument("--reference-since", type=moment, help="ISO time or unix seconds")
    ref.add_argument("--reference-until", type=moment, help="ISO time or unix seconds (default: --since)")
    ref.add_argument(
        "--reference-window",
        type=duration_s,
        help="length of the window that ends where the current one starts (default: --window)",
    )
    p.add_argument("--prometheus", help="Prometheus URL: add per-variant latency, cost, error and fallback series")
    p.add_argument("--prometheus-step", type=duration_s, default=60.0)
    p.add_argument("--prometheus-rate-window", default="1m", help="PromQL range of rate() (>= 4 scrape intervals)")
    p.add_argument("--out", type=Path, default=Path("drift-reports"), help="where the HTML and JSON go")
    p.add_argument("--min-rows", type=int, default=30)
    p.add_argument("--drift-share", type=float, default=0.5)
    p.add_argument(
        "--sample-rows",
        type=int,
        default=10_000,
        help="rows read per window: a deterministic sample by request id (default 10000)",
    )
    p.add_argument("--json", action="store_true", help="print the whole JSON summary")


def add_monitor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="monitor YAML (see docs/monitoring.md)")
    p.add_argument("--once", action="store_true", help="run every check once and exit (1 when any drifted)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)


def _windows(args: argparse.Namespace) -> tuple[Window, Window]:
    from loragate.monitoring.sources import Window, utc

    until = utc(args.until) if args.until else utc(time.time())
    current = Window.between(args.since, until) if args.since else Window.last(args.window, end=until)
    if args.reference_since:
        reference = Window.between(args.reference_since, args.reference_until or current.start)
    else:
        length = args.reference_window or (current.end - current.start).total_seconds()
        reference = Window.last(length, end=args.reference_until or current.start)
    return current, reference


def drift_command(args: argparse.Namespace) -> int:
    import asyncio

    from loragate.monitoring.drift import DriftConfig, run_drift
    from loragate.monitoring.driftfeatures import LOG_COLUMNS
    from loragate.monitoring.prometheus import Prometheus, PrometheusError
    from loragate.monitoring.sources import RequestLog, load_reference, variant_series

    try:
        current_window, ref_window = _windows(args)
        config = DriftConfig(min_rows=args.min_rows, drift_share=args.drift_share, sample_rows=args.sample_rows)
        log = RequestLog(args.request_log)
        current = log.sample(
            current_window,
            args.route,
            args.variant,
            columns=LOG_COLUMNS,
            per_variant=config.sample_rows,
            by_variant=False,
        )
        reference_rows = None
        if args.reference:
            reference = load_reference(args.reference)
        else:
            sample = log.sample(
                ref_window,
                args.route,
                args.variant,
                columns=LOG_COLUMNS,
                per_variant=config.sample_rows,
                by_variant=False,
            )
            reference, reference_rows = sample.frame, sample.total_rows
        series = None
        if args.prometheus:
            prom = Prometheus(args.prometheus)

            async def both() -> list[pd.DataFrame]:
                return await asyncio.gather(
                    *(
                        variant_series(
                            prom,
                            args.route,
                            args.variant,
                            w,
                            step_s=args.prometheus_step,
                            rate_window=args.prometheus_rate_window,
                        )
                        for w in (ref_window, current_window)
                    )
                )

            try:
                series = tuple(asyncio.run(both()))
            except (PrometheusError, OSError) as exc:
                print(f"loragate drift: Prometheus unavailable, going on without it: {exc}", file=sys.stderr)
        result = run_drift(
            reference,
            current.frame,
            route=args.route,
            variant=args.variant,
            out_dir=args.out,
            prometheus=series,
            config=config,
            window_rows=(reference_rows, current.total_rows),
        )
    except (OSError, ValueError) as exc:
        print(f"loragate drift: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        assert result.json_path is not None  # written: --out always has a value
        print(Path(result.json_path).read_text())
    else:
        print(summary_text(result))
    return EXIT_DRIFT if result.dataset_drift else EXIT_OK


def summary_text(result: DriftResult) -> str:
    def rows(sampled: int, window: int | None) -> str:
        return f"{sampled}" if window is None else f"{sampled} (sample of {window} in the window)"

    lines = [
        f"route={result.route} variant={result.variant or '*'} status={result.status} "
        f"reference_rows={rows(result.reference_rows, result.reference_window_rows)} "
        f"current_rows={rows(result.current_rows, result.current_window_rows)}"
    ]
    if result.reason:
        lines.append(f"  {result.reason}")
    if result.features:
        lines.append(
            f"  drifted {len(result.drifted_features)}/{len(result.features)} features "
            f"(share {result.share:.2f}); drifted groups: {', '.join(result.drifted_groups) or 'none'}"
        )
        for group in result.groups:
            lines.append(f"  [{group.group}] {group.status}: {group.reason}")
            for f in result.features:
                if f.group == group.group:
                    op = "<" if f.test == "p_value" else ">"
                    lines.append(
                        f"    {'DRIFT' if f.drifted else 'ok   '} {f.feature:<20} {f.method:<17} "
                        f"{f.score:.4g} ({op} {f.threshold:.4g} drifts)"
                    )
        for c in result.content:
            words = ", ".join(t.term for t in c.current_terms[:8]) or "-"
            lines.append(f"  {c.column}: ROC AUC {c.auc:.3f}; current window more often has: {words}")
            lines.append(f"    reference more often has: {', '.join(t.term for t in c.reference_terms[:8]) or '-'}")
            for example in c.current_examples:
                lines.append(f"    current e.g.: {example[:120]}")
    for s in result.prometheus:
        ratio = f"x{s.ratio:.2f}" if s.ratio is not None else "-"
        lines.append(f"  prometheus {s.series:<22} ref={s.reference_mean} cur={s.current_mean} {ratio}")
    if result.html_path:
        lines.append(f"  report: {result.html_path}")
    if result.json_path:
        lines.append(f"  summary: {result.json_path}")
    return "\n".join(lines)


def monitor_command(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from pydantic import ValidationError

    from loragate.monitoring.config import MonitorConfig
    from loragate.monitoring.service import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = MonitorConfig.load(args.config)
    except (OSError, ValidationError, ValueError) as exc:
        print(f"loragate monitor: bad config {args.config}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.host:
        config.host = args.host
    if args.port:
        config.port = args.port
    try:
        return asyncio.run(serve(config, once=args.once))
    except KeyboardInterrupt:
        return EXIT_OK


def add_rollout_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=("status", "plan", "promote", "rollback"),
        help="status: where each rollout is; plan: what each step needs, from the route's recent "
        "traffic (exit 1 when a rollout cannot finish within max_holds); promote/rollback: now, "
        "whatever the analysis says",
    )
    p.add_argument("--config", type=Path, required=True, help="the monitor YAML with its rollouts section")
    p.add_argument("--route", help="the rollout's route (needed when several rollouts are configured)")
    p.add_argument("--reason", default="manual", help="recorded in the rollout's history")
    p.add_argument("--json", action="store_true", help="status or plan as JSON")
    p.add_argument(
        "--lookback",
        type=float,
        help="plan: seconds of the route's traffic to read (default: the rollout's plan_lookback_s)",
    )


def _plan_command(args: argparse.Namespace, config: Any, specs: list[Any]) -> int:
    """``loragate rollout plan``: each rollout's plan from its route's recent traffic in Prometheus."""
    import asyncio
    import json

    from loragate.monitoring.prometheus import Prometheus
    from loragate.monitoring.rollout.analysis import PrometheusAnalysis
    from loragate.monitoring.rollout.plan import plan

    if not specs:
        print(f"loragate rollout: no rollout for route {args.route!r}", file=sys.stderr)
        return EXIT_ERROR
    if not config.prometheus_url:
        print(
            "loragate rollout plan: the config has no prometheus_url to read the route's traffic from", file=sys.stderr
        )
        return EXIT_ERROR
    source = PrometheusAnalysis(Prometheus(config.prometheus_url))
    lookback = getattr(args, "lookback", None)
    plans = []
    for spec in specs:
        try:
            traffic = asyncio.run(source.traffic(spec.route, lookback or spec.plan_lookback_s))
        except (OSError, RuntimeError, ValueError) as exc:
            print(f"loragate rollout plan: {spec.route}: cannot read its traffic: {exc}", file=sys.stderr)
            return EXIT_ERROR
        plans.append(plan(spec, traffic))
    if args.json:
        print(json.dumps({p.route: p.as_dict() for p in plans}, indent=2))
    else:
        for made in plans:
            print("\n".join(made.lines()))
    return EXIT_OK if all(p.feasible for p in plans) else EXIT_DRIFT


def rollout_command(args: argparse.Namespace) -> int:
    """``loragate rollout status|promote|rollback``: a manual override of the monitor's rollouts.

    It writes the same state file and routes source as the running monitor, which picks the
    change up in its next round (its transitions counter does not count manual actions).
    """
    import asyncio
    import json

    from pydantic import ValidationError

    from loragate.monitoring.rollout.controller import RolloutController
    from loragate.monitoring.rollout.errors import RolloutError
    from loragate.monitoring.config import MonitorConfig

    try:
        config = MonitorConfig.load(args.config)
    except (OSError, ValidationError, ValueError) as exc:
        print(f"loragate rollout: bad config {args.config}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if config.rollouts is None:
        print(f"loragate rollout: {args.config} configures no rollouts", file=sys.stderr)
        return EXIT_ERROR
    controller = RolloutController(config.rollouts, None)
    specs = controller.specs()  # the config's and those the pipeline action started (in the state file)
    if not specs:
        print(f"loragate rollout: {args.config} configures no rollouts and none was started", file=sys.stderr)
        return EXIT_ERROR
    if args.action == "plan":
        return _plan_command(args, config, [s for s in specs if args.route in (None, s.route)])
    if args.action == "status":
        status = controller.status()
        if args.route:
            status = {args.route: status.get(args.route, {"error": "no such rollout"})}
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            for name, body in status.items():
                print("\n".join(controller.explain(name, body)))
        return EXIT_OK
    routes = [spec.route for spec in specs]
    route = args.route or (routes[0] if len(routes) == 1 else None)
    if route is None:
        print(f"loragate rollout: several rollouts ({', '.join(routes)}): pass --route", file=sys.stderr)
        return EXIT_ERROR
    try:
        done = asyncio.run(controller.override(route, args.action, reason=args.reason))
    except (RolloutError, OSError) as exc:
        print(f"loragate rollout: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{route}: {done.state}, {done.canary} at {done.weight:g}%, {done.stable} at {100 - done.weight:g}%")
    return EXIT_OK


def add_log_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="log_command", required=True)
    c = sub.add_parser(
        "compact",
        help="merge each closed hour's small files into a few large ones (idempotent, "
        "safe beside running gateways and other compactions)",
    )
    c.add_argument("--request-log", required=True, help="request-log root: a directory or s3://bucket/prefix")
    c.add_argument("--table", choices=("requests", "feedback", "all"), default="all")
    c.add_argument("--days", type=int, default=2, help="days looked at, today included (default 2)")
    c.add_argument(
        "--grace", type=duration_s, default=900.0, help="an hour is closed this long after its end (default 15m)"
    )
    c.add_argument("--now", type=moment, help="compact as if it were this time (ISO or unix seconds)")
    c.add_argument("--dry-run", action="store_true", help="say what would be compacted, change nothing")
    c.add_argument("--json", action="store_true")


def log_command(args: argparse.Namespace) -> int:
    """``loragate log compact``: one compaction round (the monitor's ``compaction`` section runs it on a schedule)."""
    import dataclasses
    import json

    from loragate.common.logschema import TABLES
    from loragate.common.objectstore import filesystem
    from loragate.monitoring.compaction import Compactor

    try:
        compactor = Compactor(*filesystem(args.request_log), grace_s=args.grace)
        tables = TABLES if args.table == "all" else (args.table,)
        results = compactor.run(
            tables, days=args.days, now=args.now.timestamp() if args.now else None, dry_run=args.dry_run
        )
    except (OSError, ValueError) as exc:
        print(f"loragate log compact: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
        return EXIT_OK
    for r in results:
        what = f"{r.inputs} files, {r.rows} rows -> {', '.join(r.outputs)}" if r.outputs else f"{r.inputs} files"
        print(f"{r.directory} {r.hour}: {r.status} ({what}; {r.deleted} deleted)")
    if not results:
        print("nothing to compact")
    return EXIT_OK
