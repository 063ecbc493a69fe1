"""LLMEngine (engine.py) on a tiny random Llama: batching, forks, aborts, similar-length prefills, failures."""
from __future__ import annotations

import pytest

from deployments.llm.request import EngineRequest
from deployments.types import SamplingParams
from tests.unit.fakes import tiny_llama
from tests.unit.llm_helpers import make_engine, out_ids, prompt, req, run_all


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_greedy_output_is_the_same_alone_and_in_a_batch_of_mixed_lengths(model):
    alone = req("a", "hello there")
    run_all(make_engine(model), [alone])
    mates = [req(f"m{i}", "x" * (3 + 7 * i)) for i in range(6)]
    together = req("a2", "hello there")
    run_all(make_engine(model), mates[:3] + [together] + mates[3:])
    assert out_ids(together) == out_ids(alone)
    assert len(out_ids(alone)) == 12


def test_sequences_join_while_others_run_and_leave_when_done(model):
    engine = make_engine(model)
    long = req("long", "aaaa", max_tokens=30)
    engine.add(long)
    for _ in range(5):
        engine.step()
    short = req("short", "bb", max_tokens=3)
    engine.add(short)
    engine.step()
    assert len(engine.batch) == 2            # joined at the next step, without waiting for `long`
    while not short.finished:
        engine.step()
    assert len(engine.batch) == 1 and not long.finished   # left at once
    while engine.has_work():
        engine.step()
    assert len(out_ids(long)) == 30 and len(out_ids(short)) == 3


def test_n_prefills_once_and_forks(model):
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        r = req("n", "fork me", n=3, temperature=1.0, seed=1, max_tokens=4)
        texts, _, _ = run_all(make_engine(model), [r])
    finally:
        handle.remove()
    assert sorted(texts["n"]) == [0, 1, 2]
    assert len(calls) == 1 + 4 - 1     # one prefill for the prompt, then one decode per extra token
    assert len({tuple(s.output_ids) for s in r.seqs}) > 1


def test_abort_frees_the_slot(model):
    engine = make_engine(model, max_num_seqs=1)
    a = req("a", "first", max_tokens=100)
    b = req("b", "second", max_tokens=2)
    engine.add(a)
    engine.add(b)
    engine.step()
    assert len(engine.batch) == 1 and engine.scheduler.waiting
    engine.abort("a")
    assert len(engine.batch) == 0
    run_all(engine, [])
    assert b.finished and len(out_ids(b)) == 2 and "a" not in engine.requests


def test_multiple_prompts_map_to_choice_indices(model):
    p = SamplingParams(max_tokens=3, temperature=0, n=2)
    r = EngineRequest("mp", [prompt("one"), prompt("two")], p, [3, 3])
    texts, _, _ = run_all(make_engine(model), [r])
    assert sorted(texts["mp"]) == [0, 1, 2, 3]
    assert texts["mp"][0] == texts["mp"][1]   # greedy: both choices of a prompt agree
    assert r.usage().prompt_tokens == 6 and r.usage().completion_tokens == 12


def test_similar_prompts_prefill_together_and_match_one_at_a_time(model):
    texts = ["alpha beta", "gamma delt", "epsilon z", "eta theta!"]     # lengths 9-10: one padded batch
    solo = [req(f"s{i}", t) for i, t in enumerate(texts)]
    for r in solo:
        run_all(make_engine(model), [r])
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape if i else None))
    try:
        together = [req(f"t{i}", t) for i, t in enumerate(texts)]
        engine = make_engine(model)
        for r in together:
            engine.add(r)
        engine.step()
    finally:
        handle.remove()
    run_all(engine, [])
    assert len(calls) == 1                      # the first step is one prefill forward for all four
    assert [out_ids(r) for r in together] == [out_ids(r) for r in solo]


def test_very_different_lengths_are_not_padded_together(model):
    from deployments.llm.engine import _similar_lengths
    from deployments.llm.scheduler import PromptGroup
    groups = [PromptGroup(str(n), [1] * n, []) for n in (4, 5, 5, 40, 44)]
    assert [[len(g.prompt_ids) for g in c] for c in _similar_lengths(groups)] == [[4, 5, 5], [40, 44]]


