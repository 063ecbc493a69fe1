"""Batch invariance on CPU: a request answers the same alone and among others (engine.batch_invariant).

The model is a random Llama in bf16 on prepacked weights, with SmolLM2's MLP width (K=1536 is where
oneDNN's lone-row kernel rounds differently on the dev box). A random model's logits are flat, so
its greedy path flips on the smallest difference: without batch invariance, a burst of staggered
requests drifts from the lone answers (on the dev box: 1 of 12 greedy ones, 4-5 of 12 seeded ones).
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from deployments.llm.engine import LLMEngine

from deployments.llm.request import EngineRequest
from deployments.llm.attention import _rowwise
from deployments.llm.prepacked import PackedLinear, batch_invariant_rows, prepack_linears
from deployments.types import SamplingParams
from tests.unit.fakes import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=192, intermediate_size=1536, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=256, bos_token_id=None, pad_token_id=256)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    if not prepack_linears(m):
        pytest.skip("oneDNN prepacking is not available for bf16 on this machine")
    return m


def engine(model, invariant=True, **kw) -> LLMEngine:
    return LLMEngine(model, ByteTokenizer(), max_model_len=512, max_num_seqs=16, max_num_batched_tokens=1 << 16,
                     mixed_steps=True, batch_invariant=invariant, **kw)


PROMPTS = [("word " * (1 + 3 * i) + str(i)).encode() for i in range(12)]


def params(i: int, sample: bool) -> SamplingParams:
    if sample:
        return SamplingParams(max_tokens=24, temperature=0.9, seed=100 + i, n=2)
    return SamplingParams(max_tokens=24, temperature=0.0)


def outputs(reqs: list[EngineRequest]) -> list[list[list[int]]]:
    return [[s.output_ids for s in r.seqs] for r in reqs]


def alone(model, sample: bool) -> list[list[list[int]]]:
    reqs = []
    for i, p in enumerate(PROMPTS):
        e = engine(model)
        r = EngineRequest(f"a{i}", [list(p)], params(i, sample), [24])
        e.add(r)
        while e.has_work():
            e.step()
        reqs.append(r)
    return outputs(reqs)


def staggered(e: LLMEngine, sample: bool, seed: int) -> list[list[list[int]]]:
    """The same requests in a shuffled, staggered burst: some join between steps, some midway through
    a step's forward (late admission), so rows decode beside others of every length."""
    rng = random.Random(seed)
    reqs = [EngineRequest(f"t{i}", [list(p)], params(i, sample), [24]) for i, p in enumerate(PROMPTS)]
    pending = rng.sample(reqs, len(reqs))
    e.arrivals = lambda: e.add(pending.pop()) if pending and rng.random() < 0.5 else None
    e.add(pending.pop())
    while e.has_work() or pending:
        if pending and rng.random() < 0.5:
            e.add(pending.pop())
        e.step()
    return outputs(reqs)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "seeded-n2"])
def test_a_request_answers_the_same_alone_and_in_a_staggered_burst(model, sample):
    expected = alone(model, sample)
    for seed in range(2):
        assert staggered(engine(model), sample, seed) == expected


def test_an_idle_engine_prefills_in_the_mixed_forward_when_invariant(model):
    e = engine(model)
    e.add(EngineRequest("x", [list(PROMPTS[0])], params(0, False), [24]))
    calls = []
    inner = e._mixed
    e._mixed = lambda groups, plan: calls.append(len(groups)) or inner(groups, plan)
    e.step()
    assert calls == [1] and len(e.batch) == 1


def test_rowwise_attention_gives_each_row_its_lone_result():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 17, 40, 9, 40, 33]
    width = max(lengths)
    q = torch.randn(len(lengths), 2, 3, 64, generator=g).bfloat16()
    k = torch.randn(len(lengths), 2, width, 64, generator=g).bfloat16()
    v = torch.randn(len(lengths), 2, width, 64, generator=g).bfloat16()
    out = _rowwise(q, k, v, lengths, None)
    for i, n in enumerate(lengths):
        lone = F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, width - n:].contiguous(),
                                              v[i:i + 1, :, width - n:].contiguous())
        assert torch.equal(out[i], lone[0])


def test_lone_rows_of_a_linear_layer_match_their_rows_in_a_batch():
    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Linear(1536, 576, bias=False).to(torch.bfloat16))
    if not prepack_linears(holder):
        pytest.skip("oneDNN prepacking is not available for bf16 on this machine")
    layer = holder[0]
    assert isinstance(layer, PackedLinear)
    batch_invariant_rows(holder)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(300, 1536, generator=g) * torch.randn(300, 1536, generator=g).exp()).bfloat16()
    with torch.inference_mode():
        together = layer(x)
        assert all(torch.equal(layer(x[r:r + 1])[0], together[r]) for r in range(300))
        assert torch.equal(layer(x[:7]), together[:7])


def test_invariance_is_on_by_default_where_it_holds_and_refused_where_it_cannot(model):
    from deployments.config import LLMEngineConfig
    from deployments.llm.factory import _batch_invariant
    from tests.unit.fakes import tiny_llama
    cpu = torch.device("cpu")
    assert _batch_invariant(LLMEngineConfig(), model, cpu, mixed=True, sharded=False)
    assert not _batch_invariant(LLMEngineConfig(batch_invariant=False), model, cpu, mixed=True, sharded=False)
    assert not _batch_invariant(LLMEngineConfig(), model, cpu, mixed=False, sharded=False)
    plain = tiny_llama()                                    # fp32, not prepacked
    assert not _batch_invariant(LLMEngineConfig(), plain, cpu, mixed=True, sharded=False)
    with pytest.raises(ValueError, match="needs prepacked weights"):
        _batch_invariant(LLMEngineConfig(batch_invariant=True), plain, cpu, mixed=True, sharded=False)
    with pytest.raises(ValueError, match="runs on CPU only"):
        _batch_invariant(LLMEngineConfig(batch_invariant=True), model, torch.device("cuda"), mixed=True, sharded=False)
