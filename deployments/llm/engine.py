"""The continuous-batching engine: each step runs the scheduler's plan and reports what changed.

    step():  plan = scheduler.schedule()          (scheduler.py: admission, budgets, preemption)
             run the plan's forwards               (model_runner.py, every forward)
                                                   mixed:   one packed forward decodes the rows and
                                                            prefills the prompts
                                                   prefill: prompts together (forked n ways)
                                                   decode:  every running row, one token
             sample each forward's rows            (sampler.py), tokens -> sequences (outputs.py)
             -> per-request chunks                 (outputs.py: stop text, echo, logprobs, deltas)

The running batch's KV cache lives in kv_cache.py. Synchronous and single-threaded;
`AsyncLLMEngine` (async_engine.py) runs it on a thread.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Union

import torch
from transformers import DynamicCache

from deployments.llm.batch import RunningBatch
from deployments.llm.built_engine import EngineLoad
from deployments.llm.detokenizer import IncrementalDetokenizer, StopMatcher
from deployments.llm.kv_cache import SlotKVCache, prompt_cache
from deployments.llm.model_runner import ModelRunner, supports_mixed_steps
from deployments.llm.outputs import OutputProcessor, no_token_left
from deployments.llm.request import EngineRequest
from deployments.llm.sampler import Sampler, make_generator
from deployments.llm.scheduler import PromptGroup, Scheduler, StepPlan
from deployments.llm.sequence import Sequence, Status
from deployments.llm.structured import new_matcher
from deployments.types import GenerateChunk

logger = logging.getLogger(__name__)

_SLOT_COLUMNS = 256   # a slot cache's first capacity per row (it doubles when a row outgrows it)
Touched = dict[str, EngineRequest]   # the requests a step changed, by id


class LLMEngine:
    def __init__(self, model: Any, tokenizer: Any, *, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_prefill_tokens: int = 64, mixed_steps: bool = True,
                 lockstep: Any = None, batch_invariant: bool = False, kv_cache: str = "padded"):
        self.model = model
        self.lockstep = lockstep            # tp.Lockstep when the model is sharded over ranks
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_model_len = max_model_len
        self.mixed_steps = mixed_steps and supports_mixed_steps(model)
        self.batch_invariant = batch_invariant and self.mixed_steps
        if kv_cache not in ("padded", "slots"):
            raise ValueError(f"kv_cache must be 'padded' or 'slots', not {kv_cache!r}")
        if kv_cache == "slots" and not self.mixed_steps:
            raise ValueError("kv_cache slots needs mixed steps (Llama-family attention without sliding window, "
                             "mixed_steps not false)")
        self.batch = RunningBatch(self.device, SlotKVCache(max_num_seqs, _SLOT_COLUMNS)
                                  if kv_cache == "slots" else None)
        self.scheduler = Scheduler(self.batch, max_num_seqs, max_num_batched_tokens, max_prefill_tokens,
                                   mixed_steps=self.mixed_steps, mixed_when_idle=self.batch_invariant)
        self.outputs = OutputProcessor(model, tokenizer, max_model_len)
        self.eos_ids = self.outputs.eos_ids
        self.sampler = Sampler(len(tokenizer), self.device, self.eos_ids)
        self.vocab_size = self.sampler.vocab_size
        self.requests: dict[str, EngineRequest] = {}
        self.runner = ModelRunner(model, mixed_steps=self.mixed_steps, batch_invariant=self.batch_invariant)
        # Late admission (model_runner.run_mixed): set by the AsyncLLMEngine, it moves requests posted
        # since the step began into the scheduler, so their prompts can join the step's forward midway.
        self.arrivals: Optional[Callable[[], None]] = None

    # ------------------------------------------------------------------ public API

    def add(self, req: EngineRequest) -> None:
        groups = [self._make_group(req, p_index, prompt) for p_index, prompt in enumerate(req.prompts)]
        if self.lockstep is not None:
            self.lockstep.added(req)
        for group in groups:   # all or nothing: a request that fails to build leaves no trace
            req.seqs.extend(group.seqs)
            self.scheduler.add(group)
        self.requests[req.request_id] = req

    @torch.inference_mode()   # dropping a row moves the KV rows after it: in place, on inference tensors
    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if self.lockstep is not None:
            self.lockstep.aborted(request_id)
        self.scheduler.abort(request_id)
        for s in req.seqs:
            if not s.finished:
                s.finish("abort")
        self.batch.remove_finished()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def request_ids(self) -> list[str]:
        """The requests in the engine now (waiting or running)."""
        return list(self.requests)

    def num_running_seqs(self) -> int:
        return len(self.batch)

    def num_waiting_seqs(self) -> int:
        return self.scheduler.num_waiting_seqs()

    def load(self) -> EngineLoad:
        """Sequences running and waiting, and the prompt tokens still to prefill. Call it from the
        thread that steps the engine (AsyncLLMEngine publishes it from there)."""
        return EngineLoad(self.num_running_seqs(), self.num_waiting_seqs(), self.scheduler.waiting_prompt_tokens())

    @torch.inference_mode()
    def step(self) -> list[tuple[EngineRequest, GenerateChunk]]:
        """One step: plan, run the plan's forwards (each samples its rows), report the changes."""
        if self.lockstep is not None:   # under TP, rank 0 sends this step's adds/aborts to the other ranks
            self.lockstep.before_step()
        plan = self.scheduler.schedule()
        touched = self._run(plan)
        return [(req, self._chunk(req)) for req in touched.values()]

    def _run(self, plan: StepPlan) -> Touched:
        if plan.mode == "mixed":
            return self._mixed_step(plan)
        if plan.mode == "prefill":
            self._prefill_all(plan.prefills)
            return {g.request_id: self.requests[g.request_id] for g in plan.prefills}
        if plan.mode == "decode":
            self._decode()
            touched = {s.request_id: s.owner for s in plan.decode}
            self.batch.remove_finished()
            return touched
        return {}

    def _mixed_step(self, plan: StepPlan) -> Touched:
        """Every running row decodes in one packed forward with the admitted prompts (and any that
        join midway); a prompt whose logprobs are asked for, which needs every position's logits, is
        prefilled in its own forward first and then decodes with the rest."""
        groups = plan.prefills
        touched = {g.request_id: self.requests[g.request_id] for g in groups}
        for g in groups:
            if g.alone:
                self._prefill([g])
        decoded = list(self.batch.seqs)
        rest = [g for g in groups if not g.alone]
        joined = self._mixed(rest, plan) if rest or len(self.batch) else []
        touched.update((g.request_id, self.requests[g.request_id]) for g in joined)
        touched.update((s.request_id, s.owner) for s in decoded)
        return touched

    # ------------------------------------------------------------------ running the plan (forwards: model_runner.py)

    def _prefill_all(self, groups: list[PromptGroup]) -> None:
        """Prompts of similar length are prefilled together (left-padded): on CPU a batch of short
        prompts costs much less per prompt than one at a time (bench/README.md, "Engine").
        Prompts whose logprobs are asked for, which need every position's logits, go alone."""
        for g in groups:
            if g.alone:
                self._prefill([g])
        for chunk in _similar_lengths(sorted((g for g in groups if not g.alone),
                                             key=lambda g: len(g.prompt_ids))):
            self._prefill(chunk)

    def _prefill(self, groups: list[PromptGroup]) -> None:
        if len(groups) == 1 and groups[0].resume:
            return self._resume(groups[0])
        if len(groups) == 1 and groups[0].want_prompt_logprobs:
            return self._prefill_with_prompt_logprobs(groups[0])
        if len(groups) == 1 and groups[0].no_output:
            return self._finish_unsampled(groups[0])
        last_logits, cache, mask = self.runner.prefill([g.prompt_ids for g in groups])
        self._start_and_join(groups, last_logits, cache, mask)

    def _resume(self, group: PromptGroup) -> None:
        """A preempted sequence's tokens so far go through the model again to rebuild its cache;
        then it decodes on from its last token (nothing is sampled here)."""
        cache, mask = self.runner.resume(group.prompt_ids)
        seq = group.seqs[0]
        seq.status = Status.RUNNING
        self.batch.add([seq], cache, mask)

    def _start_and_join(self, groups: list[PromptGroup], last_logits: torch.Tensor, cache: DynamicCache,
                        mask: torch.Tensor) -> None:
        """Samples each new sequence's first token from its prompt's last logits, then merges the
        sequences into the running batch."""
        rows = _fork_rows(groups, self.device)
        seqs = _start(groups)
        self._sample_and_append(last_logits.index_select(0, rows), seqs)
        self._join(seqs, rows, cache, mask)

    def _prefill_with_prompt_logprobs(self, group: PromptGroup) -> None:
        """Echo + logprobs and vLLM's prompt_logprobs need the logits of every prompt position: the
        runner hands them over a chunk at a time (model_runner.ModelRunner.prefill_in_chunks), and each
        chunk becomes logprob entries."""
        p = group.seqs[0].params
        as_ids = p.return_tokens_as_token_ids
        echo = None
        if p.echo and p.logprobs is not None:   # the first prompt token has no logprob
            echo = [self.outputs.logprob(group.prompt_ids[0], None, [], as_ids)]
        ranked: Optional[list] = [None] if p.prompt_logprobs is not None else None   # vLLM: none for the first token

        def score(start: int, end: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
            tokens, logits = group.prompt_ids[start + 1:end + 1], logits[:len(targets)]
            if echo is not None:
                echo.extend(self.outputs.prompt_logprobs(tokens, logits, targets, p.logprobs or 0, as_ids))
            if ranked is not None:
                ranked.extend(self.outputs.ranked_logprobs(tokens, logits, targets, p.prompt_logprobs))
        last, cache, mask = self.runner.prefill_in_chunks(group.prompt_ids, score)
        for s in group.seqs:
            s.echo_logprobs, s.prompt_logprobs = echo, ranked
        if group.no_output:
            return self._finish_unsampled(group)
        self._start_and_join([group], last, cache, mask)

    @staticmethod
    def _finish_unsampled(group: PromptGroup) -> None:
        """max_tokens 0 (completions' echo, for the prompt's logprobs): each choice ends with its
        prompt alone, finish_reason "length", without a forward unless prompt logprobs need one."""
        for s in _start([group]):
            s.finish("length")

    def _mixed(self, groups: list[PromptGroup], plan: StepPlan) -> list[PromptGroup]:
        """One forward: a token for every running row and the first token of each new prompt.
        Returns the prompt groups it prefilled: `groups`, then those that joined midway."""
        inputs = self.batch.step_inputs() if len(self.batch) else None
        poll = self._late_prompts(plan) if self.arrivals is not None else None
        logits, step = self.runner.mixed(inputs, self.batch.cache, [g.prompt_ids for g in groups], poll)
        groups = groups + plan.late
        b = len(self.batch)
        rows = _fork_rows(groups, self.device)
        seqs = _start(groups)
        self._sample_and_append(logits.index_select(0, torch.cat([torch.arange(b, device=self.device), rows + b])),
                                self.batch.seqs + seqs)
        self.batch.remove_finished()
        if groups:
            cache, mask = prompt_cache(step.new_kv, [len(g.prompt_ids) for g in groups])
            self._join(seqs, rows, cache, mask)
        return groups

    def _late_prompts(self, plan: StepPlan) -> Callable[[], list[list[int]]]:
        """Late admission's poll (model_runner.run_mixed): takes the requests posted since the step
        began, and returns the prompts that may join the step now."""
        def poll() -> list[list[int]]:
            self.arrivals()
            return [g.prompt_ids for g in self.scheduler.late_prefills(plan)]
        return poll

    def _join(self, seqs: list[Sequence], rows: torch.Tensor, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Merges new sequences that did not finish on their first token into the batch; `rows` maps
        each to its prompt's row of `cache`/`mask`."""
        alive = [i for i, s in enumerate(seqs) if not s.finished]
        if not alive:
            return
        keep = rows[torch.tensor(alive, device=self.device)]
        cache.batch_select_indices(keep)      # forks n > 1 rows and drops finished ones in one copy
        self.batch.add([seqs[i] for i in alive], cache, mask.index_select(0, keep))

    def _decode(self) -> None:
        self._sample_and_append(self.runner.decode(self.batch.step_inputs()), self.batch.seqs)

    def _sample_and_append(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        tokens = self.sampler(logits, seqs)
        if self.lockstep is not None:   # every rank continues with rank 0's tokens
            tokens = self.lockstep.tokens(tokens)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            self.outputs.token_logprobs(logits, tokens, seqs, want)
        for s, t in zip(seqs, tokens.tolist()):
            self._append(s, t)

    def _append(self, seq: Sequence, token: int) -> None:
        """Takes a sampled token. A failure here (detokenizing, stop strings, the grammar) concerns
        this request only: it ends with the error and the batch goes on."""
        if seq.no_token_left:   # its own masks excluded every token (sampler): a 400 for it alone
            return self._fail(seq.owner, no_token_left(seq))
        try:
            self.outputs.take(seq, token)
        except Exception as exc:
            logger.exception("processing a sampled token failed; failing its request only")
            self._fail(seq.owner, exc)

    def _fail(self, req: EngineRequest, exc: Exception) -> None:
        """Ends every sequence of `req`, waiting or running; its next chunk is `exc`. Under TP every
        rank ends up failing it: rank 0 tells the others (tp.Lockstep.failed)."""
        req.error = exc
        if self.lockstep is not None:
            self.lockstep.failed(req.request_id)
        self.scheduler.abort(req.request_id)
        for s in req.seqs:
            if not s.finished:
                s.finish("error")

    def _chunk(self, req: EngineRequest) -> Union[GenerateChunk, Exception]:
        chunk = self.outputs.chunk(req)
        if req.error is not None or req.finished:
            self.requests.pop(req.request_id, None)
        return chunk

    # ------------------------------------------------------------------ construction

    def _make_group(self, req: EngineRequest, p_index: int, prompt: list[int]) -> PromptGroup:
        params, n = req.params, req.params.n
        seqs = []
        for j in range(n):
            seed = None if params.seed is None else params.seed + p_index * n + j
            seq = Sequence(req.request_id, p_index * n + j, prompt, params, req.max_tokens[p_index],
                           IncrementalDetokenizer(self.tokenizer, prompt, skip_special_tokens=params.skip_special_tokens),
                           StopMatcher(params.stop, include=params.include_stop_str_in_output),
                           make_generator(seed, self.device), owner=req, matcher=new_matcher(req.grammar))
            seqs.append(seq)
        want = (params.echo and params.logprobs is not None) or params.prompt_logprobs is not None
        return PromptGroup(req.request_id, prompt, seqs, want_prompt_logprobs=want,
                           no_output=req.max_tokens[p_index] == 0)


def _fork_rows(groups: list[PromptGroup], device: torch.device) -> torch.Tensor:
    """Each sequence's prompt row: a group's n sequences share their prompt's logits and cache."""
    return torch.tensor([r for r, g in enumerate(groups) for _ in g.seqs], dtype=torch.long, device=device)


def _start(groups: list[PromptGroup]) -> list[Sequence]:
    seqs = [s for g in groups for s in g.seqs]
    now = time.monotonic()
    for s in seqs:
        s.status = Status.RUNNING
        if s.owner is not None and s.owner.scheduled_at is None:
            s.owner.scheduled_at = now
    return seqs


def _similar_lengths(groups: list[PromptGroup], max_waste: float = 0.25) -> list[list[PromptGroup]]:
    """Cuts length-sorted groups into chunks whose left padding stays under `max_waste`."""
    chunks: list[list[PromptGroup]] = []
    for g in groups:
        if chunks:
            tokens = sum(len(x.prompt_ids) for x in chunks[-1]) + len(g.prompt_ids)
            if len(g.prompt_ids) * (len(chunks[-1]) + 1) <= tokens * (1 + max_waste):
                chunks[-1].append(g)
                continue
        chunks.append([g])
    return chunks
