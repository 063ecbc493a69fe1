"""Builds the real engine for a chat model config: device, dtype, weights, engine thread."""
from __future__ import annotations

from deployments.config import ChatModelConfig
from deployments.llm.async_engine import AsyncLLMEngine
from deployments.llm.engine import LLMEngine
from deployments.llm.loader import load_causal_lm
from deployments.torch_utils import pick_device, pick_dtype, set_threads


def build_async_engine(cfg: ChatModelConfig):
    """Returns (AsyncLLMEngine, tokenizer, max_model_len)."""
    e = cfg.engine
    set_threads(e.num_threads)
    device = pick_device(e.device)
    model, tokenizer = load_causal_lm(cfg.source, e, device, pick_dtype(e.dtype, device, cpu_bf16_if_native=True))
    model_limit = getattr(model.config, "max_position_embeddings", None) or 2048
    max_model_len = min(e.max_model_len or model_limit, model_limit)
    engine = LLMEngine(model, tokenizer, max_model_len=max_model_len, max_num_seqs=e.max_num_seqs,
                       max_num_batched_tokens=e.max_num_batched_tokens, max_prefill_tokens=e.max_prefill_tokens,
                       mixed_steps=e.mixed_steps)
    async_engine = AsyncLLMEngine(engine, max_in_flight_seqs=e.max_num_seqs + e.max_waiting,
                                  stream_interval_s=e.stream_interval_ms / 1000,
                                  max_chunks_per_s=e.max_chunks_per_s, metrics=_metrics(cfg.id))
    return async_engine, tokenizer, max_model_len


def _metrics(model: str):
    """Ray's metrics where this runs inside Ray (a Serve replica), else none."""
    import ray
    if not ray.is_initialized():
        return None
    from deployments.llm.metrics import EngineMetrics
    return EngineMetrics(model)
