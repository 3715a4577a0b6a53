"""Semantic drift of a text column: can a classifier tell the current window from the reference?

A domain classifier on TF-IDF features (word uni- and bigrams), offline on CPU with scikit-learn:
the rows of both windows are labelled reference/current, a logistic regression is fitted on
one half (stratified) and scores the other half. When the windows come from one population
the labels are noise and the ROC AUC of the held-out scores stays near 0.5; a change of topic
lets the classifier separate them even when lengths do not change.

Verdict: drift when the AUC is above ``max(min_auc, critical AUC)``. The critical AUC is the
one-sided Mann-Whitney bound at ``alpha`` for the held-out sample sizes (normal approximation),
so small windows need a clear separation and large windows cannot flag a difference too
small to matter (``min_auc``, an effect size). bench/drift_topics.py measures the
false-positive and detection rates on real questions and the sample-size limits.

What changed: a model fitted on all rows gives the terms that most push a row towards the
current window or towards the reference (with the share of rows holding each term in each
window), and the held-out rows the classifier found most typical of each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

# Words of two letters or more (no digits or underscores): numbers and ids are not topics.
TOKEN_PATTERN = r"(?u)\b[^\W\d_]{2,}\b"


@dataclass(frozen=True)
class TermShift:
    term: str
    weight: float  # > 0: pushes towards the current window, < 0: towards the reference
    reference_share: float  # share of reference rows holding the term
    current_share: float


@dataclass
class ContentDrift:
    column: str
    reference_rows: int  # rows used (after the max_rows sample)
    current_rows: int
    auc: float
    p_value: float
    threshold: float  # drift when auc > threshold
    drifted: bool
    current_terms: list[TermShift] = field(default_factory=list)
    reference_terms: list[TermShift] = field(default_factory=list)
    current_examples: list[str] = field(default_factory=list)
    reference_examples: list[str] = field(default_factory=list)


def critical_auc(n_reference: int, n_current: int, alpha: float) -> float:
    """The AUC a random classifier exceeds with probability ``alpha`` (Mann-Whitney, normal approx.)."""
    from scipy.stats import norm

    sd = math.sqrt((n_reference + n_current + 1) / (12.0 * n_reference * n_current))
    return 0.5 + float(norm.ppf(1 - alpha)) * sd


def _texts(values: Sequence[object]) -> list[str]:
    return [v for v in values if isinstance(v, str) and v.strip()]


def _sample(texts: list[str], max_rows: int, rng) -> list[str]:
    if len(texts) <= max_rows:
        return texts
    return [texts[i] for i in sorted(rng.choice(len(texts), max_rows, replace=False))]


def content_drift(
    reference: Sequence[object],
    current: Sequence[object],
    *,
    column: str = "text",
    alpha: float = 0.01,
    min_auc: float = 0.55,
    max_rows: int = 5000,
    min_rows: int = 30,
    top_terms: int = 10,
    examples: int = 3,
    example_chars: int = 200,
    seed: int = 0,
) -> ContentDrift | None:
    """Compare the content of two windows of texts; None when either has fewer than ``min_rows`` texts."""
    import numpy as np
    from scipy.stats import mannwhitneyu
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    ref, cur = _sample(_texts(reference), max_rows, rng), _sample(_texts(current), max_rows, rng)
    if len(ref) < min_rows or len(cur) < min_rows:
        return None
    texts = ref + cur
    labels = np.r_[np.zeros(len(ref), dtype=int), np.ones(len(cur), dtype=int)]
    vectorizer = TfidfVectorizer(
        token_pattern=TOKEN_PATTERN,
        ngram_range=(1, 2),
        sublinear_tf=True,
        min_df=2,
        max_features=50_000,
        dtype=np.float32,
    )
    try:
        features = vectorizer.fit_transform(texts)  # label-free: fitting it on all rows leaks no label
    except ValueError:  # no term in two rows: nothing to tell the windows apart by
        features = None
    if features is None or features.shape[1] == 0:
        return ContentDrift(column, len(ref), len(cur), 0.5, 1.0, critical_auc(len(ref), len(cur), alpha), False)

    def model():
        return LogisticRegression(C=1.0, solver="liblinear", class_weight="balanced")

    # Fit on one half, test on the other: given the fitted model, the held-out rows' labels are
    # exchangeable under one population, so the Mann-Whitney test on their scores is exact.
    # (k-fold cross-validation scores every row but its folds share training rows: its AUC's
    # null spread was measured 1.3-1.5x the Mann-Whitney one, i.e. no more power for a valid test.)
    train, test = train_test_split(np.arange(len(texts)), test_size=0.5, stratify=labels, random_state=seed)
    scores = np.full(len(texts), np.nan)
    scores[test] = model().fit(features[train], labels[train]).decision_function(features[test])
    held_cur, held_ref = scores[test][labels[test] == 1], scores[test][labels[test] == 0]
    u, p_value = mannwhitneyu(held_cur, held_ref, alternative="greater")
    auc = float(u) / (len(held_cur) * len(held_ref))
    threshold = max(min_auc, critical_auc(len(held_ref), len(held_cur), alpha))
    result = ContentDrift(column, len(ref), len(cur), auc, float(p_value), threshold, auc > threshold)

    full = model().fit(features, labels)
    weights = full.coef_[0]
    present = features > 0
    ref_share = np.asarray(present[: len(ref)].mean(axis=0)).ravel()
    cur_share = np.asarray(present[len(ref) :].mean(axis=0)).ravel()
    terms = vectorizer.get_feature_names_out()

    def shifts(order) -> list[TermShift]:
        # The model uses every term; the report names topic words (not "the", "can you").
        shown = [i for i in order if not set(str(terms[i]).split()) <= ENGLISH_STOP_WORDS][:top_terms]
        return [
            TermShift(
                str(terms[i]), round(float(weights[i]), 4), round(float(ref_share[i]), 4), round(float(cur_share[i]), 4)
            )
            for i in shown
        ]

    order = np.argsort(weights)
    result.current_terms = shifts([i for i in order[::-1] if weights[i] > 0])
    result.reference_terms = shifts([i for i in order if weights[i] < 0])

    def typical(side: int, descending: bool) -> list[str]:
        idx = np.flatnonzero((labels == side) & ~np.isnan(scores))
        idx = idx[np.argsort(scores[idx])]
        out: list[str] = []
        for i in idx[::-1] if descending else idx:
            text = " ".join(texts[i].split())[:example_chars]
            if text not in out:
                out.append(text)
            if len(out) >= examples:
                break
        return out

    result.current_examples = typical(1, True)
    result.reference_examples = typical(0, False)
    return result
