"""Every forward the engine runs: `ModelRunner` holds the model and returns logits (and, for
prompts, the keys and values their sequences join the running batch with); the engine samples
and owns the batch. The forwards: prompts prefilled together (left-padded), a preempted
sequence resumed, a prompt in chunks for its logprobs, a plain decode step, and the packed
forward of a mixed step, which decodes every running row and prefills new prompts, with prompts
that arrive while it runs joining midway (late admission).

Why mixed steps: on a CPU a forward's cost is mostly the linear layers, and they are far from full
at decode sizes, so prompts packed into the decode forward cost much less than a forward of their
own (bench/README.md, "Engine"). Separate prefill steps make a closed-loop load choose between
admitting prompts one at a time (each arrival pays a whole forward and stalls every stream) and
admitting them in batches (arrivals wait for each other, come back as cohorts, and TTFT grows
with the cohort). Packing keeps the batching gain without the wait, like vLLM's chunked-prefill
scheduler. The attention that makes packing work is in attention.py; `install` prepares a model
once. `supports_mixed_steps` says whether a model qualifies; the engine uses separate prefill
steps for the others.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers import DynamicCache

from deployments.llm.attention import MIXED, MixedStep, register, spans
from deployments.llm.kv_cache import zero_padding
from deployments.llm.prepacked import batch_invariant_rows

_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite"}
_LATE_TYPES = _MODEL_TYPES - {"granite"}   # embeddings scaled before the first layer: not replayed here
PROMPT_LOGPROBS_CHUNK = 256   # prompt positions whose logits (x vocabulary) exist at once, for prompt logprobs

Chunk = Callable[[int, int, torch.Tensor, torch.Tensor], None]   # (start, end, logits, targets)


class ModelRunner:
    """The engine's forwards over one model. `install` and the batch-invariant layers are applied
    to the model once, here; the engine's decode rows and their cache come in as step inputs
    (batch.RunningBatch.step_inputs), and the decode forwards add the cache's new column."""

    def __init__(self, model: Any, *, mixed_steps: bool, batch_invariant: bool):
        self.model = model
        self.device = next(model.parameters()).device
        self.batch_invariant = batch_invariant
        if batch_invariant:
            batch_invariant_rows(model)
        if mixed_steps:
            install(model)

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Prompts together, left-padded to the longest: each prompt's last logits [P, V], the
        prompts' cache (its padding zeroed) and their attention mask [P, T]."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p, device=self.device)
            mask[row, width - len(p):] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_(min=0),
                         past_key_values=DynamicCache(config=self.model.config), use_cache=True, logits_to_keep=1)
        zero_padding(out.past_key_values, mask)
        return out.logits[:, -1], out.past_key_values, mask

    def resume(self, tokens: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        """A preempted sequence's tokens so far, through the model again: its rebuilt cache and mask."""
        ids = torch.tensor([tokens], device=self.device)
        out = self.model(input_ids=ids, past_key_values=DynamicCache(config=self.model.config), use_cache=True,
                         logits_to_keep=1)
        return out.past_key_values, torch.ones(1, ids.shape[1], dtype=torch.long, device=self.device)

    def prefill_in_chunks(self, prompt: list[int], each: Chunk) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """One prompt whose every position's logits are needed (echo + logprobs, prompt_logprobs), in chunks of
        PROMPT_LOGPROBS_CHUNK tokens over a growing cache, so no more than a chunk's positions x the
        vocabulary of logits exist at once, however long the prompt. each(start, end, logits,
        targets) sees the logits of positions [start, end) and the prompt tokens they predict (one
        fewer in the last chunk). Returns the last position's logits [1, V], the cache and its mask."""
        ids = torch.tensor([prompt], device=self.device)
        cache = DynamicCache(config=self.model.config)
        length = ids.shape[1]
        for start in range(0, length, PROMPT_LOGPROBS_CHUNK):
            end = min(start + PROMPT_LOGPROBS_CHUNK, length)
            logits = self.model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=0,
                                position_ids=torch.arange(start, end, device=self.device)[None]).logits[0]
            each(start, end, logits, ids[0, start + 1:end + 1])   # each position predicts the next prompt token
            last = logits[-1:]
        return last, cache, torch.ones(1, length, dtype=torch.long, device=self.device)

    def decode(self, inputs: dict) -> torch.Tensor:
        """Every running row, one token: each row's next-token logits [B, V]."""
        return self.model(**inputs, use_cache=True).logits[:, -1]

    def mixed(self, inputs: Optional[dict], cache: Any, prompts: list[list[int]],
              poll: Optional[Callable[[], list[list[int]]]]) -> tuple[torch.Tensor, MixedStep]:
        """`run_mixed` over the running rows' step inputs (None: no running rows) and `prompts`;
        `poll` is used where the model allows late admission."""
        if inputs is None:
            inputs = _no_rows(self.device)
        can_join = poll is not None and supports_late_admission(self.model)
        return run_mixed(self.model, inputs["input_ids"], inputs["position_ids"], cache, inputs["attention_mask"],
                         prompts, poll if can_join else None, invariant=self.batch_invariant)


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
    register()
    if model.config._attn_implementation == MIXED:
        return
    model.config._attn_implementation = MIXED
    model.lm_head = KeptRows(model.lm_head)
    for layer in model.model.layers:
        layer.register_forward_pre_hook(functools.partial(_before_layer, model.model), with_kwargs=True)


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


def _no_rows(device: torch.device) -> dict:
    empty = torch.zeros(0, 1, dtype=torch.long, device=device)
    return {"input_ids": empty, "position_ids": empty, "attention_mask": None}


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
    late.keep.extend(s + n - 1 for s, n in spans(start, lengths))
    cos, sin = kwargs["position_embeddings"]
    late.position = {"position_embeddings": (torch.cat([cos, pe[0]], dim=1), torch.cat([sin, pe[1]], dim=1))}
    if kwargs.get("position_ids") is not None:
        late.position["position_ids"] = torch.cat([kwargs["position_ids"], pos], dim=1)
    late.joined = True
    return torch.cat([hidden, h], dim=1)
