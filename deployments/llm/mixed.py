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
`MIXED` is registered as a transformers attention implementation and installed once per model
(`install`: it is plain SDPA outside a mixed step, so nothing is switched per step). Per layer it
appends the decode rows' new key/value to the running batch's left-padded cache and attends them
against it (one batched SDPA, grouped query heads packed into
the query as transformers does for decode), attends each prompt causally to itself (one SDPA for all
prompts, with a block-diagonal causal mask: one call per layer however many prompts join, which
matters on GPUs, where a call per prompt and layer is launch-bound), and keeps the prompts'
keys/values, which the engine merges into the batch afterwards. It covers the standard
attention of Llama-family models (no sliding window, no soft-capping, no attention sinks);
`supports_mixed_steps` says whether a model qualifies, and the engine uses separate prefill steps
for the others.

Batch-invariant steps (`run_mixed(invariant=True)`, the engine's default on CPU) give up the
one-call attention for a result that does not depend on the batch: each decode row attends in its
own call over its own keys only, and so does each prompt (docs/architecture.md, "Batch invariance").
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

MIXED = "modelhub_mixed"
_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite"}
_LATE_TYPES = _MODEL_TYPES - {"granite"}   # embeddings scaled before the first layer: not replayed here


@dataclass
class MixedStep:
    """What one mixed forward needs, handed to every attention layer as a forward kwarg."""

    cache: Optional[DynamicCache]            # the running rows' cache (None: no running rows)
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
        self.prompts = _spans(self.num_decode, lengths)
        self.prompt_mask = None if self.invariant else _block_causal(lengths, device)


@dataclass
class LateAdmission:
    """Prompts that join a step while its forward runs (see run_mixed). `poll` returns the prompts
    that may join now (often none); `checkpoints` are the layers before which it is asked, until one
    joins; after that, `position` replaces the layers' position inputs (now longer)."""

    poll: Callable[[], list[list[int]]]
    checkpoints: frozenset[int]
    lengths: list[int]                                   # every prompt of the step, in packed order
    keep: list[int]                                      # packed rows whose logits the step returns
    joined: bool = False
    position: Optional[dict[str, Any]] = None            # position_embeddings and position_ids


def supports_late_admission(model: Any) -> bool:
    return supports_mixed_steps(model) and model.config.model_type in _LATE_TYPES


def supports_mixed_steps(model: Any) -> bool:
    cfg = model.config
    return (getattr(cfg, "model_type", None) in _MODEL_TYPES
            and not getattr(cfg, "sliding_window", None) and not getattr(cfg, "use_sliding_window", False)
            and getattr(cfg, "_attn_implementation", None) in ("sdpa", MIXED))


def install(model: Any) -> None:
    """Prepares a model for mixed steps, once: MIXED becomes its attention implementation (plain
    SDPA outside a mixed step), its LM head a KeptRows, and its layers get the late-admission hook.
    Nothing is switched per step, so engines on other threads may share the model."""
    if model.config._attn_implementation == MIXED:
        return
    model.config._attn_implementation = MIXED
    model.lm_head = KeptRows(model.lm_head)
    for layer in model.model.layers:
        layer.register_forward_pre_hook(functools.partial(_before_layer, model.model), with_kwargs=True)


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
        lc = step.cache.layers[layer]
        lc.keys, lc.values = _append(lc.keys, k), _append(lc.values, v)
        if step.invariant:
            o = _rowwise(q, lc.keys, lc.values, step.row_lengths, scaling)
        else:
            o = F.scaled_dot_product_attention(q, lc.keys, lc.values, attn_mask=step.decode_mask, scale=scaling)
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


AttentionInterface.register(MIXED, mixed_attention)
AttentionMaskInterface.register(MIXED, sdpa_mask)   # for forwards outside mixed steps; a mixed step builds its own


_ROOM = 32   # columns of room a running cache tensor gets when it must be copied to grow


def _append(t: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """t [B, H, W, D] with col [B, H, 1, D] as a new last column. torch.cat would copy the whole cache
    every step; instead t gets _ROOM spare columns to its right when it is copied, and the next
    appends write into them (t is then a view of that buffer, which nothing else uses: merges,
    index_select and the engine's other copies make new tensors)."""
    b, h, w, d = t.shape
    row = t.stride(1)
    start = t.storage_offset()
    if (t.stride(3) == 1 and t.stride(2) == d and t.stride(0) == h * row and row % d == 0 and start < row
            and start // d + w < row // d and t.untyped_storage().nbytes() >= b * h * row * t.element_size()):
        grown = t.as_strided((b, h, w + 1, d), t.stride(), start)
    else:
        buf = t.new_empty(b, h, w + 1 + _ROOM, d)
        buf[:, :, :w] = t
        grown = buf[:, :, :w + 1]
    grown[:, :, w:] = col
    return grown


def _rowwise(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: list[int],
             scaling: Optional[float]) -> torch.Tensor:
    """Batch-invariant decode attention: each row in its own SDPA call over its last n columns (its
    true length), with no padding and no mask, as it would run alone. One call per row, because
    SDPA's CPU kernel gives a row a result that depends on the padded width it sees, and (rarely) on
    the other rows of its call: measured, 2 of 2489 rows of one length batched in one call differed
    from their lone result (docs/architecture.md)."""
    width = keys.shape[2]
    return torch.cat([F.scaled_dot_product_attention(q[i:i + 1], keys[i:i + 1, :, width - n:],
                                                     values[i:i + 1, :, width - n:], scale=scaling)
                      for i, n in enumerate(lengths)])


def run_mixed(model: Any, tokens: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
              mask: torch.Tensor, prompts: list[list[int]],
              poll: Optional[Callable[[], list[list[int]]]] = None,
              invariant: bool = False) -> tuple[torch.Tensor, MixedStep]:
    """One packed forward over the running rows (tokens/positions [B, 1]; `mask` [B, T+1] already has
    the new column) and the prompts. Returns logits [B + P, V] (each running row's next token, then
    each prompt's last position) and the step, whose new_kv holds the prompts' keys and values. The
    running cache gains one column per layer.

    With `poll` (late admission), prompts may also join while the forward runs: before a quarter and
    before half of the layers, poll() says which waiting prompts join now. They are run alone
    through the layers already done, then packed in for the rest, and get their first token at the
    end of this step. Without it, a request that arrives just after a step began (as closed-loop
    clients do) waits that whole step and then rides the next. Their prompts follow `prompts`."""
    device = tokens.device
    b = tokens.shape[0]
    ids = torch.cat([tokens.view(-1)] + [torch.tensor(p, device=device) for p in prompts])
    pos = torch.cat([positions.view(-1)] + [torch.arange(len(p), device=device) for p in prompts])
    lengths = [len(p) for p in prompts]
    step = MixedStep(cache, None if mask is None or invariant else mask.bool()[:, None, None, :], b,
                     invariant=invariant, row_lengths=mask.sum(dim=1).tolist() if invariant and b else [])
    step.set_prompts(lengths, device)
    keep = list(range(b)) + [s + n - 1 for s, n in step.prompts]
    if poll is not None:
        layers = model.config.num_hidden_layers
        step.late = LateAdmission(poll, frozenset({max(1, layers // 4), max(1, layers // 2)}), lengths, keep)
    model.lm_head.local.keep = keep   # (a KeptRows: the engine ran `install`) grows if prompts join
    try:
        out = model(input_ids=ids.unsqueeze(0), position_ids=pos.unsqueeze(0), use_cache=False,
                    logits_to_keep=0, mh_step=step)
    finally:
        model.lm_head.local.keep = None
    return out.logits[0], step


class KeptRows(nn.Module):
    """A model's LM head after `install`: in a mixed step, on the packed rows whose logits the step
    needs (set per thread); elsewhere the head as it was."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.local = threading.local()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        keep = getattr(self.local, "keep", None)
        return self.head(hidden if keep is None else hidden[:, torch.tensor(keep, device=hidden.device)])


def _before_layer(decoder, module, args, kwargs):
    step = kwargs.get("mh_step")
    late = step.late if step is not None else None
    if late is None:
        return None
    layer = module.self_attn.layer_idx
    if not late.joined and layer in late.checkpoints:
        prompts = late.poll()
        if prompts:
            args = (_join(decoder, step, late, layer, args[0], kwargs, prompts),) + tuple(args[1:])
    if late.position is not None:
        kwargs.update(late.position)
    return args, kwargs


def _join(decoder, step: MixedStep, late: LateAdmission, layer: int, hidden: torch.Tensor, kwargs: dict,
          prompts: list[list[int]]) -> torch.Tensor:
    """Runs `prompts` alone through the decoder's layers [0, layer) and packs them in from `layer`
    on: returns the longer hidden states; the step gains their spans, mask, keys/values and rows."""
    device = hidden.device
    lengths = [len(p) for p in prompts]
    ids = torch.cat([torch.tensor(p, device=device) for p in prompts]).unsqueeze(0)
    pos = torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)
    alone = MixedStep(None, None, 0, invariant=step.invariant)
    alone.set_prompts(lengths, device)
    h = decoder.embed_tokens(ids)
    pe = decoder.rotary_emb(h, position_ids=pos)
    for i in range(layer):
        h = decoder.layers[i](h, attention_mask=None, position_embeddings=pe, position_ids=pos,
                              past_key_values=None, use_cache=False, mh_step=alone)
    start = hidden.shape[1]
    for i in range(layer):   # the layers already done: the step's prompts' keys/values, then theirs
        k, v = alone.new_kv[i]
        if i in step.new_kv:
            k, v = torch.cat([step.new_kv[i][0], k], dim=2), torch.cat([step.new_kv[i][1], v], dim=2)
        step.new_kv[i] = (k, v)
    late.lengths.extend(lengths)
    step.set_prompts(late.lengths, device)
    late.keep.extend(s + n - 1 for s, n in _spans(start, lengths))
    cos, sin = kwargs["position_embeddings"]
    late.position = {"position_embeddings": (torch.cat([cos, pe[0]], dim=1), torch.cat([sin, pe[1]], dim=1))}
    if kwargs.get("position_ids") is not None:
        late.position["position_ids"] = torch.cat([kwargs["position_ids"], pos], dim=1)
    late.joined = True
    return torch.cat([hidden, h], dim=1)


def _spans(start: int, lengths: list[int]) -> list[tuple[int, int]]:
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
