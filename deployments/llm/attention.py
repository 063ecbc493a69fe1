"""The attention of a mixed step (model_runner.py): decode rows against the running cache and new
prompts causally within themselves, in one packed row, registered with transformers as MIXED.

The model sees one packed row, [decode tokens of the B running rows | prompt 1 | prompt 2 ...], with
per-token position_ids, so RoPE is right for each sequence. Only attention needs the structure.
Per layer, `mixed_attention` appends the decode rows' new key/value to the running batch's
left-padded cache (kv_cache.append_column) and attends them against it (one batched SDPA, grouped
query heads packed into the query as transformers does for decode), attends each prompt causally
to itself (one SDPA for all prompts, with a block-diagonal causal mask: one call per layer however
many prompts join, which matters on GPUs, where a call per prompt and layer is launch-bound), and
keeps the prompts' keys/values, which the engine merges into the batch afterwards. Outside a mixed
step it is plain SDPA. It covers the standard attention of Llama-family models (no sliding window,
no soft-capping, no attention sinks).

Batch-invariant steps (`invariant=True`, the engine's default on CPU) give up the one-call
attention for a result that does not depend on the batch: each decode row attends in its own call
over its own keys only, and so does each prompt (docs/architecture.md, "Batch invariance").

Importing this module registers nothing: `register()` does, called when a model is prepared for
mixed steps (model_runner.install).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from deployments.llm.kv_cache import SlotKVCache, append_column

if TYPE_CHECKING:
    from deployments.llm.model_runner import LateAdmission

MIXED = "modelhub_mixed"


def register() -> None:
    """Makes MIXED a transformers attention implementation (and its mask, for forwards outside
    mixed steps: a mixed step builds its own). Idempotent."""
    AttentionInterface.register(MIXED, mixed_attention)
    AttentionMaskInterface.register(MIXED, sdpa_mask)


@dataclass
class MixedStep:
    """What one mixed forward needs, handed to every attention layer as a forward kwarg."""

    cache: Union[DynamicCache, SlotKVCache, None]   # the running rows' cache (None: no running rows)
    decode_mask: Optional[torch.Tensor]      # [B, 1, 1, T+1] bool, True = attend (unused when invariant)
    num_decode: int
    invariant: bool = False                  # batch-invariant attention: a call per row and per prompt
    row_lengths: list[int] = field(default_factory=list)   # invariant: each running row's true length
    prompts: list[tuple[int, int]] = field(default_factory=list)   # (start, length) of each prompt (set_prompts)
    prompt_mask: Optional[torch.Tensor] = None   # [L, L] bool block-diagonal causal mask (2+ prompts)
    new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> prompts' k, v
    late: Optional["LateAdmission"] = None

    def set_prompts(self, lengths: list[int], device: torch.device) -> None:
        """The prompts of the packed row, after the decode rows: their spans, and the mask of their
        one-call attention (none when invariant: each prompt attends in its own call)."""
        self.prompts = spans(self.num_decode, lengths)
        self.prompt_mask = None if self.invariant else _block_causal(lengths, device)


def mixed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                    mh_step: Optional[MixedStep] = None, **kwargs):
    """query [1, Hq, N, D], key/value [1, Hkv, N, D] -> ([1, N, Hq, D], None). Outside a mixed step
    (no mh_step), transformers' SDPA attention."""
    if mh_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    step, layer = mh_step, module.layer_idx
    hq, hkv, dim = query.shape[1], key.shape[1], query.shape[-1]
    outs = []
    b = step.num_decode
    if b:
        q = query[0, :, :b].transpose(0, 1).reshape(b, hkv, hq // hkv, dim)   # query heads grouped by kv head
        k = key[0, :, :b].transpose(0, 1).unsqueeze(2)                         # [B, Hkv, 1, D]
        v = value[0, :, :b].transpose(0, 1).unsqueeze(2)
        if isinstance(step.cache, SlotKVCache):   # rows right-padded in their slots
            keys, values = step.cache.append(layer, k, v)
            left = False
        else:
            lc = step.cache.layers[layer]
            lc.keys, lc.values = append_column(lc.keys, k), append_column(lc.values, v)
            keys, values, left = lc.keys, lc.values, True
        if step.invariant:
            o = _rowwise(q, keys, values, step.row_lengths, scaling, left)
        else:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.decode_mask, scale=scaling)
        outs.append(o.reshape(b, hq, dim))
    if step.prompts:   # causal within each prompt, blind to the others
        q, k, v = query[:, :, b:], key[:, :, b:], value[:, :, b:]
        step.new_kv[layer] = (k, v)
        if hq != hkv:   # enable_gqa=True takes a much slower path on CPU
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        if step.invariant and len(step.prompts) > 1:   # each prompt in its own call, as if alone
            o = torch.cat([F.scaled_dot_product_attention(q[:, :, s - b:s - b + n], k[:, :, s - b:s - b + n],
                                                          v[:, :, s - b:s - b + n], is_causal=True, scale=scaling)
                           for s, n in step.prompts], dim=2)
        else:
            one = step.prompt_mask is None
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=step.prompt_mask, is_causal=one, scale=scaling)
        outs.append(o[0].transpose(0, 1))                                      # [L, Hq, D]
    return torch.cat(outs, dim=0).unsqueeze(0), None


def _rowwise(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: list[int],
             scaling: Optional[float], left_padded: bool = True) -> torch.Tensor:
    """Batch-invariant decode attention: each row in its own SDPA call over its n columns (its true
    length: the last n when left-padded, the first n in a slot), with no padding and no mask, as it
    would run alone. One call per row, because
    SDPA's CPU kernel gives a row a result that depends on the padded width it sees, and (rarely) on
    the other rows of its call (docs/architecture.md; counts in bench/README.md, "Engine")."""
    if not left_padded:
        return torch.cat([F.scaled_dot_product_attention(q[i:i + 1], keys[i:i + 1, :, :n], values[i:i + 1, :, :n],
                                                         scale=scaling)
                          for i, n in enumerate(lengths)])
    width = keys.shape[2]
    return torch.cat([F.scaled_dot_product_attention(q[i:i + 1], keys[i:i + 1, :, width - n:],
                                                     values[i:i + 1, :, width - n:], scale=scaling)
                      for i, n in enumerate(lengths)])


def spans(start: int, lengths: list[int]) -> list[tuple[int, int]]:
    spans = []
    for n in lengths:
        spans.append((start, n))
        start += n
    return spans


def _block_causal(lengths: list[int], device: torch.device) -> Optional[torch.Tensor]:
    """[L, L] True where a prompt token may attend: earlier-or-same tokens of its own prompt."""
    if len(lengths) < 2:
        return None
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    n = owner.shape[0]
    return (owner[:, None] == owner[None, :]) & torch.ones(n, n, dtype=torch.bool, device=device).tril()