def test_a_row_that_finishes_beside_an_echo_prefill_leaves_the_batch(model):
    engine = make_engine(model)
    a = req("a", "abc", max_tokens=3)
    engine.add(a)
    engine.step()
    engine.step()
    engine.add(req("e", "echo me", echo=True, logprobs=1, max_tokens=4))
    engine.step()                     # prefills the echo prompt alone, then decodes a's last token
    assert a.finished and len(out_ids(a)) == 3
    assert [s.request_id for s in engine.batch.seqs] == ["e"]


def test_a_failure_processing_one_requests_token_fails_that_request_only(model, monkeypatch):
    from deployments.llm.detokenizer import StopMatcher
    engine = make_engine(model)
    good, bad = req("good", "hello", max_tokens=6), req("bad", "world", max_tokens=6, stop=["never-seen"])
    real_append = StopMatcher.append

    def poisoned(self, text, **kw):
        if self._stops == ["never-seen"]:
            raise KeyError("a bug")
        return real_append(self, text, **kw)
    monkeypatch.setattr(StopMatcher, "append", poisoned)
    engine.add(good)
    engine.add(bad)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    errors = [(r.request_id, c) for r, c in outputs if isinstance(c, Exception)]
    assert errors and all(rid == "bad" for rid, _ in errors) and isinstance(errors[0][1], KeyError)
    assert len(good.seqs[0].output_ids) == 6 and good.seqs[0].finish_reason == "length"
    assert "bad" not in engine.requests and not engine.has_work()


def test_aborting_a_row_between_steps_moves_the_rows_after_it_and_they_go_on(model):
    """abort() is called between steps (and on a tensor-parallel follower, from its own loop): with
    the slot cache, dropping row 0 moves the rows after it in place, in the step's inference tensors."""
    alone = [req(f"alone{i}", text, max_tokens=10) for i, text in enumerate(["bb", "ccc"])]
    run_all(make_engine(model, kv_cache="slots"), alone)
    engine = make_engine(model, kv_cache="slots")
    rows = [req(f"r{i}", text, max_tokens=10) for i, text in enumerate(["a", "bb", "ccc"])]
    for r in rows:
        engine.add(r)
    for _ in range(3):
        engine.step()
    assert len(engine.batch) == 3
    engine.abort("r0")
    assert len(engine.batch) == 2
    run_all(engine, [])
    assert [out_ids(r) for r in rows[1:]] == [out_ids(r) for r in alone]


def test_random_arrivals_aborts_and_budgets_leave_every_other_request_exact(model):
    """Property (hypothesis): whatever arrives when, under any batch size and KV budget, and whichever
    requests are aborted at any step (waiting, running, forked, preempted), every request not aborted
    gets exactly the tokens it gets alone, greedy or seeded, and the engine ends empty. Aborts are
    called from outside the step, as the engine thread and a tensor-parallel follower call them."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    request = st.fixed_dictionaries({
        "text": st.text(alphabet="abcdefgh xyz", min_size=1, max_size=40),
        "max_tokens": st.integers(1, 20), "n": st.sampled_from([1, 1, 2, 3]),
        "seed": st.one_of(st.none(), st.integers(0, 5)),
        "arrive": st.integers(0, 8), "abort": st.one_of(st.none(), st.integers(0, 14))})

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(reqs=st.lists(request, min_size=1, max_size=7), max_num_seqs=st.sampled_from([2, 4, 16]),
           budget=st.sampled_from([64, 128, 8192]))
    def check(reqs, max_num_seqs, budget):
        def make(i, r):   # seeded sampling must match alone too
            sampled = {"temperature": 1.0, "seed": r["seed"]} if r["seed"] is not None else {}
            return req(f"r{i}", r["text"], max_tokens=r["max_tokens"], n=r["n"], **sampled)
        alone = {}
        for i, r in enumerate(reqs):
            if r["abort"] is None:
                one = make(i, r)
                run_all(make_engine(model), [one])
                alone[i] = [out_ids(one, k) for k in range(r["n"])]
        engine = make_engine(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
        live = {}
        for step in range(200):
            for i, r in enumerate(reqs):
                if r["arrive"] == step:
                    live[i] = make(i, r)
                    engine.add(live[i])
                if r["abort"] is not None and i in live and r["abort"] <= step:
                    engine.abort(f"r{i}")
            if engine.has_work():
                engine.step()
            elif step > 8:
                break
        assert not engine.has_work() and not engine.requests and len(engine.batch) == 0
        for i, outs in alone.items():
            assert [out_ids(live[i], k) for k in range(reqs[i]["n"])] == outs, (i, reqs[i])
    check()
