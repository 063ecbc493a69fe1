"""Output processing (outputs.py) through the engine: stop strings, lengths, logprobs, echo, finish reports."""
from __future__ import annotations

import pytest

from deployments.llm.request import EngineRequest
from deployments.types import SamplingParams
from tests.unit.fakes import ByteTokenizer, tiny_llama
from tests.unit.llm_helpers import make_engine, out_ids, prompt, req, run_all


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


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


def _deltas(engine, reqs):
    for r in reqs:
        engine.add(r)
    out: dict = {}
    while engine.has_work():
        for r, chunk in engine.step():
            out.setdefault(r.request_id, []).extend(chunk.choices)
    return out


def test_max_tokens_0_with_echo_scores_the_prompt_and_samples_nothing(model):
    """Completions' max_tokens 0 + echo + logprobs: each choice is its prompt with the prompt's logprobs
    (how lm-eval-harness scores text), finish_reason "length", no token; a request beside it is unharmed."""
    zero = req("z", "abc", max_tokens=0, logprobs=2, echo=True, n=2)
    one = req("o", "abc", max_tokens=1, logprobs=2, echo=True)
    beside = req("b", "hello", max_tokens=5)
    deltas = _deltas(make_engine(model), [beside, zero, one])
    for i in (0, 1):
        mine = [d for d in deltas["z"] if d.index == i]
        assert "".join(d.text for d in mine) == "abc" and [d.finish_reason for d in mine][-1] == "length"
        lps = [lp for d in mine for lp in d.logprobs or []]
        scored = [lp for d in deltas["o"] for lp in d.logprobs or []][:3]
        assert [(lp.token, lp.logprob) for lp in lps] == [(lp.token, lp.logprob) for lp in scored]
        assert lps[0].logprob is None and len(lps) == 3
    assert out_ids(zero) == [] and out_ids(zero, 1) == [] and zero.usage().completion_tokens == 0
    assert len(out_ids(one)) == 1 and len(out_ids(beside)) == 5


def test_max_tokens_0_without_logprobs_runs_no_forward(model):
    engine = make_engine(model)

    def no_forward(*a, **k):
        raise AssertionError("max_tokens 0 without prompt logprobs needs no forward")
    engine.runner.prefill = engine.runner.prefill_in_chunks = engine.runner.mixed = no_forward
    echo, bare = req("e", "abc", max_tokens=0, echo=True), req("n", "abc", max_tokens=0)
    deltas = _deltas(engine, [echo, bare])
    assert [(d.text, d.finish_reason) for d in deltas["e"]] == [("abc", "length")]
    assert [(d.text, d.finish_reason) for d in deltas["n"]] == [("", "length")]
    assert echo.usage().prompt_tokens == 3 and echo.usage().completion_tokens == 0
    assert not engine.has_work() and len(engine.batch) == 0


def test_context_window_ends_with_length(model):
    engine = make_engine(model, max_model_len=20)
    r = EngineRequest("c", [prompt("x" * 15)], SamplingParams(max_tokens=100, temperature=0), [100])
    run_all(engine, [r])
    assert len(out_ids(r)) == 5 and r.seqs[0].finish_reason == "length"


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


def test_return_token_ids_sends_each_steps_token_even_while_its_text_is_held_back(model):
    """vLLM's return_token_ids: every sampled token goes out in the step that drew it, including the
    ones whose text a possible stop string holds back, and the prompt's ids go on the first delta."""
    probe = req("p", "stop test", max_tokens=20)
    run_all(make_engine(model), [probe])
    full = ByteTokenizer().decode(out_ids(probe))
    k = next(i for i in range(3, len(full) - 1)
             if full.find(full[i:i + 2]) == i and "\ufffd" not in full[i:i + 2] and full[i:i + 2].isascii())
    r = req("s", "stop test", max_tokens=20, stop=[full[k:k + 2]], return_token_ids=True)
    engine = make_engine(model)
    engine.add(r)
    deltas = []
    while engine.has_work():
        deltas += [d for _, chunk in engine.step() for d in chunk.choices]
    assert [len(d.token_ids) for d in deltas] == [1] * len(out_ids(r))     # one per step, held text or not
    assert any(not d.text for d in deltas)                                 # the stop string's first byte was held
    assert [t for d in deltas for t in d.token_ids] == out_ids(r) == out_ids(probe)[:k + 2]
    assert [d.prompt_token_ids for d in deltas] == [prompt("stop test")] + [None] * (len(deltas) - 1)
    assert "".join(d.text for d in deltas) == full[:k]


