"""Scheduler, batching and sampling on a tiny random Llama (no Ray, seconds)."""
from __future__ import annotations

import pytest

from deployments.llm.engine import LLMEngine

from deployments.llm.request import EngineRequest
from deployments.types import SamplingParams
from tests.unit.fakes import ByteTokenizer, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_engine(model, **kw) -> LLMEngine:
    opts = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=8192)
    opts.update(kw)
    return LLMEngine(model, ByteTokenizer(), **opts)


def prompt(text: str) -> list[int]:
    return list(text.encode())


def run_all(engine: LLMEngine, reqs: list[EngineRequest], on_step=None):
    """Runs to completion; returns {request_id: {choice: text}}, finish reasons and per-step batch sizes."""
    for r in reqs:
        engine.add(r)
    texts: dict = {}
    reasons: dict = {}
    sizes = []
    while engine.has_work():
        for req, chunk in engine.step():
            for d in chunk.choices:
                mine = texts.setdefault(req.request_id, {})
                mine[d.index] = mine.get(d.index, "") + d.text
                if d.finish_reason:
                    reasons.setdefault(req.request_id, {})[d.index] = d.finish_reason
        sizes.append(len(engine.batch))
        if on_step:
            on_step(engine)
    return texts, reasons, sizes


def req(rid, text, **params) -> EngineRequest:
    p = SamplingParams(**{"max_tokens": 12, "temperature": 0.0, **params})
    return EngineRequest(rid, [prompt(text)], p, [p.max_tokens])


def out_ids(r: EngineRequest, i: int = 0) -> list[int]:
    return r.seqs[i].output_ids


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


def test_stop_string_is_cut_and_never_streamed(model):
    probe = req("p", "stop test", max_tokens=20)
    run_all(make_engine(model), [probe])
    full = ByteTokenizer().decode(out_ids(probe))
    k = next(i for i in range(3, len(full) - 1)
             if full.find(full[i:i + 2]) == i and "\ufffd" not in full[i:i + 2])
    stop = full[k:k + 2]
    r = req("s", "stop test", max_tokens=20, stop=[stop, "never-seen"])
    texts, reasons, _ = run_all(make_engine(model), [r])     # texts are the streamed deltas joined
    assert texts["s"][0] == full[:k] and reasons["s"][0] == "stop"


def test_max_tokens_gives_length_and_exact_usage(model):
    r = req("m", "count", max_tokens=5)
    engine = make_engine(model)
    engine.add(r)
    chunks = []
    while engine.has_work():
        chunks += [c for _, c in engine.step()]
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == len(prompt("count"))
    assert [d.finish_reason for d in chunks[-1].choices] == ["length"]


def test_logit_bias_bans_and_forces_tokens(model):
    free = req("f", "bias", max_tokens=6)
    run_all(make_engine(model), [free])
    banned = set(out_ids(free))
    r = req("b", "bias", max_tokens=6, logit_bias={t: -100 for t in banned})
    forced = req("x", "bias", max_tokens=6, logit_bias={ord("Z"): 100})
    run_all(make_engine(model), [r, forced])
    assert not banned & set(out_ids(r))
    assert out_ids(forced) == [ord("Z")] * 6


def test_logprobs_are_the_models_own_even_when_logit_bias_forces_the_token(model):
    forced = req("f", "abc", logit_bias={65: 100.0}, logprobs=0, max_tokens=3)
    engine = make_engine(model)
    engine.add(forced)
    entries = []
    while engine.has_work():
        for _, chunk in engine.step():
            entries += [e for d in chunk.choices for e in d.logprobs or []]
    assert out_ids(forced) == [65, 65, 65] and len(entries) == 3
    assert all(e.logprob < -1.0 for e in entries)    # the model's own (~log 1/257), not the biased ~0


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


def test_logprobs_shapes_and_echo(model):
    r = req("l", "abc", max_tokens=4, logprobs=2, echo=True)
    engine = make_engine(model)
    engine.add(r)
    deltas = []
    while engine.has_work():
        deltas += [d for _, c in engine.step() for d in c.choices]
    lps = [lp for d in deltas for lp in (d.logprobs or [])]
    assert len(lps) == 3 + 4                     # prompt (echo) + output
    assert lps[0].logprob is None                 # first prompt token has no logprob
    assert all(len(lp.top) == 2 for lp in lps[1:])
    assert "".join(d.text for d in deltas).startswith("abc")
    out_lp = lps[3:]
    assert all(lp.logprob <= 0 for lp in out_lp)


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


def test_context_window_ends_with_length(model):
    engine = make_engine(model, max_model_len=20)
    r = EngineRequest("c", [prompt("x" * 15)], SamplingParams(max_tokens=100, temperature=0), [100])
    run_all(engine, [r])
    assert len(out_ids(r)) == 5 and r.seqs[0].finish_reason == "length"


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


