"""Every PromQL expression the deploy artifacts ship (dashboard panels, dashboard variables,
recording and alerting rules), made evaluable against a plain Prometheus."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import yaml

from tests.processes import ROOT

DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
RULES = ROOT / "deploy" / "prometheus" / "rules"

# Metric names (recorded series loragate:... excluded: the rules make them).
_METRIC = re.compile(r"\b(loragate_[A-Za-z0-9_]+|vllm:[A-Za-z0-9_:]+|up(?=\s*\{))")


@dataclass(frozen=True)
class Expression:
    source: str  # where it comes from, e.g. "loragate-gateway.json: Requests per second [A]"
    expr: str
    kind: str  # "panel", "variable", "record" or "alert"

    @property
    def metrics(self) -> set[str]:
        return set(_METRIC.findall(strip_strings(self.expr)))


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def rule_groups() -> list[dict]:
    groups = []
    for path in sorted(RULES.glob("*.yml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    return groups


def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions() -> list[Expression]:
    found = []
    for name, dashboard in dashboards().items():
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                found.append(Expression(f"{name}: {panel['title']} [{target['refId']}]", target["expr"], "panel"))
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                found.append(Expression(f"{name}: variable ${variable['name']}", variable["definition"], "variable"))
    return found


def rule_expressions() -> list[Expression]:
    return [
        Expression(
            f"rule {rule.get('alert') or rule.get('record')}", rule["expr"], "alert" if "alert" in rule else "record"
        )
        for group in rule_groups()
        for rule in group["rules"]
    ]


def substitute(expr: str, rate_interval: str = "1m", range_: str = "5m") -> str:
    """Grafana variables -> values a plain Prometheus accepts ("All" is the regex .*)."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
    expr = expr.replace("$__range", range_).replace("${__range}", range_)
    expr = expr.replace("$__interval", "15s")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?", ".*", expr)


def label_values_query(definition: str) -> str:
    """label_values(selector, label) -> a query whose result is non-empty when the variable has values."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", definition)
    if not match:
        raise ValueError(f"unsupported variable query: {definition}")
    return f"count by ({match.group(2)}) ({match.group(1)})"


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")


def boolify(expr: str) -> str:
    """Turn every filtering comparison into a ``bool`` one, so an alert expression returns its
    series (0 or 1) whether or not the threshold is crossed. Label matchers and strings are kept."""
    out, depth, i = [], 0, 0
    while i < len(expr):
        char = expr[i]
        if char == '"':
            end = i + 1
            while expr[end] != '"':
                end += 2 if expr[end] == "\\" else 1
            out.append(expr[i : end + 1])
            i = end + 1
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif depth == 0:
            match = _COMPARISON.match(expr, i)
            if match and not expr.startswith("=~", i) and not expr.startswith("!~", i):
                out.append(f"{match.group(1)} bool")
                i = match.end()
                continue
        out.append(char)
        i += 1
    return "".join(out)
