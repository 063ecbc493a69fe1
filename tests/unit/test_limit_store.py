"""ingress/limit_store.py: leases from token buckets and concurrency pools, give-backs, limit changes."""
from __future__ import annotations

import pytest

from ingress.limit_store import LimitStore


def test_a_lease_is_what_was_asked_or_all_that_is_left_if_it_covers_the_need():
    s = LimitStore()
    assert s.exchange([("a", "requests", 10, 0.0, 4, 1)]) == [(4, 6)]
    assert s.exchange([("a", "requests", 10, 0.0, 8, 1)]) == [(6, 0)]
    assert s.exchange([("a", "requests", 10, 0.0, 1, 1)]) == [(0, 0)]


def test_nothing_is_granted_below_the_need():
    s = LimitStore()
    s.exchange([("a", "tokens", 100, 0.0, 90, 90)])
    assert s.exchange([("a", "tokens", 100, 0.0, 50, 20)]) == [(0, 10)]


def test_buckets_refill_at_their_rate(monkeypatch):
    import ingress.limit_store as mod
    clock = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: clock[0])
    s = LimitStore()
    s.exchange([("a", "requests", 60, 1.0, 60, 60)])
    clock[0] += 5
    assert s.exchange([("a", "requests", 60, 1.0, 10, 1)]) == [(5, 0)]


def test_give_back_is_capped_and_debts_lower_the_level():
    s = LimitStore()
    s.exchange([("a", "concurrent", 2, 0.0, 2, 1)])
    s.give_back([("a", "concurrent", 5)])
    assert s.exchange([("a", "concurrent", 2, 0.0, 9, 1)]) == [(2, 0)]
    s.give_back([("a", "concurrent", 2), ("a", "concurrent", -1)])   # one slot back, then a debt of one
    assert s.exchange([("a", "concurrent", 2, 0.0, 9, 1)]) == [(1, 0)]


def test_a_changed_limit_keeps_what_was_used():
    s = LimitStore()
    s.exchange([("a", "requests", 10, 0.0, 4, 1)])
    assert s.exchange([("a", "requests", 20, 0.0, 100, 1)]) == [(16, 0)]


@pytest.mark.parametrize("subjects", [1, 50])
def test_full_buckets_are_forgotten(subjects, monkeypatch):
    import ingress.limit_store as mod
    clock = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: clock[0])
    s = LimitStore()
    for i in range(subjects):
        s.exchange([(f"s{i}", "requests", 60, 1.0, 1, 1)])
    clock[0] += 120
    s.exchange([("other", "requests", 60, 1.0, 1, 1)])
    assert set(k[0] for k in s._buckets) == {"other"}
