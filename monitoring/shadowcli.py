"""``loragate shadow report``: the shadow comparison of monitoring/shadow.py on the command line (and a gate)."""

from __future__ import annotations

import argparse
import json

from loragate.monitoring.shadow import GateResult, ShadowGate, fmt, gate, report


def add_shadow_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="shadow_command", required=True)
    r = sub.add_parser("report", help="compare each shadow variant's answers with the primary's (request log)")
    r.add_argument("--request-log", required=True, help="the request log root (directory or s3:// URL)")
    r.add_argument("--route", help="only this route")
    r.add_argument("--variant", help="only this shadow variant (with --route)")
    r.add_argument("--primary", help="the variant to compare with (default: the one answering most pairs)")
    r.add_argument("--window", default="1h", help="how far back (e.g. 30m, 1h, 1d)")
    r.add_argument("--min-pairs", type=int, help="gate: exit 1 unless it passes (with the --max-*/--min-* options)")
    r.add_argument("--max-error-rate-delta", type=float, default=0.02)
    r.add_argument("--max-latency-ratio", type=float, default=2.0)
    r.add_argument("--min-similarity", type=float)
    r.add_argument("--json", action="store_true", help="print JSON")


def shadow_command(args: argparse.Namespace) -> int:
    from loragate.monitoring.commands import duration_s
    from loragate.monitoring.sources import RequestLog, Window

    comparisons = report(
        RequestLog(args.request_log), Window.last(duration_s(args.window)), args.route, args.variant, args.primary
    )
    results: list[GateResult] = []
    if args.min_pairs is not None:
        config = ShadowGate(
            min_pairs=args.min_pairs,
            max_error_rate_delta=args.max_error_rate_delta,
            max_latency_ratio=args.max_latency_ratio,
            min_similarity=args.min_similarity,
        )
        results = [gate(c, config) for c in comparisons]
    if args.json:
        out = [c.as_dict() for c in comparisons]
        for item, result in zip(out, results):
            item["gate"] = {"decision": result.decision, "explanation": result.explanation}
        print(json.dumps(out, indent=2))
    else:
        if not comparisons:
            print("no shadow answers in the window")
        for index, c in enumerate(comparisons):
            floor = c.noise_floor
            print(f"{c.route}: shadow {c.variant} vs {c.primary}: {c.pairs} pairs ({c.answered_pairs} answered)")
            print(
                f"  error rate   {fmt(c.shadow_error_rate)} vs {fmt(c.primary_error_rate)} "
                f"(delta {fmt(c.error_rate_delta)})"
            )
            print(f"  latency x{fmt(c.latency_ratio)}  length x{fmt(c.length_ratio)}")
            print(
                f"  similarity   {fmt(c.similarity)} (identical {fmt(c.identical_rate)}); noise floor "
                f"{fmt(floor.similarity)} (identical {fmt(floor.identical_rate)}, {floor.pairs} repeat pairs)"
                + ("; BELOW the floor" if c.below_floor else "")
            )
            if results:
                print(f"  gate: {results[index].decision} ({results[index].explanation})")
    if results and any(r.decision != "pass" for r in results):
        return 1
    return 0 if comparisons or not results else 1
