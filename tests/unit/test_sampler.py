"""Sampling (sampler.py) through the engine: seeds, logit_bias, penalties, top_p, and vLLM's extensions."""
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


# ----------------------------------------------------------------------------- vLLM's sampling extensions

def test_min_p_and_top_k_keep_what_vllm_keeps_and_renormalise():
    import torch

    from deployments.llm.sampler import _min_p_and_top_k
    from deployments.types import SamplingParams
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 4)
    rows = [SamplingParams(top_k=2), SamplingParams(min_p=0.5), SamplingParams(top_k=3, min_p=0.6), SamplingParams()]
    kept = _min_p_and_top_k(probs, [type("S", (), {"params": p})() for p in rows])
    assert torch.allclose(kept[0], torch.tensor([4 / 7, 3 / 7, 0, 0]))            # the 2 likeliest
    assert torch.allclose(kept[1], torch.tensor([4 / 9, 3 / 9, 2 / 9, 0]))        # p >= 0.5 x 0.4
    assert torch.allclose(kept[2], torch.tensor([4 / 7, 3 / 7, 0, 0]))            # the stricter of the two
    assert torch.equal(kept[3], probs[3])                                          # neither: untouched


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    import torch

    from deployments.llm.sampler import Sampler
    from deployments.llm.sequence import Sequence
    from deployments.types import SamplingParams

    def seq(**params):
        s = Sequence("r", 0, [0, 9], SamplingParams(**params), 8, detok=None, stop=None)   # 9: outside the head
        s.output_ids.append(1)
        return s
    penalised, other = seq(repetition_penalty=2.0), seq()
    sampler = Sampler(4, torch.device("cpu"))
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5], [2.0, -1.0, 3.0, 0.5]])
    sampler._apply_repetition_penalty(logits, [penalised, other])
    assert logits.tolist() == [[1.0, -2.0, 3.0, 0.5], [2.0, -1.0, 3.0, 0.5]]
    penalised.output_ids.append(2)            # the next step sees the new token too
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    sampler._apply_repetition_penalty(logits, [penalised])
    assert logits.tolist() == [[1.0, -2.0, 1.5, 0.5]]


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_1_and_min_p_1_sample_the_greedy_tokens(model, cut):
    greedy = req("g", "sample me", max_tokens=12)
    cut_off = req("k", "sample me", max_tokens=12, temperature=1.5, seed=1, **cut)
    free = req("f", "sample me", max_tokens=12, temperature=1.5, seed=1)
    run_all(make_engine(model), [greedy, cut_off, free])
    assert out_ids(cut_off) == out_ids(greedy) != out_ids(free)


EOS = 256   # ByteTokenizer's


def _ended(model, **params):
    r = req("r", "stop here", **{"max_tokens": 8, **params})
    texts, reasons, _ = run_all(make_engine(model), [r])
    return out_ids(r), texts["r"][0], reasons["r"][0]


def test_min_tokens_ignore_eos_and_stop_token_ids(model):
    eos_first = {EOS: 100}            # the model's first choice is EOS
    assert _ended(model, logit_bias=eos_first) == ([EOS], "", "stop")
    ids, text, reason = _ended(model, logit_bias=eos_first, min_tokens=5)
    assert len(ids) == 6 and EOS not in ids[:5] and ids[5] == EOS and len(text) == 5 and reason == "stop"
    ids, text, reason = _ended(model, logit_bias=eos_first, ignore_eos=True)
    assert ids == [EOS] * 8 and reason == "length"
    z = ord("Z")
    assert _ended(model, logit_bias={z: 100}, stop_token_ids=[z]) == ([z], "", "stop")   # its text is left out
    ids, text, reason = _ended(model, logit_bias={z: 100, ord("a"): 90}, stop_token_ids=[z], min_tokens=3)
    assert (ids, text, reason) == ([ord("a")] * 3 + [z], "aaa", "stop")   # "a", the next choice, until 3
    assert _ended(model, logit_bias={z: 100}, stop=["Z"]) == ([z], "", "stop")
    # stop strings are looked for from the 3rd token on (its own "Z" is cut), not in the text before it
    assert _ended(model, logit_bias={z: 100}, stop=["Z"], min_tokens=3) == ([z] * 3, "ZZ", "stop")


def test_allowed_token_ids_are_the_only_tokens_drawn(model):
    """vLLM's allowed_token_ids, greedy and sampled: a token the bias forces but the list leaves out is
    never drawn."""
    allowed = [ord(c) for c in "xyz"] + [EOS]
    for params in ({}, {"temperature": 1.5, "seed": 4}):
        ids, _, _ = _ended(model, allowed_token_ids=allowed, logit_bias={ord("Z"): 100}, **params)
        assert ids and set(ids) <= set(allowed)
    free, _, _ = _ended(model, temperature=1.5, seed=4)
    assert not set(free) <= set(allowed)


def test_bad_words_ban_the_token_that_would_complete_them():
    """vLLM's rule over the output so far: a one-token word is always banned; a longer word's last
    token is banned right after its other tokens."""
    from deployments.llm.sequence import Sequence
    from deployments.types import SamplingParams
    seq = Sequence("r", 0, [1], SamplingParams(bad_word_ids=[[5], [1, 2], [3, 4, 6]]), 8, None, None)
    bans = {}
    for out in ([], [1], [3], [3, 4], [9, 3, 4], [3, 4, 7]):
        seq.output_ids = list(out)
        bans[tuple(out)] = seq.bad_word_bans()
    assert bans == {(): [5], (1,): [5, 2], (3,): [5], (3, 4): [5, 6], (9, 3, 4): [5, 6], (3, 4, 7): [5]}


def test_bad_words_are_never_completed_greedy_or_sampled(model):
    """A bias that forces "A" every step, with "AA" a bad word: no two "A"s in a row, the bias' second
    choice "B" in between."""
    a, b = ord("A"), ord("B")
    for params in ({}, {"temperature": 1.0, "seed": 2}):
        ids, _, _ = _ended(model, logit_bias={a: 100, b: 50}, bad_word_ids=[[a, a]], max_tokens=6, **params)
        assert ids == [a, b, a, b, a, b]
    ids, _, _ = _ended(model, logit_bias={a: 100, b: 50}, bad_word_ids=[[a]], max_tokens=3)
    assert ids == [b, b, b]


def test_allowed_token_ids_all_banned_by_bad_words_fail_the_request_instead_of_drawing_another_token(model):
    from deployments.errors import InvalidRequestError
    engine = make_engine(model)
    r = req("d", "abc", allowed_token_ids=[ord("A")], bad_word_ids=[[ord("A")]], max_tokens=3)
    engine.add(r)
    chunks = []
    while engine.has_work():
        chunks += [c for _, c in engine.step()]
    assert chunks == [r.error]       # its one chunk is the error
    assert isinstance(r.error, InvalidRequestError) and r.error.param == "allowed_token_ids"
    assert out_ids(r) == []          # before, token 0 was drawn: outside allowed_token_ids
