"""Prepacked CPU linear layers: same outputs as torch's, and the loader applies them unless told not to."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deployments.llm.engine import LLMEngine

from deployments.llm.request import EngineRequest
from deployments.llm.prepacked import PackedLinear, _available, prepack_linears
from deployments.types import SamplingParams
from tests.unit.fakes import ByteTokenizer, tiny_llama


def packed_copy(model, dtype):
    plain = copy.deepcopy(model).to(dtype)
    packed = copy.deepcopy(plain)
    n = prepack_linears(packed)
    if n == 0:
        pytest.skip("oneDNN prepacking is not available for this dtype on this machine")
    return plain, packed, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prepacked_model_gives_the_same_logits(dtype):
    plain, packed, n = packed_copy(tiny_llama(), dtype)
    assert n == 2 * 7 + 1                                    # q k v o gate up down per layer, and the head
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert isinstance(packed.lm_head, PackedLinear)
    ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = plain(ids).logits, packed(ids).logits
    if dtype == torch.bfloat16:
        assert torch.equal(a, b)                             # bit-identical, as measured on the dev box
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_engine_on_prepacked_weights_answers_as_on_plain_ones():
    plain, packed, _ = packed_copy(tiny_llama(), torch.bfloat16)

    def answers(model):
        engine = LLMEngine(model, ByteTokenizer(), max_model_len=256, max_num_seqs=8, max_num_batched_tokens=8192,
                           mixed_steps=True, max_prefill_tokens=16)
        reqs = [EngineRequest(f"r{i}", [list(text.encode())], p, [p.max_tokens])
                for i, (text, p) in enumerate([("hello there", SamplingParams(max_tokens=12, temperature=0.0)),
                                               ("a longer prompt than that", SamplingParams(max_tokens=9, seed=3)),
                                               ("x", SamplingParams(max_tokens=14, temperature=0.7, seed=5, n=2))])]
        for r in reqs:
            engine.add(r)
        while engine.has_work():
            engine.step()
        return [[s.output_ids for s in r.seqs] for r in reqs]

    assert answers(packed) == answers(plain)


def test_loader_packs_cpu_models_unless_told_not_to(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from deployments.config import LLMEngineConfig
    from deployments.llm.loader import load_causal_lm
    tiny_llama().save_pretrained(tmp_path)
    vocab = {chr(65 + i): i for i in range(26)} | {"[UNK]": 26}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                            unk_token="[UNK]").save_pretrained(tmp_path)
    packed_copy(tiny_llama(), torch.bfloat16)   # skips where oneDNN cannot pack
    cpu = torch.device("cpu")
    on, _ = load_causal_lm(str(tmp_path), LLMEngineConfig(), cpu, torch.bfloat16)
    off, _ = load_causal_lm(str(tmp_path), LLMEngineConfig(prepack_weights=False), cpu, torch.bfloat16)
    assert isinstance(on.model.layers[0].mlp.down_proj, PackedLinear)
    assert type(off.model.layers[0].mlp.down_proj) is nn.Linear
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        assert torch.equal(on(ids).logits, off(ids).logits)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_layer_with_bias_gives_the_same_output(dtype):   # e.g. Qwen2's q/k/v projections
    torch.manual_seed(0)
    layer = nn.Linear(64, 96, bias=True).to(dtype)
    x = torch.randn(2, 5, 64).to(dtype)
    if not _available(layer):
        pytest.skip("oneDNN prepacking is not available for this dtype on this machine")
    packed = PackedLinear(layer)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), layer(x), rtol=0 if dtype == torch.bfloat16 else 1e-5,
                                   atol=0 if dtype == torch.bfloat16 else 1e-5)
    assert "bias=True" in repr(packed)
