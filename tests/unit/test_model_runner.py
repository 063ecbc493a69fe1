"""The forwards (model_runner.py) through the engine, on a tiny random Llama: mixed steps, late
admission, echo + logprobs in chunks."""
from __future__ import annotations

import pytest

from tests.unit.fakes import tiny_llama
from tests.unit.llm_helpers import make_engine, out_ids, req, run_all, staggered


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_mixed_steps_admit_prompts_in_the_decode_forward_and_match_separate_steps(model):
    def make():
        return [req(f"r{i}", "prompt %d " % i + "x" * (i % 5), max_tokens=10) for i in range(6)]
    mixed, mixed_calls = staggered(model, True, make)
    separate, separate_calls = staggered(model, False, make)
    assert [out_ids(r) for r in mixed] == [out_ids(r) for r in separate]
    assert all(len(out_ids(r)) == 10 for r in mixed)
    assert mixed_calls < separate_calls      # joining costs no forward pass of its own


def test_mixed_steps_keep_seeds_n_forks_and_prompt_logprobs(model):
    def make():
        return [req("run", "keep running", max_tokens=20),
                req("seeded", "seeded", temperature=1.0, seed=7, max_tokens=8),
                req("fork", "fork me", n=3, temperature=1.0, seed=1, max_tokens=6),
                req("echo", "echo this", echo=True, logprobs=2, max_tokens=3),
                req("one", "just one", max_tokens=1)]
    mixed, _ = staggered(model, True, make, every=1)
    alone = make()
    for r in alone:
        run_all(make_engine(model, mixed_steps=False), [r])
    for a, m in zip(alone, mixed):
        assert [s.output_ids for s in m.seqs] == [s.output_ids for s in a.seqs], m.request_id
    assert len({tuple(s.output_ids) for s in mixed[2].seqs}) > 1
    lp = lambda r: [(e.token, round(e.logprob or 0.0, 4)) for e in r.seqs[0].echo_logprobs]   # noqa: E731
    assert lp(mixed[3]) == lp(alone[3])
    assert mixed[4].finished and len(out_ids(mixed[4])) == 1


def test_models_outside_the_llama_family_use_separate_prefill_steps(model):
    from deployments.llm.model_runner import supports_mixed_steps
    assert supports_mixed_steps(model)
    cfg = model.config
    saved = cfg.sliding_window if hasattr(cfg, "sliding_window") else None
    try:
        cfg.sliding_window = 16
        assert not supports_mixed_steps(model)
        assert not make_engine(model).mixed_steps
    finally:
        cfg.sliding_window = saved


def _echo_logprobs(model, text: str, monkeypatch, chunk: int):
    import deployments.llm.model_runner as model_runner_module
    monkeypatch.setattr(model_runner_module, "PROMPT_LOGPROBS_CHUNK", chunk)
    engine = make_engine(model)
    r = req("e", text, max_tokens=3, logprobs=1, echo=True)
    texts, _, _ = run_all(engine, [r])
    lps = r.seqs[0].echo_logprobs
    return texts["e"][0], lps


def test_echo_logprobs_go_through_the_prompt_in_chunks_and_match_one_pass(model, monkeypatch):
    import torch
    text = "a prompt long enough for several chunks of logits"
    calls = []
    real_forward = type(model).forward

    def counting(self, *a, **kw):
        calls.append(kw["input_ids"].shape[1])
        return real_forward(self, *a, **kw)
    monkeypatch.setattr(type(model), "forward", counting)
    whole_text, whole = _echo_logprobs(model, text, monkeypatch, chunk=10_000)
    calls.clear()
    chunked_text, chunked = _echo_logprobs(model, text, monkeypatch, chunk=8)
    assert max(calls[:-2]) <= 8 and len(calls) >= len(text) // 8   # the prompt never went in whole
    assert whole_text == chunked_text
    assert [e.token for e in whole] == [e.token for e in chunked] and chunked[0].logprob is None
    assert torch.allclose(torch.tensor([e.logprob for e in whole[1:]]), torch.tensor([e.logprob for e in chunked[1:]]),
                          atol=1e-4)
    assert [e.top[0][0] for e in whole[1:]] == [e.top[0][0] for e in chunked[1:]]


def test_a_prompt_that_arrives_during_a_step_joins_it_midway_and_answers_as_alone(model):
    def alone(r):
        engine = make_engine(model, mixed_steps=True)
        run_all(engine, [r])
        return [s.output_ids for s in r.seqs]
    expected = {rid: alone(req(rid, text, **kw)) for rid, text, kw in
                [("late", "joins midway", {}), ("forked", "two of them", {"n": 2, "temperature": 0.8, "seed": 7}),
                 ("running", "already here", {"max_tokens": 20})]}
    engine = make_engine(model, mixed_steps=True)
    running = req("running", "already here", max_tokens=20)
    engine.add(running)
    engine.step()                                       # running alone: prefilled, 1 token
    posted = [req("late", "joins midway"), req("forked", "two of them", n=2, temperature=0.8, seed=7)]
    polls = []

    def arrivals():                                     # the AsyncLLMEngine's inbox, during the next forward
        polls.append(len(posted))
        while posted:
            engine.add(posted.pop(0))
    engine.arrivals = arrivals
    touched = {r.request_id for r, _ in engine.step()}  # a decode step of `running` that they join
    assert polls and touched == {"running", "late", "forked"}
    assert [len(s.output_ids) for s in engine.requests["late"].seqs] == [1]
    assert [len(s.output_ids) for s in engine.requests["forked"].seqs] == [1, 1]
    late, forked = engine.requests["late"], engine.requests["forked"]
    engine.arrivals = None
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in late.seqs] == expected["late"]
    assert [s.output_ids for s in forked.seqs] == expected["forked"]
    assert [s.output_ids for s in running.seqs] == expected["running"]


def test_engines_on_two_threads_may_share_a_model():
    import threading
    shared = tiny_llama()

    def work(mixed):
        engine = make_engine(shared, mixed_steps=mixed)
        reqs = [req(f"{mixed}{i}", "shared model %d " % i + "y" * i, max_tokens=16) for i in range(6)]
        run_all(engine, reqs)
        return [out_ids(r) for r in reqs]
    expected = {m: work(m) for m in (True, False)}
    got, errors = {}, []

    def run(mixed):
        try:
            for _ in range(3):
                assert work(mixed) == expected[mixed]
            got[mixed] = True
        except Exception as exc:   # reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(m,)) for m in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == {True: True, False: True}
