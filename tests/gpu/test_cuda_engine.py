"""The engine on CUDA with a randomly initialised Llama built from config (weights cannot travel to
GPU machines). Skipped where CUDA is missing, as on the CPU dev boxes and CI."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _random_llama(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      eos_token_id=256, pad_token_id=256)
    return LlamaForCausalLM(cfg).to("cuda", dtype).eval()


def test_engine_runs_on_cuda_in_bf16_and_batching_keeps_greedy_outputs():
    from deployments.llm.engine import LLMEngine
    from deployments.llm.request import EngineRequest
    from deployments.types import SamplingParams
    from tests.unit.fakes import ByteTokenizer
    model = _random_llama(torch.bfloat16)

    def run(prompts):
        engine = LLMEngine(model, ByteTokenizer(), max_model_len=512, max_num_seqs=64,
                           max_num_batched_tokens=1 << 16)
        reqs = [EngineRequest(f"r{i}", [list(p.encode())], SamplingParams(max_tokens=16, temperature=0), [16])
                for i, p in enumerate(prompts)]
        for r in reqs:
            engine.add(r)
        while engine.has_work():
            engine.step()
        return [r.seqs[0].output_ids for r in reqs]

    prompts = [f"prompt number {i} " * (1 + i % 3) for i in range(32)]
    together = run(prompts)
    assert together[5] == run([prompts[5]])[0]
    assert all(len(t) == 16 for t in together)


def test_mixed_steps_on_cuda_match_separate_prefill_steps():
    from deployments.llm.engine import LLMEngine
    from deployments.llm.request import EngineRequest
    from deployments.types import SamplingParams
    from tests.unit.fakes import ByteTokenizer
    model = _random_llama(torch.float32)

    def run(mixed: bool):
        engine = LLMEngine(model, ByteTokenizer(), max_model_len=512, max_num_seqs=64,
                           max_num_batched_tokens=1 << 16, mixed_steps=mixed)
        reqs = [EngineRequest(f"r{i}", [list(f"prompt {i} ".encode() * (1 + i % 4))],
                              SamplingParams(max_tokens=12, temperature=0), [12]) for i in range(24)]
        pending = list(reqs)
        while engine.has_work() or pending:
            if pending:                       # one arrival per step while earlier ones run
                engine.add(pending.pop(0))
            engine.step()
        return [r.seqs[0].output_ids for r in reqs]

    assert run(True) == run(False)


def test_response_format_grammar_masks_logits_on_cuda():
    """xgrammar applies the token bitmask with its CUDA kernel on GPU tensors (CPU code on CPU)."""
    import json

    pytest.importorskip("xgrammar")
    from tests.unit.test_engine import _byte_grammar, make_engine, req, run_all
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
              "required": ["color", "ok"], "additionalProperties": False}
    reqs = [req("g", "json please", max_tokens=60), req("s", "json", temperature=1.0, seed=1, n=3, max_tokens=60)]
    for r in reqs:
        r.grammar = _byte_grammar(schema)
    texts, reasons, _ = run_all(make_engine(_random_llama(torch.bfloat16), max_prefill_tokens=8), reqs)
    for rid, n in (("g", 1), ("s", 3)):
        for i in range(n):
            obj = json.loads(texts[rid][i])
            assert obj["color"] in ("red", "green") and isinstance(obj["ok"], bool) and reasons[rid][i] == "stop"
