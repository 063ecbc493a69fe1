"""The scheduler: owns the waiting queue and the running batch, and plans each engine step.

A group is one prompt with its `n` sequences (prefilled once, then forked). Groups join in
arrival order while the batch stays within `max_num_seqs` rows and the KV budget
(`max_num_batched_tokens`, padding included), and while the prompt tokens prefilled since the
last decode step stay under `max_prefill_tokens` (the first prompt after a decode step always
goes), so running streams keep moving and arrivals are admitted a few at a time. With mixed steps
every step decodes, so the budget is per step, and prompts that arrive while a mixed step's
forward runs may still join it within what is left of that budget (late admission).
No model work here: the engine runs the plan.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from deployments.llm.batch import RunningBatch
from deployments.llm.sequence import Sequence, Status

Mode = Literal["mixed", "prefill", "decode", "idle"]


@dataclass(eq=False)
class PromptGroup:
    request_id: str
    prompt_ids: list[int]
    seqs: list[Sequence]
    want_prompt_logprobs: bool = False
    resume: bool = False   # a preempted sequence coming back: prefill its tokens so far, sample nothing
    no_output: bool = False   # max_tokens 0 (completions' echo): the prompt (and its logprobs), no token

    @property
    def alone(self) -> bool:
        """Needs a forward of its own (every position's logits, or no sampling at its end)."""
        return self.want_prompt_logprobs or self.resume or self.no_output


@dataclass(eq=False)
class StepPlan:
    """What one engine step does.

    mixed:   one packed forward decodes `decode` and prefills `prefills` (an `alone` group is
             prefilled in its own forward first); prompts may join it midway (`late`).
    prefill: `prefills` are prefilled (and get their first token); running rows wait.
    decode:  every running row gets one token.
    idle:    nothing to do."""

    mode: Mode
    prefills: list[PromptGroup] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)   # running rows when planned (a mixed step
    #                                                        also decodes the alone groups it prefilled)
    late: list[PromptGroup] = field(default_factory=list)  # groups that joined the mixed forward midway
    prefill_tokens: int = 0   # prompt tokens in the mixed forward (prefills not alone, late joins):
    #                           what late admission counts against max_prefill_tokens


class Scheduler:
    def __init__(self, batch: RunningBatch, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_tokens: int, *, mixed_steps: bool = False, mixed_when_idle: bool = False):
        self.batch = batch
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.mixed_steps = mixed_steps            # every step with running rows is one packed forward
        self.mixed_when_idle = mixed_when_idle    # so is a step with none (batch-invariant engines)
        self.waiting: deque[PromptGroup] = deque()
        self._prefill_since_decode = 0   # prompt tokens prefilled since the last decode step

    # ------------------------------------------------------------------ queue

    def add(self, group: PromptGroup) -> None:
        self.waiting.append(group)

    def abort(self, request_id: str) -> None:
        self.waiting = deque(g for g in self.waiting if g.request_id != request_id)

    def num_waiting_seqs(self) -> int:
        return sum(len(g.seqs) for g in self.waiting)

    def waiting_prompt_tokens(self) -> int:
        """Prompt tokens the waiting groups still need prefilled (a group's prompt once, whatever its n)."""
        return _tokens(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting) or len(self.batch) > 0

    def preempt(self, seq: Sequence) -> None:
        """Puts a running sequence back at the head of the queue, to be recomputed: its prompt and
        all but its last output token are prefilled again when it is admitted, and it goes on
        decoding from its last token."""
        seq.status = Status.WAITING
        self.waiting.appendleft(PromptGroup(seq.request_id, seq.prompt_ids + seq.output_ids[:-1], [seq], resume=True))

    # ------------------------------------------------------------------ planning

    def schedule(self) -> StepPlan:
        """The next step's plan. With mixed steps, every step with running rows decodes them, and
        up to max_prefill_tokens of waiting prompts (at least one) are prefilled in the same
        forward. Otherwise a step is a prefill step (new prompts get their first token at once) or
        a decode step (every running row gets one token); between two decode steps at most
        max_prefill_tokens are prefilled (at least one prompt), so a burst of arrivals delays
        running streams by a bounded amount per token, and a prompt that arrives during a small
        prefill step may follow it."""
        self._fit_kv_budget()
        running = len(self.batch)
        if self.mixed_steps and (running or self.mixed_when_idle):
            groups = self._next_prefills()
            self._prefill_since_decode = 0
            packed = _tokens([g for g in groups if not g.alone])
            return StepPlan("mixed", groups, list(self.batch.seqs), prefill_tokens=packed)
        spent = self._prefill_since_decode if running else 0
        groups = self._next_prefills(spent)
        if groups:
            self._prefill_since_decode = spent + _tokens(groups)
            return StepPlan("prefill", groups)
        if running:
            self._prefill_since_decode = 0
            return StepPlan("decode", decode=list(self.batch.seqs))
        return StepPlan("idle")

    def late_prefills(self, plan: StepPlan) -> list[PromptGroup]:
        """Waiting prompts that may join the running mixed forward of `plan` now, within the step's
        budgets given the prompts it already holds; they are added to plan.late. Prompts whose
        logprobs are asked for never join (they need their own forward) and stay at the head of the queue."""
        if not self.waiting or self.waiting[0].alone:
            return []
        taken = [g for g in plan.prefills if not g.alone] + plan.late
        picked = self._next_prefills(plan.prefill_tokens, extra_rows=sum(len(g.seqs) for g in taken),
                                     extra_width=max((len(g.prompt_ids) + 1 for g in taken), default=0))
        cut = next((i for i, g in enumerate(picked) if g.alone), len(picked))
        self.waiting.extendleft(reversed(picked[cut:]))
        plan.late.extend(picked[:cut])
        plan.prefill_tokens += _tokens(picked[:cut])
        return picked[:cut]

    def _fit_kv_budget(self) -> None:
        """Keeps the running batch's cache, after this step's new column, within the KV budget
        (max_num_batched_tokens): the most recently admitted rows go back to the waiting queue, to
        be recomputed when there is room again (vLLM's recompute preemption). A lone row is never
        preempted."""
        budget = self.max_num_batched_tokens
        while len(self.batch) > 1 and len(self.batch) * (self.batch.width + 1) > budget:
            victim = self.batch.seqs[-1]
            self.batch.remove(lambda s: s is victim)
            self.preempt(victim)

    def _next_prefills(self, spent: int = 0, extra_rows: int = 0, extra_width: int = 0) -> list[PromptGroup]:
        """Groups to prefill now. `spent`: prompt tokens already prefilled since the last decode
        step; while it is 0 the head group always may go, otherwise only within the budget.
        `extra_rows`/`extra_width`: rows and width of prompts already taken for this step."""
        picked: list[PromptGroup] = []
        rows, width, prefill = len(self.batch) + extra_rows, max(self.batch.width + 1, extra_width), spent
        while self.waiting:
            group = self.waiting[0]
            n, length = len(group.seqs), len(group.prompt_ids)
            new_width = max(width, length + 1)
            room = (rows + n <= self.max_num_seqs
                    and (rows + n) * new_width <= self.max_num_batched_tokens)
            budget = prefill == 0 or prefill + length <= self.max_prefill_tokens   # one prompt always may go
            if not (budget and (room or not rows)):   # an idle engine always takes the head, however big
                break
            picked.append(self.waiting.popleft())
            rows, width, prefill = rows + n, new_width, prefill + length
        return picked


def _tokens(groups: list[PromptGroup]) -> int:
    return sum(len(g.prompt_ids) for g in groups)
