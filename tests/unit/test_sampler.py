"""Sampling (sampler.py) through the engine: seeds, logit_bias, penalties, top_p."""
from __future__ import annotations

import pytest

from tests.unit.fakes import tiny_llama
from tests.unit.llm_helpers import make_engine, out_ids, req, run_all


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_seed_reproduces_whatever_the_batch_mates(model):
    a = req("a", "seeded", temperature=1.0, seed=7, max_tokens=10)
    run_all(make_engine(model), [a])
    b = req("b", "seeded", temperature=1.0, seed=7, max_tokens=10)
    mates = [req(f"m{i}", "other" * (i + 1), temperature=1.0, max_tokens=10) for i in range(4)]
    run_all(make_engine(model), mates[:2] + [b] + mates[2:])
    c = req("c", "seeded", temperature=1.0, seed=8, max_tokens=10)
    run_all(make_engine(model), [c])
    assert out_ids(a) == out_ids(b)
    assert out_ids(a) != out_ids(c)


def test_logit_bias_bans_and_forces_tokens(model):
    free = req("f", "bias", max_tokens=6)
    run_all(make_engine(model), [free])
    banned = set(out_ids(free))
    r = req("b", "bias", max_tokens=6, logit_bias={t: -100 for t in banned})
    forced = req("x", "bias", max_tokens=6, logit_bias={ord("Z"): 100})
    run_all(make_engine(model), [r, forced])
    assert not banned & set(out_ids(r))
    assert out_ids(forced) == [ord("Z")] * 6


def test_frequency_penalty_discourages_repeats(model):
    plain = req("p", "repeat", max_tokens=30)
    pen = req("q", "repeat", max_tokens=30, frequency_penalty=2.0, presence_penalty=2.0)
    run_all(make_engine(model), [plain, pen])
    assert len(set(out_ids(pen))) > len(set(out_ids(plain)))


def test_top_p_tiny_is_greedy(model):
    g = req("g", "nucleus", max_tokens=8)
    t = req("t", "nucleus", max_tokens=8, temperature=1.5, top_p=1e-6, seed=3)
    run_all(make_engine(model), [g, t])
    assert out_ids(g) == out_ids(t)
