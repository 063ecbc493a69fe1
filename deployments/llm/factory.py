"""Builds the real engine for a chat model config: device, dtype, weights, engine thread."""
from __future__ import annotations

import torch

from deployments.config import ChatModelConfig, LLMEngineConfig
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
    prefill_tokens, mixed = device_defaults(e, device)
    engine = LLMEngine(model, tokenizer, max_model_len=max_model_len, max_num_seqs=e.max_num_seqs,
                       max_num_batched_tokens=e.max_num_batched_tokens, max_prefill_tokens=prefill_tokens,
                       mixed_steps=mixed)
    async_engine = AsyncLLMEngine(engine, max_in_flight_seqs=e.max_num_seqs + e.max_waiting,
                                  stream_interval_s=e.stream_interval_ms / 1000,
                                  max_chunks_per_s=e.max_chunks_per_s, metrics=_metrics(cfg.id))
    return async_engine, tokenizer, max_model_len


def device_defaults(e: LLMEngineConfig, device: torch.device) -> tuple[int, bool]:
    """(max_prefill_tokens, mixed_steps), each the config's value or the device's default.

    CPU: 64 prompt tokens per step, packed into the decode forward. A CPU forward costs about what
    its tokens cost, so a small budget keeps running streams moving (bench/README.md).
    CUDA: 2048 per step, in separate prefill steps. A GPU step is launch- and memory-bound: a
    small budget starves a large batch of admissions, and the mixed forward's extra per-layer
    work costs more than it saves (measured on an H200: docs/gpu.md)."""
    cuda = device.type == "cuda"
    prefill = e.max_prefill_tokens if e.max_prefill_tokens is not None else (2048 if cuda else 64)
    mixed = e.mixed_steps if e.mixed_steps is not None else not cuda
    return prefill, mixed


def _metrics(model: str):
    """Ray's metrics where this runs inside Ray (a Serve replica), else none."""
    import ray
    if not ray.is_initialized():
        return None
    from deployments.llm.metrics import EngineMetrics
    return EngineMetrics(model)
