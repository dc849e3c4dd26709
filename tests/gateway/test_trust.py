"""The trust ledger: check probabilities, strikes within a window, exclusions that double."""

from __future__ import annotations

import itertools
import random

import pytest

from gateway.trust import TrustConfig, TrustLedger
from sdcn_p2p.errors import ConfigError
from sdcn_p2p.testing import test_identity

P = test_identity(1).peer_id
Q = test_identity(2).peer_id
DAY = 86_400.0


def test_newcomers_are_checked_often_and_a_clean_record_rarely() -> None:
    ledger = TrustLedger()
    assert ledger.probability(P) == 1.0
    seen = []
    for _ in range(40):
        seen.append(ledger.probability(P))
        ledger.passed(P)
    assert seen[:12] == [1.0] * 12 and seen[12] < 1
    assert all(a >= b for a, b in itertools.pairwise(seen))
    assert ledger.probability(P) == 0.02
    assert ledger.is_trusted(P) and not ledger.is_trusted(Q)


def test_an_honest_providers_checks_cost_under_five_percent() -> None:
    """Over a provider's first 2,000 jobs, with every check clean (drawn as the checker does)."""
    ledger = TrustLedger()
    rng = random.Random(1)
    checks = 0
    for _ in range(2_000):
        if rng.random() < ledger.probability(P):
            checks += 1
            ledger.passed(P)
    assert checks / 2_000 < 0.05


def test_two_strikes_within_the_window_exclude_for_a_day_doubling() -> None:
    ledger = TrustLedger()
    assert ledger.struck(P, "first", 0.0) is None
    assert ledger.is_suspect(P) and ledger.probability(P) == 1.0
    for _ in range(10):
        ledger.passed(P)
    assert ledger.probability(P) == 1.0  # the strike stands in the window
    exclusion = ledger.struck(P, "second", 100.0)
    assert exclusion is not None and exclusion.until == 100.0 + DAY
    assert exclusion.reason == "second" and exclusion.count == 1
    assert ledger.is_excluded(P, 100.0 + DAY - 1) and not ledger.is_excluded(P, 100.0 + DAY)
    standing = ledger.standing(P, 200.0)
    assert standing.exclusion == exclusion and standing.strikes == 1  # on probation
    # Back, on probation: one more strike excludes it again, twice as long.
    again = ledger.struck(P, "third", 2 * DAY)
    assert again is not None and again.until == 2 * DAY + 2 * DAY and again.count == 2
    assert not ledger.is_excluded(Q, 0.0) and ledger.exclusion(Q, 0.0) is None


def test_strikes_further_apart_than_the_window_do_not_exclude() -> None:
    ledger = TrustLedger(TrustConfig(window=50))
    ledger.struck(P, "one", 0.0)
    for _ in range(50):
        ledger.passed(P)
    assert not ledger.is_suspect(P)
    assert ledger.struck(P, "two", 1.0) is None
    assert not ledger.is_excluded(P, 1.0)


def test_a_strike_while_excluded_does_not_lengthen_it() -> None:
    ledger = TrustLedger()
    ledger.struck(P, "one", 0.0)
    first = ledger.struck(P, "two", 0.0)
    assert first is not None
    assert ledger.struck(P, "three", 10.0) is None
    assert ledger.exclusion(P, 10.0) == first


def test_the_ledger_is_bounded_and_keeps_exclusions() -> None:
    ledger = TrustLedger(TrustConfig(max_providers=3))
    ledger.struck(P, "one", 0.0)
    ledger.struck(P, "two", 0.0)
    for index in range(3, 10):
        ledger.passed(test_identity(index).peer_id)
    assert len(ledger) == 3
    assert ledger.is_excluded(P, 1.0)


@pytest.mark.parametrize(
    "field",
    [
        {"first_probability": 1.5},
        {"min_probability": -0.1},
        {"window": 0},
        {"strikes": 0},
        {"exclusion": 0},
        {"max_checks": 0},
    ],
)
def test_a_bad_config_names_its_field(field: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(field))):
        TrustConfig(**field)
