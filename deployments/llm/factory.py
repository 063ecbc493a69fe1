"""Builds the real engine for a chat model config: device, dtype, weights, engine thread."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from deployments.config import ChatModelConfig, LLMEngineConfig
from deployments.llm.async_engine import AsyncLLMEngine
from deployments.llm.built_engine import BuiltEngine
from deployments.llm.engine import LLMEngine
from deployments.llm.loader import load_causal_lm, model_config, prepared_source
from deployments.llm.model_runner import supports_mixed_steps
from deployments.llm.prepacked import PackedLinear
from deployments.loading import phase
from deployments.threads import on_passing_thread
from deployments.torch_utils import pick_device, pick_dtype, set_threads


@dataclass
class LoadedEngine:
    """What build_engine hands back: the synchronous engine over the model (this rank's shard,
    under TP) and its tokenizer. Its context window is `engine.max_model_len`."""

    engine: LLMEngine
    tokenizer: Any


def build_async_engine(cfg: ChatModelConfig) -> BuiltEngine:
    """The AsyncLLMEngine with its tokenizer and context window. With tensor_parallel_size > 1
    this replica is rank 0 and starts the other ranks (tp.py)."""
    e = cfg.engine
    ranks = None
    if e.tensor_parallel_size > 1:
        from deployments.llm.tp import RankGroup, check_shardable
        source = prepared_source(cfg.source, e)     # a GGUF is dequantized once, here, before the ranks load
        check_shardable(model_config(source, e), e.tensor_parallel_size)
        ranks = RankGroup(cfg, source, e.tensor_parallel_size)
        loaded = ranks.join(
            lambda: build_engine(cfg, source, tp=(0, e.tensor_parallel_size, ranks.address, ranks.port)))
    else:   # on a passing thread: only the engine thread keeps OpenMP workers (threads.py)
        loaded = on_passing_thread(lambda: build_engine(cfg, cfg.source))
    async_engine = AsyncLLMEngine(loaded.engine, max_in_flight_seqs=e.max_num_seqs + e.max_waiting,
                                  stream_interval_s=e.stream_interval_ms / 1000,
                                  max_chunks_per_s=e.max_chunks_per_s, metrics=_metrics(cfg.id), ranks=ranks,
                                  late_admission=e.late_admission, step_timeout_s=e.step_timeout_s)
    return BuiltEngine(async_engine, loaded.tokenizer, loaded.engine.max_model_len)


def build_engine(cfg: ChatModelConfig, source: str, tp: Optional[tuple[int, int, str, int]] = None) -> LoadedEngine:
    """The engine over the whole model, or, with tp=(rank, world, address, port), over this rank's
    shard (joining the ranks' process group first)."""
    e = cfg.engine
    set_threads(e.num_threads)
    device = pick_device(e.device)
    lockstep = None
    if tp is not None:
        from deployments.llm.tp import Lockstep, init_rank
        rank, world, address, port = tp
        lockstep = Lockstep(init_rank(rank, world, address, port, device), leader=rank == 0)
    model, tokenizer = load_causal_lm(source, e, device, pick_dtype(e.dtype, device, cpu_bf16_if_native=True),
                                      tp_size=tp[1] if tp else 1)
    model_limit = getattr(model.config, "max_position_embeddings", None) or 2048
    prefill_tokens, mixed = device_defaults(e, device)
    invariant = _batch_invariant(e, model, device, mixed, tp is not None)
    engine = LLMEngine(model, tokenizer, max_model_len=min(e.max_model_len or model_limit, model_limit),
                       max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
                       max_prefill_tokens=prefill_tokens, mixed_steps=mixed, lockstep=lockstep,
                       batch_invariant=invariant, kv_cache=kv_cache_layout(e, model, mixed))
    phase("engine")
    return LoadedEngine(engine, tokenizer)


def kv_cache_layout(e: LLMEngineConfig, model, mixed: bool) -> str:
    """engine.kv_cache, or its default: slots where mixed steps run (in-place decode writes, no padding
    or merging), else padded (slots needs the mixed-step attention)."""
    if e.kv_cache is not None:
        return e.kv_cache
    return "slots" if mixed and supports_mixed_steps(model) else "padded"


def _batch_invariant(e: LLMEngineConfig, model, device: torch.device, mixed: bool, sharded: bool) -> bool:
    """engine.batch_invariant, or its default: on where it can hold (CPU, mixed steps for this model,
    prepacked weights, one rank). Asked for where it cannot, the replica fails to start and says why."""
    missing = [why for bad, why in (
        (device.type != "cpu", f"runs on CPU only (this replica runs on {device.type})"),
        (not (mixed and supports_mixed_steps(model)), "needs mixed steps (Llama-family attention without "
                                                      "sliding window, mixed_steps not false)"),
        (not any(isinstance(m, PackedLinear) for m in model.modules()),
         "needs prepacked weights (oneDNN here, prepack_weights not false)"),
        (sharded, "does not work under tensor parallelism")) if bad]
    if e.batch_invariant and missing:
        raise ValueError("batch_invariant true " + "; ".join(missing))
    return not missing if e.batch_invariant is None else e.batch_invariant


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