def test_without_return_token_ids_no_ids_are_sent(model):
    engine = make_engine(model)
    engine.add(req("n2", "abc", max_tokens=4))
    deltas = []
    while engine.has_work():
        deltas += [d for _, chunk in engine.step() for d in chunk.choices]
    assert deltas and all(d.token_ids is None and d.prompt_token_ids is None for d in deltas)


def test_prompt_logprobs_are_each_prompt_tokens_logprob_and_rank_under_one_plain_forward(model, monkeypatch):
    """vLLM's prompt_logprobs over a prompt longer than a scoring chunk: none for the first token, then
    the token's own logprob and rank (1 + the tokens strictly likelier) and the k likeliest others,
    the same as one plain forward over the whole prompt gives; every choice gets them once."""
    import torch
    from deployments.llm import model_runner
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_CHUNK", 8)
    text = "the prompt is scored token by token"
    r = req("p", text, max_tokens=3, prompt_logprobs=3, n=2, temperature=1.0, seed=0)
    deltas = _deltas(make_engine(model), [r])["p"]
    got = {d.index: d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None}
    assert sorted(got) == [0, 1] and sum(d.prompt_logprobs is not None for d in deltas) == 2
    ids = prompt(text)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    entries = got[0]
    assert len(entries) == len(ids) and entries[0] is None
    for i, entry in enumerate(entries[1:]):
        row, own = ref[i], entry[0]
        assert own.token_id == ids[i + 1] and own.decoded_token == chr(ids[i + 1])
        assert abs(own.logprob - float(row[own.token_id])) < 1e-4
        # 1 + the tokens strictly likelier, within float noise (the upper count includes the token itself)
        assert (row > row[own.token_id] + 1e-4).sum() + 1 <= own.rank <= (row > row[own.token_id] - 1e-4).sum()
        others = entry[1:]
        top = row.topk(3)
        assert len(entry) == (3 if own.token_id in top.indices.tolist() else 4)
        assert [e.token_id for e in others] == [t for t in top.indices.tolist() if t != own.token_id]
        assert [e.rank for e in others] == [k + 1 for k, t in enumerate(top.indices.tolist()) if t != own.token_id]


def test_prompt_logprobs_with_max_tokens_0_and_without_echo_still_score_the_prompt(model):
    r = req("z", "abcd", max_tokens=0, prompt_logprobs=0)
    deltas = _deltas(make_engine(model), [r])["z"]
    assert [d.finish_reason for d in deltas] == ["length"] and deltas[0].text == ""
    entries = deltas[0].prompt_logprobs
    assert entries[0] is None and [[e.token_id for e in x] for x in entries[1:]] == [[98], [99], [100]]
    assert deltas[0].logprobs is None     # no echo: the prompt's logprobs go only where vLLM puts them


def test_return_tokens_as_token_ids_names_every_logprob_entry_by_id_and_keeps_its_bytes(model):
    r = req("i", "abc", max_tokens=3, logprobs=2, echo=True, return_tokens_as_token_ids=True)
    deltas = _deltas(make_engine(model), [r])["i"]
    entries = [e for d in deltas for e in d.logprobs or []]
    assert [e.token for e in entries] == [f"token_id:{t}" for t in prompt("abc") + out_ids(r)]
    assert [e.bytes for e in entries[:3]] == [[97], [98], [99]]        # still the tokens' own bytes
    assert all(t.startswith("token_id:") for e in entries[1:] for t, _, _ in e.top) and len(entries[4].top) == 2


def test_continuous_usage_puts_the_usage_so_far_on_every_chunk_before_the_last(model):
    chunks = _chunks(make_engine(model), req("u", "abc", max_tokens=4, continuous_usage=True, n=2, temperature=1.0,
                                             seed=1))
    assert [c.usage is None for c in chunks] == [True] * (len(chunks) - 1) + [False]   # usage still ends the stream
    assert [c.usage_so_far.completion_tokens for c in chunks[:-1]] == [2 * k for k in range(1, len(chunks))]
    assert chunks[-1].usage.completion_tokens == 8 and chunks[0].usage_so_far.prompt_tokens == 3
    assert all(c.usage_so_far is None for c in _chunks(make_engine(model), req("p", "abc", max_tokens=4)))


def _chunks(engine, r):
    engine.add(r)
    chunks = []
    while engine.has_work():
        chunks += [c for _, c in engine.step()]
    return chunks
