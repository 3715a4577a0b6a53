"""The HTML report of a drift check: Evidently's, with loragate's sections on top (the verdict per signal group,
what changed in the texts, the Prometheus series), written whole."""

from __future__ import annotations

import re
from html import escape
from pathlib import Path
from typing import Any

from loragate.common.atomicio import atomic_write
from loragate.monitoring.driftresult import DriftResult, SeriesComparison
from loragate.monitoring.textdrift import ContentDrift, TermShift


def write_report(html: Path, snapshot: Any, result: DriftResult) -> None:
    """``result``'s sections over ``snapshot`` (an Evidently report, or None), at ``html``."""
    sections = _groups_section(result) + _content_section(result.content)
    if result.prometheus:
        sections += _series_section(result.prometheus)
    _write_html(html, snapshot, sections)


def _write_html(html: Path, snapshot: Any, sections: str) -> None:
    """Evidently's report with loragate's own sections on top (its verdict, not Evidently's pooled
    dataset banner, is the one that counts), written whole: a reader never sees half a report."""
    text = "<html><body></body></html>"
    if snapshot is not None:
        scratch = html.with_name(html.name + ".evidently.tmp")
        try:
            snapshot.save_html(str(scratch))
            text = scratch.read_text()
        finally:
            scratch.unlink(missing_ok=True)
    body = re.search(r"<body[^>]*>", text)
    at = body.end() if body else 0
    atomic_write(html, text[:at] + sections + text[at:])


def _series_section(series: list[SeriesComparison]) -> str:
    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:.6g}"

    rows = "".join(
        f"<tr><td>{s.series}</td><td>{cell(s.reference_mean)}</td><td>{cell(s.current_mean)}</td>"
        f"<td>{cell(s.ratio)}</td><td>{s.reference_points}/{s.current_points}</td></tr>"
        for s in series
    )
    return (
        "<section style='font-family:sans-serif;margin:24px'><h3>Prometheus series (mean per step)</h3>"
        "<table border=1 cellpadding=4><tr><th>series</th><th>reference</th><th>current</th>"
        f"<th>ratio</th><th>points</th></tr>{rows}</table></section>"
    )


def _groups_section(result: DriftResult) -> str:
    rows = "".join(
        f"<tr><td>{g.group}</td><td><b>{g.status}</b></td><td>{escape(g.reason)}</td>"
        f"<td>{escape(', '.join(g.drifted_features)) or '-'}</td></tr>"
        for g in result.groups
    )
    drifted = ", ".join(g.group for g in result.groups if g.status == "drift")
    verdict = f"drift in {drifted}" if drifted else "no drift"
    return (
        "<section style='font-family:sans-serif;margin:24px'>"
        f"<h2>loragate verdict: {escape(verdict)}</h2>"
        "<p>Per signal group, below; Evidently's pooled &quot;Dataset Drift&quot; banner further down "
        "counts every column alike and is not the verdict.</p><h3>Verdict per signal group</h3>"
        "<table border=1 cellpadding=4><tr><th>group</th><th>status</th><th>why</th><th>drifted</th></tr>"
        f"{rows}</table></section>"
    )


def _content_section(content: list[ContentDrift]) -> str:
    parts = []
    for c in content:

        def terms(items: list[TermShift]) -> str:
            return "".join(
                f"<tr><td>{escape(t.term)}</td><td>{t.weight:+.2f}</td><td>{t.reference_share:.1%}</td>"
                f"<td>{t.current_share:.1%}</td></tr>"
                for t in items
            )

        def examples(items: list[str]) -> str:
            return "".join(f"<li>{escape(e)}</li>" for e in items)

        head = "<tr><th>term</th><th>weight</th><th>reference rows</th><th>current rows</th></tr>"
        parts.append(
            f"<h3>Text content: {c.column} ({'DRIFT' if c.drifted else 'no drift'})</h3>"
            f"<p>Domain classifier (TF-IDF, logistic regression fitted on one half of the rows, scored on the "
            f"other): held-out ROC AUC {c.auc:.3f}, "
            f"drift above {c.threshold:.3f}; p-value {c.p_value:.3g}; {c.reference_rows} reference and "
            f"{c.current_rows} current rows.</p>"
            f"<h4>Terms most typical of the current window</h4><table border=1 cellpadding=4>{head}"
            f"{terms(c.current_terms)}</table>"
            f"<h4>Terms most typical of the reference</h4><table border=1 cellpadding=4>{head}"
            f"{terms(c.reference_terms)}</table>"
            f"<h4>Current rows most unlike the reference</h4><ul>{examples(c.current_examples)}</ul>"
            f"<h4>Reference rows most unlike the current window</h4><ul>{examples(c.reference_examples)}</ul>"
        )
    return f"<section style='font-family:sans-serif;margin:24px'>{''.join(parts)}</section>" if parts else ""
