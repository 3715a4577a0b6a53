"""The gate's statistics: paired bootstrap interval and verdicts, token F1."""

import random

import pytest

from loragate.pipeline.gate_stats import paired_bootstrap, token_f1


def sums(rng, n, per_token, noise, tokens):
    return [per_token * t + rng.gauss(0, noise) for t in tokens]


def test_clearly_better_candidate():
    rng = random.Random(1)
    tokens = [rng.randint(20, 60) for _ in range(40)]
    base = sums(rng, 40, 7.6, 5, tokens)
    cand = [b - 0.2 * t + rng.gauss(0, 1) for b, t in zip(base, tokens)]  # paired: same rows, 0.2 nats better
    c = paired_bootstrap(cand, base, tokens, margin=0.02)
    assert c.examples == 40 and c.tokens == sum(tokens)
    assert c.delta == pytest.approx(-0.2, abs=0.02)
    assert c.ci_low < c.delta < c.ci_high < 0 and c.better and c.non_inferior


def test_equal_models_are_not_inferior_but_not_better():
    rng = random.Random(2)
    tokens = [40] * 60
    base = sums(rng, 60, 7.0, 3, tokens)
    cand = [b + rng.gauss(0, 0.2) for b in base]
    c = paired_bootstrap(cand, base, tokens, margin=0.02)
    assert c.ci_low < 0 < c.ci_high <= 0.02
    assert c.non_inferior and not c.better


def test_worse_candidate_fails_and_noise_widens_the_interval():
    rng = random.Random(3)
    tokens = [40] * 30
    base = sums(rng, 30, 7.0, 3, tokens)
    worse = [b + 0.1 * 40 for b in base]
    assert not paired_bootstrap(worse, base, tokens, margin=0.02).non_inferior
    tight = paired_bootstrap([b + rng.gauss(0, 1) for b in base], base, tokens, margin=0.02)
    loose = paired_bootstrap([b + rng.gauss(0, 20) for b in base], base, tokens, margin=0.02)
    assert loose.ci_high - loose.ci_low > 5 * (tight.ci_high - tight.ci_low)
    assert not loose.non_inferior  # too noisy to show non-inferiority: fails rather than guessing


def test_seeded_and_checked():
    tokens, base, cand = [10, 20, 30], [70.0, 140.0, 210.0], [60.0, 130.0, 200.0]
    assert paired_bootstrap(cand, base, tokens, margin=0, seed=5) == paired_bootstrap(
        cand, base, tokens, margin=0, seed=5
    )
    with pytest.raises(ValueError):
        paired_bootstrap([], [], [], margin=0)


def test_token_f1():
    assert token_f1("the covered work", "The covered work") == 1.0
    assert token_f1("covered", "the covered work") == pytest.approx(0.5)
    assert token_f1("nothing alike", "the covered work") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
