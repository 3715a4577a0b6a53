"""The Grafana dashboards, as code (stdlib only): each function returns one dashboard's JSON model.

``python deploy/build.py`` writes them to deploy/grafana/dashboards/*.json and copies
them into the Helm chart; tests check the files are up to date and that every
PromQL expression here evaluates against a real Prometheus scraping a real
gateway and vLLM.
"""

from __future__ import annotations

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


class Board:
    """Lays panels out left to right on a 24-column grid, rows of height ``h``."""

    def __init__(self, uid: str, title: str, description: str, variables: list[dict]) -> None:
        self.uid, self.title, self.description, self.variables = uid, title, description, variables
        self.panels: list[dict] = []
        self._x = 0
        self._y = 0
        self._row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
            }
        )
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_h
            self._x, self._row_h = 0, 0

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        unit: str = "short",
        kind: str = "timeseries",
        w: int = 12,
        h: int = 8,
        description: str = "",
        stack: bool = False,
        decimals: int | None = None,
        thresholds: list[tuple[float | None, str]] | None = None,
        mappings: list[dict] | None = None,
        options: dict | None = None,
    ) -> None:
        if self._x + w > 24:
            self._newline()
        defaults: dict = {"unit": unit}
        if decimals is not None:
            defaults["decimals"] = decimals
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 20 if stack else 5,
                "showPoints": "never",
                "spanNulls": True,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            }
        if thresholds:
            defaults["thresholds"] = {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in thresholds]}
        if mappings:
            defaults["mappings"] = mappings
        panel_options = options or {}
        if kind == "timeseries" and not options:
            panel_options = {
                "legend": {
                    "displayMode": "table",
                    "placement": "bottom",
                    "showLegend": True,
                    "calcs": ["mean", "max", "lastNotNull"],
                },
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        self.panels.append(
            {
                "type": kind,
                "title": title,
                "description": description,
                "datasource": DS,
                "gridPos": {"h": h, "w": w, "x": self._x, "y": self._y},
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": panel_options,
                "targets": [
                    {
                        "refId": chr(ord("A") + i),
                        "datasource": DS,
                        "expr": expr,
                        "legendFormat": legend,
                        "range": kind != "table",
                        "instant": kind == "table",
                    }
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
        )
        self._x += w
        self._row_h = max(self._row_h, h)

    def json(self) -> dict:
        for number, panel in enumerate(self.panels, start=1):
            panel["id"] = number
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["loragate"],
            "timezone": "browser",
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"},
            "annotations": {
                "list": [
                    {
                        "builtIn": 1,
                        "type": "dashboard",
                        "name": "Annotations & Alerts",
                        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                        "enable": True,
                        "hide": True,
                        "iconColor": "rgba(0, 211, 255, 1)",
                    }
                ]
            },
            "links": [{"type": "dashboards", "tags": ["loragate"], "asDropdown": True, "title": "loragate"}],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def datasource_variable() -> dict:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def query_variable(name: str, label: str, query: str, *, multi: bool = True) -> dict:
    """A label_values() variable; "All" is the regex ``.*``, so expressions use ``=~"$name"``."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "regex": "",
        "options": [],
    }


def _quantiles(metric: str, selector: str, by: str = "", legend: str = "{{q}}") -> list[tuple[str, str]]:
    group = f"le, {by}" if by else "le"
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            legend.replace("{{q}}", name),
        )
        for name, q in QUANTILES
    ]


def _ratio_or_zero(numerator_selector: str, selector: str, by: str, metric: str = "loragate_requests_total") -> str:
    """A ratio that reads 0 (not "no data") while the numerator's series do not exist yet."""
    total = f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"
    return f"(sum by ({by}) (rate({metric}{{{selector}, {numerator_selector}}}[{RATE}])) or {total} * 0) / {total}"


# ------------------------------------------------------------------------------------------------ gateway


def gateway() -> dict:
    rv = 'route=~"$route", variant=~"$variant"'
    board = Board(
        "loragate-gateway",
        "loragate / Gateway",
        "Traffic, latency, tokens, cost and health of the loragate gateways, per route and variant.",
        [
            datasource_variable(),
            query_variable("route", "Route", "label_values(loragate_requests_total, route)"),
            query_variable("variant", "Variant", 'label_values(loragate_requests_total{route=~"$route"}, variant)'),
        ],
    )
    board.row("Traffic")
    board.panel(
        "Requests per second",
        [(f"sum(rate(loragate_requests_total{{{rv}}}[{RATE}]))", "total")],
        unit="reqps",
        kind="stat",
        w=4,
        h=4,
    )
    board.panel(
        "Error ratio (5xx)",
        [(_ratio_or_zero('status_class="5xx"', rv, "route").replace("sum by (route)", "sum"), "5xx")],
        unit="percentunit",
        kind="stat",
        w=4,
        h=4,
        decimals=2,
        thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
    )
    board.panel(
        "Fallback ratio",
        [
            (
                f"(sum(rate(loragate_fallbacks_total{{{rv}}}[{RATE}])) or vector(0))"
                f" / sum(rate(loragate_requests_total{{{rv}}}[{RATE}]))",
                "fallbacks",
            )
        ],
        unit="percentunit",
        kind="stat",
        w=4,
        h=4,
        decimals=2,
        thresholds=[(None, "green"), (0.02, "orange"), (0.1, "red")],
    )
    board.panel(
        "In flight", [('sum(loragate_requests_in_flight{route=~"$route"})', "in flight")], kind="stat", w=4, h=4
    )
    board.panel(
        "Healthy upstreams",
        [
            ("count(max by (upstream) (loragate_upstream_healthy) == 1) or vector(0)", "healthy"),
            ("count(max by (upstream) (loragate_upstream_healthy))", "known"),
        ],
        kind="stat",
        w=4,
        h=4,
        thresholds=[(None, "red"), (1, "green")],
    )
    board.panel(
        "Savings vs reference API (range)",
        [
            (
                f"sum(increase(loragate_reference_cost_usd_total{{{rv}}}[$__range]))"
                f" - sum(increase(loragate_cost_usd_total{{{rv}}}[$__range]))",
                "saved",
            )
        ],
        unit="currencyUSD",
        kind="stat",
        w=4,
        h=4,
        decimals=2,
    )
    board.panel(
        "Requests by route and variant",
        [(f"sum by (route, variant) (rate(loragate_requests_total{{{rv}}}[{RATE}]))", "{{route}} / {{variant}}")],
        unit="reqps",
        stack=True,
    )
    board.panel(
        "Responses by status class",
        [(f"sum by (status_class) (rate(loragate_requests_total{{{rv}}}[{RATE}]))", "{{status_class}}")],
        unit="reqps",
        stack=True,
    )
    board.panel(
        "Error ratio (5xx) by route and variant",
        [(_ratio_or_zero('status_class="5xx"', rv, "route, variant"), "{{route}} / {{variant}}")],
        unit="percentunit",
    )
    board.panel(
        "Fallbacks by reason",
        [
            (
                f"sum by (route, variant, reason) (rate(loragate_fallbacks_total{{{rv}}}[{RATE}]))",
                "{{route}} / {{variant}}: {{reason}}",
            )
        ],
        unit="reqps",
        stack=True,
        description="Requests moved off their variant before any byte was sent (then served by the fallback chain).",
    )

    board.row("Latency")
    board.panel(
        "Request duration p50 / p95 / p99",
        _quantiles("loragate_request_duration_seconds", rv),
        unit="s",
        description="From request received to last byte sent, all selected routes and variants.",
    )
    board.panel(
        "Request duration p95 by route and variant",
        _quantiles("loragate_request_duration_seconds", rv, "route, variant", "{{route}} / {{variant}}")[1:2],
        unit="s",
    )
    board.panel(
        "Time to first token p50 / p95 / p99 (streams)",
        _quantiles("loragate_time_to_first_token_seconds", rv),
        unit="s",
    )
    board.panel(
        "Time per output token p50 / p95 / p99 (streams)",
        _quantiles("loragate_time_per_output_token_seconds", rv),
        unit="s",
    )

    board.row("Tokens and cost")
    board.panel(
        "Tokens per second",
        [
            (
                f"sum by (route, variant) (rate(loragate_prompt_tokens_total{{{rv}}}[{RATE}]))",
                "prompt {{route}} / {{variant}}",
            ),
            (
                f"sum by (route, variant) (rate(loragate_completion_tokens_total{{{rv}}}[{RATE}]))",
                "completion {{route}} / {{variant}}",
            ),
        ],
        unit="short",
    )
    board.panel(
        "Cost and reference cost per hour",
        [
            (f"sum by (route) (rate(loragate_cost_usd_total{{{rv}}}[{RATE}])) * 3600", "cost {{route}}"),
            (f"sum by (route) (rate(loragate_reference_cost_usd_total{{{rv}}}[{RATE}])) * 3600", "reference {{route}}"),
        ],
        unit="currencyUSD",
        description="USD per hour at this deployment's price vs the reference hosted API's.",
    )
    board.panel(
        "Savings per hour by route",
        [
            (
                f"sum by (route) (rate(loragate_reference_cost_usd_total{{{rv}}}[{RATE}])) * 3600"
                f" - sum by (route) (rate(loragate_cost_usd_total{{{rv}}}[{RATE}])) * 3600",
                "{{route}}",
            )
        ],
        unit="currencyUSD",
    )
    board.panel(
        "Cost per 1K completion tokens by variant",
        [
            (
                f"sum by (route, variant) (rate(loragate_cost_usd_total{{{rv}}}[{RATE}])) * 1000"
                f" / sum by (route, variant) (rate(loragate_completion_tokens_total{{{rv}}}[{RATE}]))",
                "{{route}} / {{variant}}",
            )
        ],
        unit="currencyUSD",
    )

    board.row("Upstreams and adapters")
    board.panel("In flight by route", [('sum by (route) (loragate_requests_in_flight{route=~"$route"})', "{{route}}")])
    board.panel("In flight by upstream", [("sum by (upstream) (loragate_upstream_requests_in_flight)", "{{upstream}}")])
    board.panel(
        "Upstream healthy (seen by any gateway)",
        [("max by (upstream) (loragate_upstream_healthy)", "{{upstream}}")],
        kind="state-timeline",
        mappings=[
            {"type": "value", "options": {"0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}}}
        ],
        options={"showValue": "never", "mergeValues": True},
    )
    board.panel(
        "Circuit breakers",
        [("max by (upstream, adapter) (loragate_circuit_state)", "{{upstream}} {{adapter}}")],
        kind="state-timeline",
        mappings=[
            {
                "type": "value",
                "options": {
                    "0": {"text": "closed", "color": "green"},
                    "1": {"text": "half-open", "color": "orange"},
                    "2": {"text": "open", "color": "red"},
                },
            }
        ],
        options={"showValue": "never", "mergeValues": True},
    )
    board.panel(
        "Adapter loads by result",
        [(f"sum by (adapter, result) (increase(loragate_adapter_loads_total[{RATE}]))", "{{adapter}} {{result}}")],
        stack=True,
    )
    board.panel(
        "Adapter load duration p95",
        _quantiles("loragate_adapter_load_duration_seconds", "", "adapter", "{{adapter}}")[1:2],
        unit="s",
    )

    board.row("Scheduling (which replica serves a request: docs/scheduling.md)")
    board.panel(
        "Engine queue by replica (scraped)",
        [("max by (upstream, state) (loragate_engine_requests)", "{{upstream}} {{state}}")],
        w=8,
        description="Requests running and waiting on each replica's engine at the gateway's last /metrics scrape. "
        "Waiting requests are what the picker weighs most.",
    )
    board.panel(
        "KV-cache usage by replica (scraped)",
        [("max by (upstream) (loragate_engine_kv_cache_usage_ratio)", "{{upstream}}")],
        unit="percentunit",
        w=8,
    )
    board.panel(
        "LoRA adapters by replica",
        [("max by (upstream, state) (loragate_engine_lora_adapters)", "{{upstream}} {{state}}")],
        w=8,
        description="loaded: listed by the engine; running: running or waiting there (scraped); slots: --max-loras.",
    )
    board.panel(
        "Picks by deciding scorer",
        [(f"sum by (scorer) (rate(loragate_picker_decisions_total[{RATE}])) or vector(0)", "{{scorer}}")],
        unit="reqps",
        w=8,
        stack=True,
        description="The scorer that separated the chosen replica from the runner-up: load, adapter (affinity), "
        "prefix (cache affinity), or only (one candidate).",
    )
    board.panel(
        "Adapter placements by reason",
        [
            (
                f"sum by (action, reason) (increase(loragate_adapter_placements_total[{RATE}])) or vector(0)",
                "{{action}} {{reason}}",
            )
        ],
        w=8,
        stack=True,
        description="Loads: first (on no replica yet), spread (its holders were busier than another replica by "
        "more than a load costs). Unloads: lru (idle, at LORAGATE_MAX_ADAPTERS_PER_REPLICA).",
    )
    board.panel(
        "Engine scrape errors",
        [(f"sum by (upstream) (increase(loragate_engine_scrape_errors_total[{RATE}])) or vector(0)", "{{upstream}}")],
        w=8,
        description="Failed /metrics scrapes: the picker falls back to the gateway's own in-flight counts.",
    )

    board.row("Catalog, request log and feedback")
    board.panel(
        "Routes file reloads",
        [(f"sum by (result) (increase(loragate_catalog_reloads_total[{RATE}]))", "{{result}}")],
        w=6,
        stack=True,
    )
    board.panel(
        "Request log records",
        [(f"sum by (result) (rate(loragate_requestlog_records_total[{RATE}]))", "{{result}}")],
        unit="ops",
        w=6,
        stack=True,
    )
    board.panel("Request log queue depth", [("sum(loragate_requestlog_queue_depth)", "queued")], w=6)
    board.panel(
        "Feedback by label",
        [
            (
                f"sum by (route, variant, label) (rate(loragate_feedback_total{{{rv}}}[{RATE}]))",
                "{{route}} / {{variant}}: {{label}}",
            )
        ],
        unit="ops",
        w=6,
        stack=True,
    )

    board.row("Resilience and auth")
    board.panel(
        "Retries, admission and auth rejections (range)",
        [
            ('sum(increase(loragate_upstream_retries_total{route=~"$route"}[$__range])) or vector(0)', "retried"),
            (
                'sum(increase(loragate_admission_rejections_total{route=~"$route"}[$__range])) or vector(0)',
                "rejected at capacity",
            ),
            ("sum(increase(loragate_auth_rejections_total[$__range])) or vector(0)", "auth rejected"),
        ],
        kind="stat",
        w=8,
        h=6,
        description="Zero until the first event of each kind.",
    )
    board.panel(
        "Retries by reason",
        [
            (
                f'sum by (route, reason) (rate(loragate_upstream_retries_total{{route=~"$route"}}[{RATE}]))'
                " or vector(0)",
                "{{route}}: {{reason}}",
            )
        ],
        unit="reqps",
        w=8,
        h=6,
    )
    board.panel(
        "Auth rejections by reason",
        [(f"sum by (reason) (rate(loragate_auth_rejections_total[{RATE}])) or vector(0)", "{{reason}}")],
        unit="reqps",
        w=8,
        h=6,
    )
    board.panel(
        "Waiting for a free slot, by priority class",
        [("sum by (priority) (loragate_admission_waiting_requests)", "{{priority}}")],
        w=6,
        h=6,
        stack=True,
        description="Requests waiting while every replica is at LORAGATE_MAX_IN_FLIGHT_PER_UPSTREAM; freed slots go "
        "to critical first, but each class with a share (LORAGATE_PRIORITY_SHARES) gets at least that share.",
    )
    board.panel(
        "Shed at capacity, by priority class and reason",
        [
            (
                f"sum by (priority, reason) (rate(loragate_admission_shed_total[{RATE}])) or vector(0)",
                "{{priority}}: {{reason}}",
            )
        ],
        unit="reqps",
        w=6,
        h=6,
        description="503s while every replica is full: queue_full, displaced (a higher class took the place of a "
        "waiting sheddable request), deadline. Sheddable ones should go first.",
    )
    board.panel(
        "Wait for a free slot p95, by priority class",
        [
            (
                "histogram_quantile(0.95, sum by (le, priority) "
                f"(rate(loragate_admission_wait_seconds_bucket[{RATE}])))",
                "{{priority}}",
            )
        ],
        unit="s",
        w=6,
        h=6,
        description="Requests that waited only; a request served at once never shows here.",
    )
    board.panel(
        "Slots given by share, by priority class",
        [
            (
                f"sum by (priority) (rate(loragate_admission_share_handoffs_total[{RATE}])) or vector(0)",
                "{{priority}}",
            )
        ],
        unit="reqps",
        w=6,
        h=6,
        description="Freed slots a lower class got on its share's turn while a higher class was waiting "
        "(LORAGATE_PRIORITY_SHARES): what strict priority would have given to the higher class. Steady > 0 "
        "with deadline sheds of critical: raise critical's share.",
    )

    board.row("Limits and replica discovery")
    board.panel(
        "Limits backend (gateway processes)",
        [("sum by (backend) (loragate_limits_backend)", "{{backend}}")],
        w=6,
        stack=True,
        description="Where each gateway process enforces per-key limits: redis (shared), in_process (no Redis "
        "configured), fallback (Redis unreachable: per-process limits), refusing (unreachable, "
        "fail closed).",
    )
    board.panel(
        "Redis round trip p50 / p95 / p99",
        _quantiles("loragate_limits_redis_duration_seconds", ""),
        unit="s",
        w=6,
        description="One limit check in Redis, as the gateway sees it (no data without LORAGATE_LIMITS_URL).",
    )
    board.panel(
        "Limit rejections by key id (top 10)",
        [
            (
                f"topk(10, sum by (key_id, reason) (rate(loragate_limit_rejections_total[{RATE}]))) or vector(0)",
                "{{key_id}}: {{reason}}",
            )
        ],
        unit="reqps",
        w=6,
        description="Requests refused by a key's requests/tokens per minute (key ids from the keys file, never keys).",
    )
    board.panel(
        "Replicas per upstream entry",
        [
            ("max by (upstream) (loragate_upstream_discovered_replicas)", "{{upstream}}"),
            (
                f"sum by (upstream) (increase(loragate_upstream_discovery_errors_total[{RATE}]))",
                "lookup errors {{upstream}}",
            ),
        ],
        w=6,
        description="Addresses each LORAGATE_UPSTREAMS entry resolves to (a host name is re-resolved at every "
        "health interval; an IP is one replica), and failed lookups (the last addresses stay).",
    )
    return board.json()


# ------------------------------------------------------------------------------------------------ rollouts


def rollouts() -> dict:
    r = 'route=~"$route"'
    board = Board(
        "loragate-rollouts",
        "loragate / Rollouts",
        "Progressive delivery of adapter versions: weights, and canary vs stable from the gateway metrics.",
        [
            datasource_variable(),
            query_variable("route", "Route", "label_values(loragate_rollout_weight, route)"),
            query_variable(
                "stable", "Stable variant", 'label_values(loragate_rollout_weight{route=~"$route"}, variant)'
            ),
            query_variable(
                "canary", "Canary variant", 'label_values(loragate_rollout_weight{route=~"$route"}, variant)'
            ),
        ],
    )
    board.row("Weights and traffic")
    board.panel(
        "Rollout weight by variant",
        [(f"max by (route, variant) (loragate_rollout_weight{{{r}}})", "{{route}} / {{variant}}")],
        unit="percentunit",
        stack=True,
        description="The configured share of each variant (from the routes file the gateways watch).",
    )
    board.panel(
        "Served traffic share by variant",
        [
            (
                f"sum by (route, variant) (rate(loragate_requests_total{{{r}}}[{RATE}]))"
                f" / on (route) group_left sum by (route) (rate(loragate_requests_total{{{r}}}[{RATE}]))",
                "{{route}} / {{variant}}",
            )
        ],
        unit="percentunit",
        stack=True,
        description="What the variants actually served, fallbacks included; compare with the weights.",
    )
    board.row("Canary vs stable")
    for title, metric in (
        ("Error ratio (5xx)", None),
        ("Request duration p95", "loragate_request_duration_seconds"),
        ("Time to first token p95", "loragate_time_to_first_token_seconds"),
    ):
        targets = []
        for role in ("stable", "canary"):
            selector = f'{r}, variant=~"${role}"'
            if metric is None:
                expr = _ratio_or_zero('status_class="5xx"', selector, "route, variant")
            else:
                expr = (
                    f"histogram_quantile(0.95, sum by (le, route, variant) "
                    f"(rate({metric}_bucket{{{selector}}}[{RATE}])))"
                )
            targets.append((expr, f"{role}: {{{{route}}}} / {{{{variant}}}}"))
        board.panel(f"{title}: canary vs stable", targets, unit="percentunit" if metric is None else "s", w=8)
    board.panel(
        "Fallbacks: canary vs stable",
        [
            (
                f'sum by (route, variant, reason) (rate(loragate_fallbacks_total{{{r}, variant=~"${role}"}}[{RATE}]))',
                f"{role}: {{{{route}}}} / {{{{variant}}}} {{{{reason}}}}",
            )
            for role in ("stable", "canary")
        ],
        unit="reqps",
        w=8,
    )
    board.panel(
        "Requests: canary vs stable",
        [
            (
                f'sum by (route, variant) (rate(loragate_requests_total{{{r}, variant=~"${role}"}}[{RATE}]))',
                f"{role}: {{{{route}}}} / {{{{variant}}}}",
            )
            for role in ("stable", "canary")
        ],
        unit="reqps",
        w=8,
    )
    board.panel(
        "Negative feedback ratio: canary vs stable",
        [
            (
                _ratio_or_zero(
                    'label=~"bad|incorrect"',
                    f'{r}, variant=~"${role}"',
                    "route, variant",
                    metric="loragate_feedback_total",
                ),
                f"{role}: {{{{route}}}} / {{{{variant}}}}",
            )
            for role in ("stable", "canary")
        ],
        unit="percentunit",
        w=8,
    )

    # The monitor's rollouts (monitoring/rollout/): state machine, steps, decisions, analysis values.
    rc = 'route=~"$route", canary=~"$canary"'
    board.row("Rollout analysis (loragate monitor)")
    board.panel(
        "Rollout state",
        [
            (
                f'sum by (route, canary) (loragate_rollout_state{{{rc}, state="progressing"}}'
                f' or loragate_rollout_state{{{rc}, state="promoted"}} * 2'
                f' or loragate_rollout_state{{{rc}, state="rolled_back"}} * 3)',
                "{{route}} / {{canary}}",
            )
        ],
        kind="state-timeline",
        w=8,
        mappings=[
            {
                "type": "value",
                "options": {
                    "0": {"text": "-", "color": "transparent"},
                    "1": {"text": "progressing", "color": "blue"},
                    "2": {"text": "promoted", "color": "green"},
                    "3": {"text": "rolled back", "color": "red"},
                },
            }
        ],
        options={"showValue": "auto", "mergeValues": True},
        description="progressing: stepping up on passing analyses; promoted: canary 100 %; "
        "rolled back: a failing analysis set the canary to 0 % (alert LoragateRolloutRolledBack).",
    )
    board.panel(
        "Canary step (weight)",
        [(f"max by (route, canary) (loragate_rollout_step{{{rc}}})", "{{route}} / {{canary}}")],
        unit="percent",
        w=8,
        description="The canary weight the monitor wrote to the routes source.",
    )
    board.panel(
        "Rollout decisions",
        [
            (
                f"sum by (route, canary, action) (increase(loragate_rollout_transitions_total{{{rc}}}[{RATE}]))",
                "{{route}} / {{canary}}: {{action}}",
            )
        ],
        stack=True,
        w=8,
        description="step: a passing analysis moved the canary up; hold: inconclusive (not enough data yet "
        "to rule out a regression that matters), failing below failure_limit, or Prometheus unreachable.",
    )
    board.panel(
        "Stalled rollouts (max_holds inconclusive analyses: held for good)",
        [(f"max by (route, canary) (loragate_rollout_stalled{{{rc}}})", "{{route}} / {{canary}}")],
        kind="stat",
        w=6,
        h=4,
        thresholds=[(None, "green"), (1, "red")],
        description="A stalled rollout keeps its step and is never promoted; alert LoragateRolloutStalled. "
        "loragate rollout promote|rollback decides.",
    )
    board.panel(
        "Decision per check (1 pass, 0 inconclusive, -1 fail)",
        [(f"max by (route, canary, check) (loragate_rollout_decision{{{rc}}})", "{{route}} / {{canary}}: {{check}}")],
        w=18,
        h=4,
        description="check=analysis is the whole analysis: it fails when any check fails and passes "
        "when every check passes (monitoring/judge.py).",
    )
    for title, check in (
        ("5xx share, canary - stable", "error_rate"),
        ("Fallback share, canary - stable", "fallback_rate"),
        ("Latency: extra share of canary requests slower than a bucket bound", "latency"),
    ):
        board.panel(
            f"Analysis: {title}",
            [
                (
                    f'max by (route, canary) (loragate_rollout_analysis{{{rc}, check="{check}", figure="{figure}"}})',
                    f"{{{{route}}}} / {{{{canary}}}}: {figure}",
                )
                for figure in ("estimate", "lower", "upper", "min_effect")
            ],
            unit="percentunit",
            w=8,
            description="The difference and its always-valid interval from the last analysis. Fail: lower > 0 "
            "and estimate >= min_effect; pass: upper < min_effect (with min_samples).",
        )
    board.panel(
        "Last analysis, every check and figure",
        [
            (
                f"max by (route, canary, check, figure) (loragate_rollout_analysis{{{rc}}})",
                "{{route}} / {{canary}}: {{check}} {{figure}}",
            )
        ],
        kind="table",
        w=24,
        h=8,
        description="estimate, interval (lower, upper), min_effect, samples (canary) and min_samples per check; "
        "NaN: not measurable in the window (e.g. no latency buckets at or above the floor).",
    )

    # Shadow traffic (service/shadow.py, monitoring/shadow.py): a variant answering copies in the dark.
    board.row("Shadow traffic (before a canary)")
    board.panel(
        "Shadow requests by status",
        [
            (
                f"sum by (route, variant, status_class) (rate(loragate_shadow_requests_total{{{r}}}[{RATE}]))",
                "{{route}} / {{variant}} {{status_class}}",
            )
        ],
        unit="reqps",
        w=8,
        description="Copies answered by the shadow variant (never sent to a client, never in loragate_requests_total).",
    )
    board.panel(
        "Shadow drops by reason",
        [
            (
                f"sum by (route, variant, reason) (rate(loragate_shadow_dropped_total{{{r}}}[{RATE}]))",
                "{{route}} / {{variant}} {{reason}}",
            )
        ],
        unit="reqps",
        w=8,
        stack=True,
        description="same_variant: the request's own variant; max_in_flight; overloaded: requests waiting or no "
        "free slot; unavailable: no closed circuit; deadline: cancelled deadline_s after its primary.",
    )
    board.panel(
        "Shadow latency p95",
        [
            (
                f"histogram_quantile(0.95, sum by (le, route, variant) "
                f"(rate(loragate_shadow_request_duration_seconds_bucket{{{r}}}[{RATE}])))",
                "shadow: {{route}} / {{variant}}",
            )
        ],
        unit="s",
        w=8,
        description="Whole answers (shadows are never streamed); compare with the latency ratio below.",
    )
    board.panel(
        "Shadow vs primary: similarity and the noise floor",
        [
            (
                f"max by (route, variant, primary) (loragate_shadow_similarity_ratio{{{r}}})",
                "similarity: {{route}} / {{variant}} vs {{primary}}",
            ),
            (
                f"max by (route, variant, primary) (loragate_shadow_noise_floor_similarity_ratio{{{r}}})",
                "noise floor: {{primary}} vs itself",
            ),
        ],
        unit="percentunit",
        w=12,
        description="Mean token-overlap F1 of the paired answers (loragate monitor, shadows section); the floor is "
        "the primary variant with itself on repeated prompts. Below the floor: the shadow answers "
        "differently from what the stable variant would.",
    )
    board.panel(
        "Shadow vs primary: error share, latency and length ratios",
        [
            (
                f"max by (route, variant, role) (loragate_shadow_error_ratio{{{r}}})",
                "errors {{role}}: {{route}} / {{variant}}",
            ),
            (
                f"max by (route, variant) (loragate_shadow_latency_ratio{{{r}}})",
                "latency ratio: {{route}} / {{variant}}",
            ),
            (f"max by (route, variant) (loragate_shadow_length_ratio{{{r}}})", "length ratio: {{route}} / {{variant}}"),
        ],
        w=12,
        description="Over the pairs of the monitor's window; ratios are shadow / primary (1 = the same).",
    )
    return board.json()


# ------------------------------------------------------------------------------------------------ drift


def drift() -> dict:
    rv = 'route=~"$route", variant=~"$variant"'
    board = Board(
        "loragate-drift",
        "loragate / Drift and retraining",
        "The monitor's drift reports over request-log windows, and the retraining triggers they fired.",
        [
            datasource_variable(),
            query_variable("route", "Route", "label_values(loragate_drift_share, route)"),
            query_variable("variant", "Variant", 'label_values(loragate_drift_share{route=~"$route"}, variant)'),
        ],
    )
    board.row("Drift")
    board.panel(
        "Drift detected per signal group",
        [(f"max by (route, variant, group) (loragate_drift_detected{{{rv}}})", "{{route}} / {{variant}}: {{group}}")],
        kind="state-timeline",
        mappings=[
            {
                "type": "value",
                "options": {"0": {"text": "no drift", "color": "green"}, "1": {"text": "drift", "color": "red"}},
            }
        ],
        options={"showValue": "never", "mergeValues": True},
        description="inputs: what users send (prompt content, length, script, tokens); outputs: what the "
        "adapter answers (content, length, finish reason, refusals); operations: latency, TTFT, "
        "cost, fallbacks, errors. Each group has its own features and threshold.",
    )
    board.panel(
        "Text content drift (ROC AUC of the domain classifier)",
        [
            (
                f'max by (route, variant, feature) (loragate_drift_feature_score{{{rv}, feature=~".*_content"}})',
                "{{route}} / {{variant}}: {{feature}}",
            )
        ],
        decimals=3,
        w=12,
        description="0.5: the classifier cannot tell the current window from the reference; 1: it always can "
        "(a change of topic). The report names the words and rows that tell them apart.",
    )
    board.panel(
        "Share of drifted features",
        [(f"max by (route, variant) (loragate_drift_share{{{rv}}})", "{{route}} / {{variant}}")],
        unit="percentunit",
    )
    board.panel(
        "Feature drift scores",
        [
            (
                f"max by (route, variant, feature) (loragate_drift_feature_score{{{rv}}})",
                "{{route}} / {{variant}}: {{feature}}",
            )
        ],
        description="Per-feature score of the last report (p-value or distance, depending on the test).",
    )
    board.panel(
        "Time since last drift run",
        [
            (
                f"time() - max by (route, variant) (loragate_drift_last_run_timestamp_seconds{{{rv}}})",
                "{{route}} / {{variant}}",
            )
        ],
        unit="s",
    )
    board.row("Retraining and feedback")
    board.panel(
        "Retraining triggers",
        [
            (
                "sum by (route, variant, action, result) "
                f"(increase(loragate_retraining_triggers_total{{{rv}}}[{RATE}]))",
                "{{route}} / {{variant}}: {{action}} {{result}}",
            )
        ],
        stack=True,
    )
    board.panel(
        "User feedback by label",
        [
            (
                f"sum by (route, variant, label) (rate(loragate_feedback_total{{{rv}}}[{RATE}]))",
                "{{route}} / {{variant}}: {{label}}",
            )
        ],
        unit="ops",
        stack=True,
    )
    return board.json()


# ------------------------------------------------------------------------------------------------ vLLM


def engine() -> dict:
    sel = 'model_name=~"$model_name", instance=~"$instance"'
    board = Board(
        "loragate-vllm",
        "loragate / vLLM engine",
        "The vLLM replicas behind the gateway (vllm:* metrics). vLLM labels everything with the base "
        "model's name, adapter traffic included: per-adapter figures are on the gateway dashboard.",
        [
            datasource_variable(),
            query_variable("model_name", "Model", "label_values(vllm:num_requests_running, model_name)"),
            query_variable(
                "instance", "Replica", 'label_values(vllm:num_requests_running{model_name=~"$model_name"}, instance)'
            ),
        ],
    )
    board.row("Load")
    board.panel("Requests running", [(f"sum by (instance) (vllm:num_requests_running{{{sel}}})", "{{instance}}")], w=8)
    board.panel("Requests waiting", [(f"sum by (instance) (vllm:num_requests_waiting{{{sel}}})", "{{instance}}")], w=8)
    board.panel(
        "KV cache usage",
        [(f"max by (instance) (vllm:kv_cache_usage_perc{{{sel}}})", "{{instance}}")],
        unit="percentunit",
        w=8,
    )
    board.panel(
        "Generation tokens per second",
        [(f"sum by (instance) (rate(vllm:generation_tokens_total{{{sel}}}[{RATE}]))", "{{instance}}")],
        w=8,
    )
    board.panel(
        "Prompt tokens per second",
        [(f"sum by (instance) (rate(vllm:prompt_tokens_total{{{sel}}}[{RATE}]))", "{{instance}}")],
        w=8,
    )
    board.panel(
        "Finished requests by reason",
        [(f"sum by (finished_reason) (rate(vllm:request_success_total{{{sel}}}[{RATE}]))", "{{finished_reason}}")],
        unit="reqps",
        w=8,
        stack=True,
    )
    board.row("Latency")
    board.panel("End-to-end request latency", _quantiles("vllm:e2e_request_latency_seconds", sel), unit="s", w=8)
    board.panel("Time to first token", _quantiles("vllm:time_to_first_token_seconds", sel), unit="s", w=8)
    board.panel("Inter-token latency", _quantiles("vllm:inter_token_latency_seconds", sel), unit="s", w=8)
    board.panel(
        "Queue time p95",
        _quantiles("vllm:request_queue_time_seconds", sel, "instance", "{{instance}}")[1:2],
        unit="s",
        w=8,
    )
    board.panel(
        "Prefill and decode time p95",
        [
            (
                "histogram_quantile(0.95, sum by (le) "
                f"(rate(vllm:request_prefill_time_seconds_bucket{{{sel}}}[{RATE}])))",
                "prefill",
            ),
            (
                "histogram_quantile(0.95, sum by (le) "
                f"(rate(vllm:request_decode_time_seconds_bucket{{{sel}}}[{RATE}])))",
                "decode",
            ),
        ],
        unit="s",
        w=8,
    )
    board.panel(
        "Preemptions per second",
        [(f"sum by (instance) (rate(vllm:num_preemptions_total{{{sel}}}[{RATE}]))", "{{instance}}")],
        w=8,
    )
    board.row("Adapters and cache")
    board.panel(
        "Running and waiting LoRA adapters (latest)",
        [
            (
                'topk by (instance) (1, vllm:lora_requests_info{instance=~"$instance"})',
                "{{instance}} running={{running_lora_adapters}} waiting={{waiting_lora_adapters}}",
            )
        ],
        kind="table",
        w=12,
        description="vllm:lora_requests_info is a timestamp gauge whose labels list the adapters; "
        "the newest series is the current state (stale ones are never removed).",
    )
    board.panel(
        "Prefix cache hit ratio",
        [
            (
                f"sum by (instance) (rate(vllm:prefix_cache_hits_total{{{sel}}}[{RATE}]))"
                f" / sum by (instance) (rate(vllm:prefix_cache_queries_total{{{sel}}}[{RATE}]))",
                "{{instance}}",
            )
        ],
        unit="percentunit",
        w=12,
    )
    return board.json()


DASHBOARDS = {
    "loragate-gateway.json": gateway,
    "loragate-rollouts.json": rollouts,
    "loragate-drift.json": drift,
    "loragate-vllm.json": engine,
}
