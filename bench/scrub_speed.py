"""How fast the request log's scrubber is: the native rules (PCRE2, C) against Python's re and libraries, in one run.

Five ways to scrub the same texts, each giving the same output (checked here on every text):

  python   loragate.common.scrub's rules with Python's re, text by text (the baseline: what scrub did before)
  gated    service.requestlog.scrub's batch path: RE2 gates over the whole batch in Arrow, Python's re where a gate
           lets a text through (what the conversion process does with non-ASCII texts)
  native   the rules compiled with PCRE2 (loragate/common/_scrubnative.c), text by text
  pcre2    the same PCRE2 patterns (JIT) through the PyPI bindings ``pcre2``, in scrub's own loop (conditions
           and replacement functions in Python): what the hand-written C would be replaced by
  regex    the same patterns through the ``regex`` module, in the same loop

on two ASCII corpora: the short support message of bench/features_overhead.py (an e-mail address, a phone
number, an order number that changes), and long prompts (about 4 KB: a pasted support thread with a
few personal details among ordinary text, numbers, dates and versions); and, ``python`` against ``gated``
only, short French support messages (non-ASCII: what the native rules leave to the others). CPU time
(process_time) per text, the best of --repeats runs; ratios measured in the same run.

Run:  .venv/bin/python bench/scrub_speed.py [--texts 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loragate.common import scrub as rules  # noqa: E402
from loragate.service.requestlog import scrub as logscrub  # noqa: E402

SHORT = "I'm jane.doe@example.com, call me on +44 20 7946 0958: my order #{n} has not arrived yet, what can I do?"
FILLER = [
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
NON_ASCII = (
    "Bonjour, je m'appelle Zoé (zoe{n}@exemple.fr), mon numéro est +33 6 12 34 {last:02d} 78. "
    "Ma commande n°{n} n'est pas arrivée, pouvez-vous vérifier ?"
)
DETAILS = [
    "You can reach me at sam.lee{n}@example.org.",
    "My direct line is +1 415 555 {n:04d}.",
    "Card on file ends 4242, the invoice id is INV-{n}.",
    "Server 10.0.{a}.{b} returned 502.",
]


def long_text(rng: random.Random, n: int) -> str:
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < 4000:
        pool = DETAILS if rng.random() < 0.06 else FILLER
        parts.append(rng.choice(pool).format(n=n % 10000, a=rng.randint(0, 255), b=rng.randint(0, 255)))
    return " ".join(parts)


class EngineScrubber:
    """scrub's rules, conditions and replacements, with another regex engine matching their PCRE2 form (ASCII)."""

    def __init__(self, compile_rule: Callable[[rules.Rule], Callable[[str], str]]) -> None:
        self.subs = [(compile_rule(rule), rule.need.holds) for rule in rules._RULES]

    def scrub(self, text: str) -> str:
        facts = rules._Facts(text)
        for sub, holds in self.subs:
            if holds(facts):
                text = sub(text)
        return text


def _replacement(rule: rules.Rule, prefix_template: str) -> str | Callable:
    replacement = rule.replacement
    if isinstance(replacement, rules.KeepPrefix):
        return prefix_template + replacement.placeholder
    if isinstance(replacement, str):
        return replacement
    return lambda match: replacement(match.group(0))


def pcre2_rule(rule: rules.Rule) -> Callable[[str], str]:
    import pcre2

    pattern = pcre2.compile(rules.pcre2_rule_pattern(rule), flags=pcre2.I if rule.pattern.flags & re.I else 0, jit=True)
    return functools.partial(pattern.sub, _replacement(rule, "${prefix}"))


def regex_rule(rule: rules.Rule) -> Callable[[str], str]:
    import regex

    pattern = regex.compile(rules.pcre2_rule_pattern(rule), flags=regex.I if rule.pattern.flags & re.I else 0)
    return functools.partial(pattern.sub, _replacement(rule, r"\g<prefix>"))


def per_text_us(scrub_all: Callable[[list[str]], list[str]], texts: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        scrub_all(texts)
        best = min(best, time.process_time() - started)
    return best / len(texts) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "scrub_speed.json")
    args = parser.parse_args()
    native = rules.native_scrubber()
    if native is None:
        print("the native scrubber is not built (scripts/setup.sh installs gcc and libpcre2-dev)", file=sys.stderr)
        return 1
    pcre2_scrubber, regex_scrubber = EngineScrubber(pcre2_rule), EngineScrubber(regex_rule)
    rng = random.Random(7)
    corpora = {
        "short": [SHORT.format(n=1_000_000 + i) for i in range(args.texts)],
        "long": [long_text(rng, i) for i in range(max(50, args.texts // 20))],
    }
    ways: dict[str, Callable[[list[str]], list[str]]] = {
        "python": lambda texts: [rules._python_scrub(text) for text in texts],
        "gated": logscrub._scrub_gated,
        "native": lambda texts: [native.scrub(text) for text in texts],  # type: ignore[misc]
        "pcre2": lambda texts: [pcre2_scrubber.scrub(text) for text in texts],
        "regex": lambda texts: [regex_scrubber.scrub(text) for text in texts],
    }
    results: dict[str, dict] = {}
    for corpus, texts in corpora.items():
        expected = ways["python"](texts)
        assert all(ways[way](texts) == expected for way in ways), f"{corpus}: the ways disagree"
        changed = sum(a != b for a, b in zip(texts, expected))
        us = {way: per_text_us(scrub_all, texts, args.repeats) for way, scrub_all in ways.items()}
        results[corpus] = {
            "texts": len(texts),
            "mean_chars": round(sum(map(len, texts)) / len(texts)),
            "changed": changed,
            "us_per_text": {k: round(v, 2) for k, v in us.items()},
            "native_vs_python": round(us["native"] / us["python"], 3),
            "native_vs_gated": round(us["native"] / us["gated"], 3),
            "native_vs_pcre2": round(us["native"] / us["pcre2"], 3),
            "native_vs_regex": round(us["native"] / us["regex"], 3),
        }
        print(
            f"{corpus:>5} ({len(texts)} texts, {results[corpus]['mean_chars']} chars, {changed} changed): "
            + "  ".join(f"{way} {value:8.2f} us" for way, value in us.items())
            + f"  | native/python {us['native'] / us['python']:.3f}  native/gated {us['native'] / us['gated']:.3f}"
            + f"  native/pcre2 {us['native'] / us['pcre2']:.3f}  native/regex {us['native'] / us['regex']:.3f}"
        )
    # Non-ASCII texts (French support messages): not the native rules' (nor pcre2's or regex's in this loop);
    # the conversion process takes them through the RE2 gates, which this measures against the Python rules.
    texts = [NON_ASCII.format(n=i, last=i % 100) for i in range(args.texts)]
    expected = ways["python"](texts)
    assert ways["gated"](texts) == expected and all(native.scrub(text) is None for text in texts)
    us = {way: per_text_us(ways[way], texts, args.repeats) for way in ("python", "gated")}
    results["non_ascii"] = {
        "texts": len(texts),
        "mean_chars": round(sum(map(len, texts)) / len(texts)),
        "changed": sum(a != b for a, b in zip(texts, expected)),
        "us_per_text": {k: round(v, 2) for k, v in us.items()},
        "gated_vs_python": round(us["gated"] / us["python"], 3),
    }
    print(
        f"non-ASCII ({len(texts)} texts): python {us['python']:8.2f} us  gated {us['gated']:8.2f} us"
        f"  | gated/python {us['gated'] / us['python']:.3f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