def staggered(model, mixed: bool, make_reqs, every: int = 2):
    """Adds one request every `every` steps while earlier ones run; returns the requests and the
    number of forward passes."""
    reqs = make_reqs()
    engine = make_engine(model, mixed_steps=mixed, max_prefill_tokens=16)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        pending = list(reqs)
        engine.add(pending.pop(0))
        k = 0
        while engine.has_work() or pending:
            if pending and k % every == 0:
                engine.add(pending.pop(0))
            engine.step()
            assert not any(s.finished for s in engine.batch.seqs)   # finished rows leave at once
            k += 1
    finally:
        handle.remove()
    return reqs, len(calls)


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
    lp = lambda r: [(e.token, round(e.logprob or 0.0, 4)) for e in r.seqs[0].prompt_logprobs]   # noqa: E731
    assert lp(mixed[3]) == lp(alone[3])
    assert mixed[4].finished and len(out_ids(mixed[4])) == 1


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


def _byte_grammar(schema):
    import json as _json

    import xgrammar as xgr
    info = xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b""], xgr.VocabType.RAW, vocab_size=257,
                             stop_token_ids=[256])
    return xgr.GrammarCompiler(info).compile_json_schema(_json.dumps(schema), any_whitespace=False)


def test_response_format_grammar_makes_even_a_random_model_answer_the_schema(model):
    import json as _json
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
              "required": ["color", "ok"], "additionalProperties": False}
    grammar = _byte_grammar(schema)
    reqs = [req("g", "answer in json", max_tokens=60), req("s", "answer", temperature=1.0, seed=3, n=2, max_tokens=60),
            req("free", "no grammar", max_tokens=20)]
    for r in reqs[:2]:
        r.grammar = grammar
    engine = make_engine(model, max_prefill_tokens=8)         # the requests join over several (mixed) steps
    texts, reasons, _ = run_all(engine, reqs)
    for rid, n in (("g", 1), ("s", 2)):
        for i in range(n):
            obj = _json.loads(texts[rid][i])
            assert set(obj) == {"color", "ok"} and obj["color"] in ("red", "green") and isinstance(obj["ok"], bool)
            assert reasons[rid][i] == "stop"
    unconstrained = texts["free"][0]
    try:
        _json.loads(unconstrained)
        constrained_by_chance = True
    except ValueError:
        constrained_by_chance = False
    assert not constrained_by_chance            # the random model's free text is no JSON: the mask did it


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


def test_a_late_prompt_waits_when_the_step_has_spent_its_prefill_budget(model):
    engine = make_engine(model, mixed_steps=True, max_prefill_tokens=16)
    engine.add(req("running", "already here"))
    engine.step()
    engine.add(req("first", "a prompt of 20 bytes"))     # admitted at the step's start: the budget is spent
    engine.arrivals = lambda: engine.add(req("late", "another")) if "late" not in engine.requests else None
    touched = {r.request_id for r, _ in engine.step()}
    assert touched == {"running", "first"} and engine.requests["late"].seqs[0].output_ids == []
    assert {r.request_id for r, _ in engine.step()} >= {"late"}   # the next step admits it at its start


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


def test_running_cache_grows_in_place_and_matches_cat():
    import torch

    from deployments.llm.kv_cache import append_column as _append
    t = torch.randn(3, 2, 5, 4)
    ref = t.clone()
    earlier = None
    for step in range(70):
        col = torch.randn(3, 2, 1, 4)
        before = t
        t = _append(t, col)
        ref = torch.cat([ref, col], dim=2)
        assert torch.equal(t, ref)
        if step == 10:
            earlier, earlier_copy = before, before.clone()
        if step == 20:   # the engine trims leading columns that became padding for every row
            t, ref = t[:, :, 4:], ref[:, :, 4:]
    assert torch.equal(earlier, earlier_copy)   # appends never write inside an older view
    assert t.shape[2] == 5 + 70 - 4


def _echo_logprobs(model, text: str, monkeypatch, chunk: int):
    import deployments.llm.engine as engine_module
    monkeypatch.setattr(engine_module, "PROMPT_LOGPROBS_CHUNK", chunk)
    engine = make_engine(model)
    r = req("e", text, max_tokens=3, logprobs=1, echo=True)
    texts, _, _ = run_all(engine, [r])
    lps = r.seqs[0].prompt_logprobs
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


def test_a_failure_processing_one_requests_token_fails_that_request_only(model, monkeypatch):
    from deployments.llm.detokenizer import StopMatcher
    engine = make_engine(model)
    good, bad = req("good", "hello", max_tokens=6), req("bad", "world", max_tokens=6, stop=["never-seen"])
    real_append = StopMatcher.append

    def poisoned(self, text):
        if self._stops == ["never-seen"]:
            raise KeyError("a bug")
        return real_append(self, text)
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


def test_a_finished_choice_reports_its_finish_once_while_its_siblings_run(model):
    r = req("n3", "hello", temperature=1.0, seed=1, n=3, max_tokens=30, stop=["e"])
    engine = make_engine(model)
    engine.add(r)
    finishes: dict = {}
    while engine.has_work():
        for _, chunk in engine.step():
            for d in chunk.choices:
                if d.finish_reason:
                    finishes[d.index] = finishes.get(d.index, 0) + 1
    assert finishes == {0: 1, 1: 1, 2: 1}
