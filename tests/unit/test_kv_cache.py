"""The running batch's KV cache (kv_cache.py)."""
from __future__ import annotations

import pytest

from tests.unit.fakes import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


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


def _rows_of(kv, layer: int = 0):
    """Each running row's real keys [H, n, D], whichever the layout."""
    from deployments.llm.kv_cache import SlotKVCache
    lengths = kv.mask.sum(dim=1).tolist()
    if isinstance(kv, SlotKVCache):
        return [kv.keys[layer][i, :, :n] for i, n in enumerate(lengths)]
    width = kv.mask.shape[1]
    return [kv.cache.layers[layer].keys[i, :, width - n:] for i, n in enumerate(lengths)]


def test_slot_cache_holds_the_same_rows_as_the_padded_cache():
    import torch
    from transformers import DynamicCache

    from deployments.llm.kv_cache import KVCache, SlotKVCache

    def prefilled(lengths, seed):
        g = torch.Generator().manual_seed(seed)
        width = max(lengths)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
        layers = [(torch.randn(len(lengths), 2, width, 4, generator=g), torch.randn(len(lengths), 2, width, 4, generator=g))
                  for _ in range(2)]
        return DynamicCache(ddp_cache_data=layers), mask
    padded, slots = KVCache(), SlotKVCache(rows=2, columns=4)     # both grow past this capacity
    for kv in (padded, slots):
        kv.merge(*prefilled([3, 5], 0))
        kv.merge(*prefilled([7], 1))
        kv.add_column()
    g = torch.Generator().manual_seed(2)
    k = torch.randn(3, 2, 1, 4, generator=g)
    from deployments.llm.kv_cache import append_column
    layer = padded.cache.layers[0]
    layer.keys = append_column(layer.keys, k)
    slots.append(0, k, k)
    assert slots.width == padded.width == 8 and torch.equal(slots.mask.sum(1), padded.mask.sum(1))
    assert all(torch.equal(a, b) for a, b in zip(_rows_of(padded), _rows_of(slots)))
    for kv in (padded, slots):
        kv.keep_rows(torch.tensor([1, 2]))                        # the first row leaves
    assert slots.width == padded.width and all(torch.equal(a, b) for a, b in zip(_rows_of(padded), _rows_of(slots)))


@pytest.mark.parametrize("invariant", [False, True])
def test_an_engine_on_the_slot_cache_answers_as_on_the_padded_one(model, invariant):
    from tests.unit.llm_helpers import make_engine, req, staggered_outputs

    def make():
        return [req("run", "keep running", max_tokens=24), req("a", "short"), req("b", "a longer prompt here"),
                req("forks", "two ways", n=2, temperature=0.9, seed=5, max_tokens=16),
                req("echo", "echo me", logprobs=1, echo=True, max_tokens=5),
                req("c", "x" * 30, max_tokens=20)]
    kw = dict(mixed_steps=True, batch_invariant=invariant, max_prefill_tokens=16, max_num_batched_tokens=160)
    from deployments.llm.kv_cache import SlotKVCache
    padded = staggered_outputs(make_engine(model, **kw), make())
    engine = make_engine(model, kv_cache="slots", **kw)
    assert isinstance(engine.batch.kv, SlotKVCache)
    slots = staggered_outputs(engine, make())
    assert slots == padded
    assert any(len(v) > 1 for v in padded.values())


def test_the_slot_cache_needs_mixed_steps(model):
    from tests.unit.llm_helpers import make_engine
    with pytest.raises(ValueError, match="needs mixed steps"):
        make_engine(model, mixed_steps=False, kv_cache="slots")
    with pytest.raises(ValueError, match="kv_cache must be"):
        make_engine(model, kv_cache="paged")
