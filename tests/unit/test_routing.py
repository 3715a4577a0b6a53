import math
import random
from collections import Counter

import pytest

from loragate.common.catalog import parse_catalog
from loragate.service.routing import PinError, choose_variant, sticky_variant


def route(w1: float, w2: float, allow_pin: bool = True):
    return parse_catalog(f"""
routes:
  r:
    allow_pin: {str(allow_pin).lower()}
    variants:
      - {{name: v1, adapter: a1, weight: {w1}}}
      - {{name: v2, adapter: a2, weight: {w2}}}
""").routes["r"]


def test_weighted_draw_matches_weights_within_binomial_tolerance():
    rng = random.Random(7)
    n = 20_000
    r = route(90, 10)
    counts = Counter(choose_variant(r, rng=rng).variant.name for _ in range(n))
    sigma = math.sqrt(n * 0.1 * 0.9)
    assert abs(counts["v2"] - n * 0.1) < 4 * sigma
    assert counts["base"] == 0  # weight 0 is never drawn


def test_sticky_keys_split_by_weight_and_stay_put():
    r = route(90, 10)
    keys = [f"user-{i}" for i in range(20_000)]
    first = {k: sticky_variant(r, k).name for k in keys}
    assert first == {k: sticky_variant(r, k).name for k in keys}
    share = sum(v == "v2" for v in first.values()) / len(keys)
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(keys))


def test_raising_a_weight_moves_only_the_keys_it_must():
    keys = [f"user-{i}" for i in range(20_000)]
    r90, r70 = route(90, 10), route(70, 30)
    before = {k: sticky_variant(r90, k).name for k in keys}
    after = {k: sticky_variant(r70, k).name for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    # Only v1 -> v2 moves, and about 20% of all keys (the minimum that can move).
    assert all(before[k] == "v1" and after[k] == "v2" for k in moved)
    assert abs(len(moved) / len(keys) - 0.2) < 0.015


def test_pin_wins_over_sticky_and_weights():
    r = route(100, 0.0001)
    choice = choose_variant(r, pinned="v2", sticky_value="user-1")
    assert (choice.variant.name, choice.reason) == ("v2", "pinned")
    assert choose_variant(r, pinned="base").variant.is_base
    assert choose_variant(r, sticky_value="user-1").reason == "sticky"
    assert choose_variant(r).reason == "weighted"


def test_bad_or_forbidden_pins_are_errors():
    with pytest.raises(PinError, match="no variant 'v9'"):
        choose_variant(route(1, 1), pinned="v9")
    with pytest.raises(PinError, match="does not allow"):
        choose_variant(route(1, 1, allow_pin=False), pinned="v1")
