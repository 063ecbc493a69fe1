"""Mixed steps: one forward pass that decodes every running row and prefills new prompts.

Why: on a CPU a forward's cost is mostly the linear layers, and they are far from full at decode
sizes. Measured on the dev box (SmolLM2-135M, bf16, 32 running rows): a decode step 72 ms, one
36-token prompt alone 59 ms, both packed into one forward 102 ms. Separate prefill steps make a
closed-loop load choose between admitting prompts one at a time (each arrival pays a whole forward
and stalls every stream) and admitting them in batches (arrivals wait for each other, come back
as cohorts, and TTFT grows with the cohort). Packing keeps the batching gain without the wait,
like vLLM's chunked-prefill scheduler.

The model sees one packed row, [decode tokens of the B running rows | prompt 1 | prompt 2 ...], with
per-token position_ids, so RoPE is right for each sequence. Only attention needs the structure:
`MIXED` is registered as a transformers attention implementation and switched on for the duration
of the forward. Per layer it appends the decode rows' new key/value to the running batch's
left-padded cache and attends them against it (one batched SDPA, grouped query heads packed into
the query as transformers does for decode), attends each prompt causally to itself (one SDPA for all
prompts, with a block-diagonal causal mask: one call per layer however many prompts join, which
matters on GPUs, where a call per prompt and layer is launch-bound), and keeps the prompts'
keys/values, which the engine merges into the batch afterwards. It covers the standard
attention of Llama-family models (no sliding window, no soft-capping, no attention sinks);
`supports_mixed_steps` says whether a model qualifies, and the engine uses separate prefill steps
for the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

MIXED = "modelhub_mixed"
_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite"}


@dataclass
class MixedStep:
    """What one mixed forward needs, handed to every attention layer as a forward kwarg."""

    cache: Optional[DynamicCache]            # the running rows' cache (None: no running rows)
    decode_mask: Optional[torch.Tensor]      # [B, 1, 1, T+1] bool, True = attend
    num_decode: int
    prompts: list[tuple[int, int]]           # (start, length) of each prompt in the packed row
    prompt_mask: Optional[torch.Tensor] = None   # [L, L] bool block-diagonal causal mask (2+ prompts)
    new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> prompts' k, v


def supports_mixed_steps(model: Any) -> bool:
    cfg = model.config
    return (getattr(cfg, "model_type", None) in _MODEL_TYPES
            and not getattr(cfg, "sliding_window", None) and not getattr(cfg, "use_sliding_window", False)
            and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager"))


def mixed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                    mh_step: Optional[MixedStep] = None, **kwargs):
    """query [1, Hq, N, D], key/value [1, Hkv, N, D] -> ([1, N, Hq, D], None)."""
    step, layer = mh_step, module.layer_idx
    hq, hkv, dim = query.shape[1], key.shape[1], query.shape[-1]
    outs = []
    b = step.num_decode
    if b:
        q = query[0, :, :b].transpose(0, 1).reshape(b, hkv, hq // hkv, dim)   # query heads grouped by kv head
        k = key[0, :, :b].transpose(0, 1).unsqueeze(2)                         # [B, Hkv, 1, D]
        v = value[0, :, :b].transpose(0, 1).unsqueeze(2)
        lc = step.cache.layers[layer]
        lc.keys = torch.cat([lc.keys, k], dim=2)
        lc.values = torch.cat([lc.values, v], dim=2)
        o = F.scaled_dot_product_attention(q, lc.keys, lc.values, attn_mask=step.decode_mask, scale=scaling)
        outs.append(o.reshape(b, hq, dim))
    if step.prompts:   # all prompts in one call: causal within each, blind to the others
        q, k, v = query[:, :, b:], key[:, :, b:], value[:, :, b:]
        step.new_kv[layer] = (k, v)
        if hq != hkv:   # enable_gqa=True takes a much slower path on CPU
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        one = step.prompt_mask is None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=step.prompt_mask, is_causal=one, scale=scaling)
        outs.append(o[0].transpose(0, 1))                                      # [L, Hq, D]
    return torch.cat(outs, dim=0).unsqueeze(0), None


def _no_mask(*args, **kwargs):
    return None   # mixed_attention builds its own masks


AttentionInterface.register(MIXED, mixed_attention)
AttentionMaskInterface.register(MIXED, _no_mask)


def run_mixed(model: Any, tokens: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
              mask: torch.Tensor, prompts: list[list[int]]) -> tuple[torch.Tensor, MixedStep]:
    """One packed forward over the running rows (tokens/positions [B, 1]; `mask` [B, T+1] already has
    the new column) and the prompts. Returns logits [B + len(prompts), V] (each running row's next
    token, then each prompt's last position) and the step, whose new_kv holds the prompts' keys and
    values. The running cache gains one column per layer."""
    device = tokens.device
    b = tokens.shape[0]
    spans, start = [], b
    for p in prompts:
        spans.append((start, len(p)))
        start += len(p)
    ids = torch.cat([tokens.view(-1)] + [torch.tensor(p, device=device) for p in prompts])
    pos = torch.cat([positions.view(-1)] + [torch.arange(len(p), device=device) for p in prompts])
    step = MixedStep(cache, mask.bool()[:, None, None, :], b, spans, _block_causal(prompts, device))
    keep = torch.tensor(list(range(b)) + [s + n - 1 for s, n in spans], device=device)
    cfg = model.config
    previous = cfg._attn_implementation
    cfg._attn_implementation = MIXED
    try:
        out = model(input_ids=ids.unsqueeze(0), position_ids=pos.unsqueeze(0), use_cache=False,
                    logits_to_keep=keep, mh_step=step)
    finally:
        cfg._attn_implementation = previous
    return out.logits[0], step


def _block_causal(prompts: list[list[int]], device: torch.device) -> Optional[torch.Tensor]:
    """[L, L] True where a prompt token may attend: earlier-or-same tokens of its own prompt."""
    if len(prompts) < 2:
        return None
    owner = torch.repeat_interleave(torch.arange(len(prompts), device=device),
                                    torch.tensor([len(p) for p in prompts], device=device))
    n = owner.shape[0]
    return (owner[:, None] == owner[None, :]) & torch.ones(n, n, dtype=torch.bool, device=device).tril()


def prompt_cache(step: MixedStep, lengths: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """The step's prompts' keys/values as one left-padded cache (padding zeroed) and its [P, W] mask:
    one copy per layer tensor (a single prompt needs no padding, so its keys/values serve as they are;
    the engine's merge copies them into the batch anyway)."""
    width = max(lengths)
    layers = [step.new_kv[i] for i in sorted(step.new_kv)]
    device = layers[0][0].device
    mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    dest = []
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
        dest.extend(range(row * width + width - n, (row + 1) * width))
    if len(lengths) == 1:
        return DynamicCache(ddp_cache_data=layers), mask
    dest_t = torch.tensor(dest, device=device)
    padded = [(_left_padded(k, dest_t, len(lengths), width), _left_padded(v, dest_t, len(lengths), width))
              for k, v in layers]
    return DynamicCache(ddp_cache_data=padded), mask


def _left_padded(packed: torch.Tensor, dest: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """packed [1, H, L, D] (the prompts one after another) -> [rows, H, width, D], each prompt
    right-aligned in its row: position i of the packed row goes to flat slot dest[i]."""
    _, h, _, d = packed.shape
    out = packed.new_zeros(h, rows * width, d)
    out.index_copy_(1, dest, packed[0])
    return out.view(h, rows, width, d).transpose(0, 1)
