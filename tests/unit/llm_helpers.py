"""Shared helpers for the LLM unit tests: an engine over a given model, requests, a run loop, and an
LLMServer over the real engine on a tiny model (test_llm_server.py, test_async_engine.py)."""
from __future__ import annotations

import functools

from deployments.config import ChatModelConfig
from deployments.llm.async_engine import AsyncLLMEngine
from deployments.llm.built_engine import BuiltEngine
from deployments.llm.engine import LLMEngine
from deployments.llm.request import EngineRequest
from deployments.llm.server import LLMServer
from deployments.types import GenerateRequest, SamplingParams
from tests.unit.fakes import ByteTokenizer, tiny_llama


def make_engine(model, **kw) -> LLMEngine:
    """The engine as the factory builds it by default: the slot KV cache where mixed steps run."""
    opts = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=8192)
    opts.update(kw)
    opts.setdefault("kv_cache", default_kv_cache(model, opts.get("mixed_steps", True)))
    return LLMEngine(model, ByteTokenizer(), **opts)


def default_kv_cache(model, mixed_steps: bool = True) -> str:
    from deployments.config import LLMEngineConfig
    from deployments.llm.factory import kv_cache_layout
    return kv_cache_layout(LLMEngineConfig(), model, mixed_steps)


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


def staggered_outputs(engine: LLMEngine, reqs: list[EngineRequest], every: int = 2) -> dict:
    """Adds one request every `every` steps while earlier ones run, with late admission on;
    returns {request_id: [each choice's output ids, finish reason, logprob tokens]}."""
    pending = list(reqs)
    engine.arrivals = lambda: None
    k = 0
    while engine.has_work() or pending:
        if pending and k % every == 0:
            engine.add(pending.pop(0))
        engine.step()
        k += 1
    return {r.request_id: [(s.output_ids, s.finish_reason, [e.token for e in s.echo_logprobs or []])
                           for s in r.seqs] for r in reqs}


@functools.cache
def server_model():
    """The tiny Llama that the LLMServer and AsyncLLMEngine tests share, built once."""
    return tiny_llama()


def make_server(max_num_seqs=4, max_waiting=4, max_model_len=64, kv_cache=None, **engine) -> LLMServer:
    cfg = ChatModelConfig(id="tiny", kind="chat", source="x",
                          engine={"max_num_seqs": max_num_seqs, "max_waiting": max_waiting, **engine})

    def factory(_cfg):
        tok = ByteTokenizer()
        engine = LLMEngine(server_model(), tok, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=4096, kv_cache=kv_cache or default_kv_cache(server_model()))
        return BuiltEngine(AsyncLLMEngine(engine, max_in_flight_seqs=max_num_seqs + max_waiting), tok, max_model_len)
    return LLMServer(cfg, engine_factory=factory)


def chat(rid="r", content="hi", **params) -> GenerateRequest:
    return GenerateRequest(rid, SamplingParams(**{"temperature": 0.0, "max_tokens": 8, **params}),
                           messages=[{"role": "user", "content": content}])
