"""Admission, prefill budgets, late-admission budget and KV preemption (scheduler.py), through the engine."""
from __future__ import annotations

import pytest

from deployments.llm.request import EngineRequest
from deployments.types import SamplingParams
from tests.unit.fakes import tiny_llama
from tests.unit.llm_helpers import make_engine, out_ids, req, run_all


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_batch_never_exceeds_max_num_seqs(model):
    engine = make_engine(model, max_num_seqs=3)
    reqs = [req(f"r{i}", "abc", max_tokens=5) for i in range(7)]
    _, _, sizes = run_all(engine, reqs)
    assert max(sizes) == 3
    assert all(r.finished for r in reqs)


def test_kv_budget_limits_admission(model):
    engine = make_engine(model, max_num_batched_tokens=40)
    reqs = [req(f"r{i}", "a" * 10, max_tokens=4) for i in range(4)]
    _, _, sizes = run_all(engine, reqs)
    assert max(sizes) <= 3    # 3 rows x 12 columns fit in 40 tokens, 4 rows do not


def test_prefill_budget_spreads_a_burst_and_never_starves_a_long_prompt(model):
    engine = make_engine(model, max_prefill_tokens=20)
    running = req("run", "abc", max_tokens=60)
    engine.add(running)
    engine.step()
    burst = [req(f"b{i}", "x" * 8, max_tokens=3) for i in range(4)]     # 4 x 8 tokens > 20 per step
    long = req("long", "y" * 60, max_tokens=3)                            # over the budget on its own
    for r in burst + [long]:
        engine.add(r)
    admitted, stalls = [], 0
    while not long.finished:
        before, waiting = len(out_ids(running)), len(engine.scheduler.waiting)
        engine.step()
        if len(engine.scheduler.waiting) < waiting:
            admitted.append(waiting - len(engine.scheduler.waiting))
        stalls = 0 if len(out_ids(running)) > before else stalls + 1
        assert stalls <= 1                    # running streams get a token at least every other step
    assert admitted == [2, 2, 1]              # 2 x 8 tokens fit 20; the 60-token prompt goes alone


def test_prefill_budget_counts_tokens_since_the_last_decode_step(model):
    engine = make_engine(model, max_prefill_tokens=20, mixed_steps=False)
    running = req("run", "abc", max_tokens=60)
    engine.add(running)
    engine.step()

    def step_kind(new: EngineRequest) -> str:
        engine.add(new)
        before = len(out_ids(running))
        engine.step()
        return "decode" if len(out_ids(running)) > before else "prefill"

    a, b, c = (req(x, x * 8, max_tokens=3) for x in "abc")
    assert step_kind(a) == "prefill"
    assert step_kind(b) == "prefill"          # arrived after a small prefill: 16 of 20 tokens, goes at once
    assert step_kind(c) == "decode"           # 24 > 20 since the last decode step: running streams first
    assert not c.seqs[0].output_ids
    engine.step()
    assert c.seqs[0].output_ids               # and then it goes


def test_mixed_steps_spread_a_burst_and_every_step_decodes(model):
    engine = make_engine(model, max_prefill_tokens=20)
    running = req("run", "abc", max_tokens=60)
    engine.add(running)
    engine.step()
    burst = [req(f"b{i}", "x" * 8, max_tokens=3) for i in range(4)]
    long = req("long", "y" * 60, max_tokens=3)
    for r in burst + [long]:
        engine.add(r)
    admitted = []
    while not long.finished:
        before, waiting = len(out_ids(running)), len(engine.scheduler.waiting)
        engine.step()
        admitted.append(waiting - len(engine.scheduler.waiting))
        assert len(out_ids(running)) == before + 1     # the running stream moves every step
    assert [a for a in admitted if a] == [2, 2, 1]


def test_a_late_prompt_waits_when_the_step_has_spent_its_prefill_budget(model):
    engine = make_engine(model, mixed_steps=True, max_prefill_tokens=16)
    engine.add(req("running", "already here"))
    engine.step()
    engine.add(req("first", "a prompt of 20 bytes"))     # admitted at the step's start: the budget is spent
    engine.arrivals = lambda: engine.add(req("late", "another")) if "late" not in engine.requests else None
    touched = {r.request_id for r, _ in engine.step()}
    assert touched == {"running", "first"} and engine.requests["late"].seqs[0].output_ids == []
    assert {r.request_id for r, _ in engine.step()} >= {"late"}   # the next step admits it at its start


@pytest.mark.parametrize("mixed", [False, True])
def test_kv_growth_stays_within_the_budget_by_preempting_and_recomputing(model, mixed):
    budget = 120
    reqs = lambda: [req(f"r{i}", "abcdefgh"[: 3 + i], max_tokens=30) for i in range(4)]   # noqa: E731
    alone, _, _ = run_all(make_engine(model, mixed_steps=mixed), reqs())
    engine = make_engine(model, max_num_batched_tokens=budget, mixed_steps=mixed)
    preempted = []
    real_preempt = engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: (preempted.append(seq.request_id), real_preempt(seq))
    cache_sizes = []
    texts, reasons, _ = run_all(engine, reqs(), on_step=lambda e: cache_sizes.append(
        (len(e.batch), len(e.batch) * e.batch.width)))
    assert preempted                                                  # the budget bit
    assert all(tokens <= budget for rows, tokens in cache_sizes if rows > 1)
    assert texts == alone and all(r == {0: "length"} for r in reasons.values())


def _group(rid: str, length: int, alone: bool = False):
    from deployments.llm.scheduler import PromptGroup
    from deployments.llm.sequence import Sequence
    seq = Sequence(rid, 0, [1] * length, SamplingParams(), 8, None, None, None)
    return PromptGroup(rid, [1] * length, [seq], want_prompt_logprobs=alone)


def test_plans_say_the_mode_and_late_admission_stays_within_the_step_budget():
    import torch

    from deployments.llm.batch import RunningBatch
    from deployments.llm.scheduler import Scheduler
    sched = Scheduler(RunningBatch(torch.device("cpu")), 8, 4096, 10, mixed_steps=True)
    assert sched.schedule().mode == "idle"
    sched.add(_group("a", 6))
    plan = sched.schedule()
    assert plan.mode == "prefill" and [g.request_id for g in plan.prefills] == ["a"]   # no rows: a prefill step
    sched.batch.seqs.append(plan.prefills[0].seqs[0])      # as if it ran (the cache is not consulted here)
    sched.add(_group("b", 4))
    plan = sched.schedule()
    assert plan.mode == "mixed" and plan.prefill_tokens == 4 and [s.request_id for s in plan.decode] == ["a"]
    sched.add(_group("echo", 2, alone=True))
    sched.add(_group("c", 2))
    assert sched.late_prefills(plan) == [] and sched.num_waiting_seqs() == 2   # an echo prompt never joins
    sched.waiting.popleft()
    assert [g.request_id for g in sched.late_prefills(plan)] == ["c"] and plan.prefill_tokens == 6
    sched.add(_group("d", 5))                               # 6 + 5 > max_prefill_tokens (10)
    assert sched.late_prefills(plan) == [] and [g.request_id for g in sched.waiting] == ["d"]
    assert [g.request_id for g in plan.late] == ["c"]
