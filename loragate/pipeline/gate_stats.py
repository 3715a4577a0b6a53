"""The gate's statistics: a paired bootstrap of the NLL-per-token difference, and token F1."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Comparison:
    examples: int
    tokens: int
    candidate_nll: float  # nats per answer token, pooled over examples
    baseline_nll: float
    delta: float  # candidate - baseline: negative = the candidate predicts the answers better
    ci_low: float
    ci_high: float
    confidence: float
    margin: float

    @property
    def non_inferior(self) -> bool:
        """The whole interval lies below the margin: the candidate is not worse by more than it."""
        return self.ci_high <= self.margin

    @property
    def better(self) -> bool:
        return self.ci_high < 0


def paired_bootstrap(
    candidate: list[float],
    baseline: list[float],
    tokens: list[int],
    *,
    margin: float,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Comparison:
    """``candidate[i]``/``baseline[i]``: summed NLL of example i's answer tokens; ``tokens[i]``: their count.

    Examples (not tokens) are resampled, both models together (paired): the interval is the
    percentile interval of the pooled per-token difference.
    """
    n = len(tokens)
    if n == 0 or len(candidate) != n or len(baseline) != n:
        raise ValueError("need the same non-zero number of candidate, baseline and token counts")
    total = sum(tokens)
    diffs = [c - b for c, b in zip(candidate, baseline)]
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        stats.append(sum(diffs[i] for i in picks) / max(1, sum(tokens[i] for i in picks)))
    stats.sort()
    tail = (1 - confidence) / 2
    low = stats[min(resamples - 1, int(tail * resamples))]
    high = stats[min(resamples - 1, int((1 - tail) * resamples))]
    return Comparison(
        n, total, sum(candidate) / total, sum(baseline) / total, sum(diffs) / total, low, high, confidence, margin
    )


_WORD = re.compile(r"\w+", re.UNICODE)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over lower-cased words."""
    pred, ref = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
