"""The scrubber's worst case: CPU µs per KB of adversarial text against typical text, on every path, in one run.

The adversarial corpus (tests/scrub_corpus.py) holds, for every rule, inputs built to make a backtracking
engine work hard (long runs of whitespace, digits, separators, near-misses of each pattern), each repeated to
--size characters, with and without a non-ASCII character (which sends a text off the native path). Typical
text is a pasted support thread of the same size with a few personal details and secrets. Paths:

  python   loragate.common.scrub's rules with Python's re, text by text (the reference)
  native   the same rules compiled with PCRE2 (loragate/common/_scrubnative.c), ASCII texts only
  scrub    loragate.common.scrub.scrub, the per-text entry point (native, else Python)
  batch    service.requestlog.scrub.scrub_many on a batch of one (native, else RE2 gates + Python's rules)
  gated    service.requestlog.scrub's RE2-gated batch path alone (what non-ASCII texts take in the conversion process)

For each path: typical µs/KB, each case's µs/KB and its ratio to typical text on the same path (non-ASCII
cases against typical text with the same non-ASCII character appended), the worst ratio; target: ≤ 3x. Also the
reported case ("passport" + N spaces + "x1") at 8k, 16k, 200k spaces and the body limit on every path, and
the rules as they were before they were made linear (tests/scrub_corpus.py old_scrub, Python's re) at 2k, 4k
and 8k spaces (--old-spaces; each doubling costs them about 4x). Each figure is the best of --repeats runs
of calls repeated for at least 10 ms. Every path's output is checked equal to the reference's.

Run:  .venv/bin/python bench/scrub_worst.py [--size 65536] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loragate.common import scrub as rules  # noqa: E402
from loragate.service.requestlog import scrub as logscrub  # noqa: E402
from tests.scrub_corpus import ADVERSARIAL, adversarial_text, old_scrub, typical_text  # noqa: E402

BODY_LIMIT = 1_048_576  # service/settings.py max_body_bytes
NON_ASCII = " \u00e9"
TARGET = 3.0


def us_per_kb(function: Callable[[str], object], text: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        calls, started = 0, time.process_time()
        while not calls or time.process_time() - started < 0.01:
            function(text)
            calls += 1
        best = min(best, (time.process_time() - started) / calls)
    return best / (len(text.encode("utf-8")) / 1024) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=65536, help="characters of each text")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-spaces", default="2000,4000,8000", help="the old rules on the reported case")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "scrub_worst.json")
    args = parser.parse_args()
    native = rules.native_scrubber()
    if native is None:
        print("the native scrubber is not built (scripts/setup.sh installs gcc and libpcre2-dev)", file=sys.stderr)
        return 1
    paths: dict[str, Callable[[str], str | None]] = {
        "python": rules._python_scrub,
        "native": native.scrub,
        "scrub": rules.scrub,
        "batch": lambda text: logscrub.scrub_many([text])[0],
        "gated": lambda text: logscrub._scrub_gated([text])[0],
    }

    def check(name: str, path: Callable[[str], str | None], text: str) -> None:
        out = path(text)
        if name == "native" and not text.isascii():
            assert out is None, "a non-ASCII text is the Python rules' to scrub"
        else:
            assert out == rules._python_scrub(text), f"{name} disagrees with the reference"

    results: dict = {"size": args.size, "target_ratio": TARGET, "paths": {}}
    typical = {tail: typical_text(args.size) + tail for tail in ("", NON_ASCII)}
    for tail in ("", NON_ASCII):
        for name, path in paths.items():
            if name == "native" and tail:
                continue
            key = name + (" non-ASCII" if tail else "")
            # Typical text as ASCII as the case is (a case may be non-ASCII in itself: it takes that path).
            usual_of = {}
            for text in typical.values():
                check(name, path, text)
                usual_of[text.isascii()] = us_per_kb(path, text, args.repeats) if path(text) is not None else 0.0
            usual = usual_of[not tail]
            cases = {}
            for case in ADVERSARIAL:
                text = adversarial_text(case, args.size, bool(tail))
                if name == "native" and not text.isascii():
                    continue  # a case that is non-ASCII in itself
                check(name, path, text)
                cost = us_per_kb(path, text, args.repeats)
                cases[case] = {"us_per_kb": round(cost, 2), "ratio": round(cost / usual_of[text.isascii()], 2)}
            worst = max(cases, key=lambda c: cases[c]["ratio"])
            over = sorted(c for c in cases if cases[c]["ratio"] > TARGET)
            results["paths"][key] = {
                "typical_us_per_kb": round(usual, 2),
                "worst_case": worst,
                "worst_ratio": cases[worst]["ratio"],
                "over_target": over,
                "cases": cases,
            }
            print(
                f"{key:>18}: typical {usual:7.1f} us/KB | worst {worst} {cases[worst]['us_per_kb']:.1f} us/KB "
                f"= {cases[worst]['ratio']:.2f}x typical | over {TARGET:g}x: {', '.join(over) or 'none'}",
                flush=True,
            )

    reported: dict = {}
    for spaces in (8_000, 16_000, 200_000, BODY_LIMIT - 10):
        text = "passport" + " " * spaces + "x1"
        row = {}
        for name, path in paths.items():
            check(name, path, text)
            started = time.process_time()
            path(text)
            row[name] = round((time.process_time() - started) * 1e3, 3)
        reported[str(spaces)] = row
        print(f"reported case, {spaces:>7} spaces: " + "  ".join(f"{k} {v:.3f} ms" for k, v in row.items()), flush=True)
    old: dict = {}
    for spaces in (int(s) for s in args.old_spaces.split(",") if s):
        text = "passport" + " " * spaces + "x1"
        started = time.process_time()
        assert old_scrub(text) == rules._python_scrub(text)
        old[str(spaces)] = round((time.process_time() - started) * 1e3, 1)
        print(f"old rules (Python re), {spaces:>6} spaces: {old[str(spaces)]:.1f} ms", flush=True)
    results["reported_case_ms"] = reported
    results["reported_case_old_python_ms"] = old
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
