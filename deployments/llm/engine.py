"""The continuous-batching engine: each step admits waiting prompts, decodes one token for every
running sequence, and reports what changed.

    step():  admit -> prefill (each new prompt once, forked n ways) -> decode all rows -> sample
             -> detokenize / stop -> drop finished rows -> return per-request chunks

It is synchronous and single-threaded; `AsyncLLMEngine` (async_engine.py) runs it on a thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers import DynamicCache

from deployments.llm.batch import RunningBatch
from deployments.llm.detokenizer import IncrementalDetokenizer, StopMatcher, token_text
from deployments.llm.sampler import Sampler, compute_logprobs, make_generator
from deployments.llm.scheduler import PromptGroup, Scheduler
from deployments.llm.sequence import Sequence, Status
from deployments.types import ChoiceDelta, GenerateChunk, SamplingParams, TokenLogprob, Usage


@dataclass(eq=False)
class EngineRequest:
    """A tokenized request: prompts (token ids), each generating params.n choices."""

    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    max_tokens: list[int]                 # per prompt, already clamped to the context window
    seqs: list[Sequence] = field(default_factory=list)
    echo_sent: set = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def usage(self) -> Usage:
        return Usage(sum(len(p) for p in self.prompts), sum(len(s.output_ids) for s in self.seqs))


class LLMEngine:
    def __init__(self, model: Any, tokenizer: Any, *, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_prefill_tokens: int = 4096):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_model_len = max_model_len
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, max_prefill_tokens)
        self.batch = RunningBatch(self.device)
        self.sampler = Sampler(len(tokenizer), self.device)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.requests: dict[str, EngineRequest] = {}

    # ------------------------------------------------------------------ public API

    def add(self, req: EngineRequest) -> None:
        for p_index, prompt in enumerate(req.prompts):
            group = self._make_group(req, p_index, prompt)
            req.seqs.extend(group.seqs)
            self.scheduler.add(group)
        self.requests[req.request_id] = req

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort(request_id)
        for s in req.seqs:
            if not s.finished:
                s.finish("abort")
        self.batch.remove_finished()

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting) or len(self.batch) > 0

    @torch.inference_mode()
    def step(self) -> list[tuple[EngineRequest, GenerateChunk]]:
        touched: dict[str, EngineRequest] = {}
        for group in self.scheduler.next_prefills(self.batch):
            self._prefill(group)
            touched[group.request_id] = self.requests[group.request_id]
        if len(self.batch):
            self._decode()
            for s in self.batch.seqs:
                touched[s.request_id] = s.owner
            self.batch.remove_finished()
        return [(req, self._chunk(req)) for req in touched.values()]

    # ------------------------------------------------------------------ model work

    def _prefill(self, group: PromptGroup) -> None:
        ids = torch.tensor([group.prompt_ids], device=self.device)
        out = self.model(input_ids=ids, past_key_values=DynamicCache(config=self.model.config),
                         use_cache=True, logits_to_keep=0 if group.want_prompt_logprobs else 1)
        if group.want_prompt_logprobs:
            self._prompt_logprobs(group, out.logits[0])
        n = len(group.seqs)
        logits = out.logits[:, -1].expand(n, -1)
        cache = out.past_key_values
        if n > 1:
            cache.batch_repeat_interleave(n)
        for s in group.seqs:
            s.status = Status.RUNNING
        self._sample_and_append(logits, group.seqs)
        alive = [i for i, s in enumerate(group.seqs) if not s.finished]
        if not alive:
            return
        if len(alive) < n:
            cache.batch_select_indices(torch.tensor(alive, device=self.device))
        mask = torch.ones(len(alive), len(group.prompt_ids), dtype=torch.long, device=self.device)
        self.batch.add([group.seqs[i] for i in alive], cache, mask)

    def _decode(self) -> None:
        out = self.model(**self.batch.step_inputs(), use_cache=True)
        self._sample_and_append(out.logits[:, -1], self.batch.seqs)

    def _sample_and_append(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        tokens = self.sampler(logits, seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            self._token_logprobs(logits, tokens, seqs, want)
        for s, t in zip(seqs, tokens.tolist()):
            self._append(s, t)

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        if token in self.eos_ids:
            seq.finish("stop")
        elif seq.stop.append(seq.detok.push(token)):
            seq.finish("stop")
        elif len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish("length")

    # ------------------------------------------------------------------ logprobs

    def _token_logprobs(self, logits, tokens, seqs, rows) -> None:
        idx = torch.tensor(rows, device=logits.device)
        k = max(seqs[r].params.logprobs for r in rows)
        chosen, top = compute_logprobs(logits.index_select(0, idx), tokens.index_select(0, idx), k)
        for j, r in enumerate(rows):
            seq = seqs[r]
            alts = [] if top is None else list(zip(top.indices[j].tolist(), top.values[j].tolist()))
            seq.pending_logprobs.append(self._logprob(int(tokens[r]), float(chosen[j]),
                                                      alts[: seq.params.logprobs]))

    def _prompt_logprobs(self, group: PromptGroup, logits: torch.Tensor) -> None:
        prompt = torch.tensor(group.prompt_ids, device=logits.device)
        k = group.seqs[0].params.logprobs or 0
        chosen, top = compute_logprobs(logits[:-1], prompt[1:], k)
        entries: list[Optional[TokenLogprob]] = [self._logprob(group.prompt_ids[0], None, [])]
        for j, token in enumerate(group.prompt_ids[1:]):
            alts = [] if top is None else list(zip(top.indices[j].tolist(), top.values[j].tolist()))
            entries.append(self._logprob(token, float(chosen[j]), alts))
        for s in group.seqs:
            s.prompt_logprobs = entries

    def _logprob(self, token: int, logprob: Optional[float], alts: list[tuple[int, float]]) -> TokenLogprob:
        text, raw = token_text(self.tokenizer, token)
        top = [(*token_text(self.tokenizer, t), lp) for t, lp in alts]
        return TokenLogprob(text, logprob, raw, [(t, lp, b) for t, b, lp in top])

    # ------------------------------------------------------------------ outputs

    def _chunk(self, req: EngineRequest) -> GenerateChunk:
        deltas = []
        for s in req.seqs:
            delta = self._delta(req, s)
            if delta is not None:
                deltas.append(delta)
        done = req.finished
        if done:
            self.requests.pop(req.request_id, None)
        return GenerateChunk(deltas, req.usage() if done else None)

    def _delta(self, req: EngineRequest, s: Sequence) -> Optional[ChoiceDelta]:
        text = s.stop.take_ready(final=s.finished)
        logprobs, s.pending_logprobs = s.pending_logprobs, []
        if s.params.echo and s.choice_index not in req.echo_sent and s.status is not Status.WAITING:
            req.echo_sent.add(s.choice_index)
            text = self.tokenizer.decode(s.prompt_ids, skip_special_tokens=True) + text
            logprobs = (s.prompt_logprobs or []) + logprobs
        if not text and not logprobs and not s.finished:
            return None
        reason = s.finish_reason if s.finished and s.finish_reason != "abort" else None
        return ChoiceDelta(s.choice_index, text, logprobs if s.params.logprobs is not None else None, reason)

    # ------------------------------------------------------------------ construction

    def _make_group(self, req: EngineRequest, p_index: int, prompt: list[int]) -> PromptGroup:
        params, n = req.params, req.params.n
        seqs = []
        for j in range(n):
            seed = None if params.seed is None else params.seed + p_index * n + j
            seq = Sequence(req.request_id, p_index * n + j, prompt, params, req.max_tokens[p_index],
                           IncrementalDetokenizer(self.tokenizer, prompt), StopMatcher(params.stop),
                           make_generator(seed, self.device), owner=req)
            seqs.append(seq)
        want = params.echo and params.logprobs is not None
        return PromptGroup(req.request_id, prompt, seqs, want_prompt_logprobs=want)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
