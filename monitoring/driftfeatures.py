"""The features of a drift check, from request-log (or reference) rows: token counts, latency, TTFT, cost in
micro-dollars, finish reason, fallback, status class, the prompt's script, a refusal, and the texts themselves
(for Evidently's length and word-count descriptors, and the out-of-vocabulary share computed here).
monitoring/drift.py compares them; the statistical choices are in its docstring."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import pandas as pd

NUMERICAL = ("prompt_tokens", "completion_tokens", "latency_s", "ttft_s", "cost_micro_usd")
CATEGORICAL = ("finish_reason", "fallback", "status_class", "prompt_script", "response_refusal")
TEXT = ("prompt_text", "response_text")
CONTENT = {"prompt_text": "prompt_content", "response_text": "response_content"}  # text -> content feature
# The request-log columns a drift check reads (the reader projects on them: never prompt_messages).
LOG_COLUMNS = (
    "request_id",
    "timestamp",
    "variant",
    "status",
    "fallback",
    "latency_s",
    "ttft_s",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "finish_reason",
    "prompt_text",
    "response_text",
)
# Descriptor columns per text column: (name, kind). Length and word count come from
# Evidently's TextLength and WordCount descriptors; the OOV share is ours.
DESCRIPTORS = {
    "prompt_text": ("prompt_length", "prompt_words", "prompt_oov_share"),
    "response_text": ("response_length", "response_words", "response_oov_share"),
}
_WORD = re.compile(r"[^\W\d_]+")
# A cheap language signal: the script most of a prompt's letters are written in.
SCRIPTS = {
    "latin": "A-Za-z\u00c0-\u024f",
    "cyrillic": "\u0400-\u04ff",
    "greek": "\u0370-\u03ff",
    "arabic": "\u0600-\u06ff",
    "hebrew": "\u0590-\u05ff",
    "devanagari": "\u0900-\u097f",
    "cjk": "\u3040-\u30ff\u4e00-\u9fff",
    "hangul": "\uac00-\ud7af",
}
_REFUSAL = re.compile(
    r"^\W*(?:i(?:'|\u2019)?m sorry|i am sorry|sorry,|i can(?:not|(?:'|\u2019)?t)|i won(?:'|\u2019)?t|"
    r"i(?:'|\u2019)?m (?:not able|unable)|i am (?:not able|unable)|as an ai)",
    re.IGNORECASE,
)


def oov_shares(reference: Iterable[object], current: Iterable[object]) -> tuple[list[float], list[float]]:
    """Share of each row's words that the reference vocabulary lacks.

    Reference rows are scored leave-one-out: a word is unknown to a reference row when no
    other reference row contains it (its document frequency is 1). Rows without words get NaN.
    Vectorised with pandas (explode + value counts): 100k rows take well under a second.
    """
    import pandas as pd

    def tokens(texts: Iterable[object]) -> "pd.Series":
        series = pd.Series(list(texts), dtype="object")
        series = series.where(series.map(lambda v: isinstance(v, str)), "")
        return series.str.lower().str.findall(_WORD.pattern).explode()  # index: row number

    ref_tokens, cur_tokens = tokens(reference), tokens(current)
    ref_pairs = ref_tokens.dropna().reset_index().drop_duplicates()
    doc_freq = ref_pairs.iloc[:, 1].value_counts()

    def shares(toks: "pd.Series", minimum: int, rows: int) -> list[float]:
        present = toks.dropna()
        unknown = present.map(doc_freq).fillna(0).lt(minimum).astype("float64")
        per_row = unknown.groupby(level=0).mean()
        return per_row.reindex(range(rows)).tolist()

    return shares(ref_tokens, 2, len(ref_tokens.index.unique())), shares(cur_tokens, 1, len(cur_tokens.index.unique()))


def prepare(frame: "pd.DataFrame") -> "pd.DataFrame":
    """Request-log (or reference) rows -> the feature frame (text kept for the descriptors)."""
    import pandas as pd

    out = pd.DataFrame(index=frame.index)
    for column in NUMERICAL:
        if column in frame:
            out[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    if "cost_usd" in frame:
        # In micro-dollars: Evidently norms the Wasserstein distance by max(std, 0.001), which
        # would hide any shift in per-request costs of a few millionths of a dollar.
        out["cost_micro_usd"] = pd.to_numeric(frame["cost_usd"], errors="coerce").astype("float64") * 1e6
    if "finish_reason" in frame:
        out["finish_reason"] = frame["finish_reason"].fillna("none").astype(str)
    if "fallback" in frame:
        out["fallback"] = frame["fallback"].map(lambda v: "yes" if isinstance(v, str) and v else "no")
    if "status" in frame and frame["status"].notna().any():
        status = pd.to_numeric(frame["status"], errors="coerce")
        out["status_class"] = (status // 100).map(lambda v: f"{int(v)}xx" if v == v else "none")
    for column in TEXT:
        if column in frame and frame[column].notna().any():
            out[column] = frame[column].where(frame[column].notna(), None)
    if "prompt_text" in out:
        out["prompt_script"] = scripts(out["prompt_text"])
    if "response_text" in out:
        text = out["response_text"]
        out["response_refusal"] = (
            text.where(text.map(lambda v: isinstance(v, str)), "")
            .str[:200]
            .str.contains(_REFUSAL)
            .map({True: "yes", False: "no"})
        )
    return out.reset_index(drop=True)


def scripts(texts: "pd.Series") -> "pd.Series":
    """The script most of each text's letters are in (``SCRIPTS``), ``other`` or ``none``."""
    import pandas as pd

    text = texts.where(texts.map(lambda v: isinstance(v, str)), "")
    counts = pd.DataFrame({name: text.str.count(f"[{chars}]") for name, chars in SCRIPTS.items()})
    letters = text.str.count(_WORD.pattern)
    best = counts.idxmax(axis=1).where(counts.max(axis=1) > 0, "other")
    return best.where(letters > 0, "none")
