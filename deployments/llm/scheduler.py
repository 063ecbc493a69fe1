"""Admission: which waiting prompt groups join the running batch at the next step.

A group is one prompt with its `n` sequences (prefilled once, then forked). Groups join in
arrival order while the batch stays within `max_num_seqs` rows and the KV budget
(`max_num_batched_tokens`, padding included), and while the prompt tokens prefilled since the
last decode step stay under `max_prefill_tokens` (the first prompt after a decode step always
goes), so running streams keep moving and arrivals are admitted a few at a time. With mixed steps
(engine.py) every step decodes, so the budget is per step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from deployments.llm.batch import RunningBatch
from deployments.llm.sequence import Sequence, Status


@dataclass(eq=False)
class PromptGroup:
    request_id: str
    prompt_ids: list[int]
    seqs: list[Sequence]
    want_prompt_logprobs: bool = False
    resume: bool = False   # a preempted sequence coming back: prefill its tokens so far, sample nothing

    @property
    def alone(self) -> bool:
        """Needs a forward of its own (every position's logits, or no sampling at its end)."""
        return self.want_prompt_logprobs or self.resume


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_prefill_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[PromptGroup] = deque()

    def add(self, group: PromptGroup) -> None:
        self.waiting.append(group)

    def preempt(self, seq: Sequence) -> None:
        """Puts a running sequence back at the head of the queue, to be recomputed: its prompt and
        all but its last output token are prefilled again when it is admitted, and it goes on
        decoding from its last token."""
        seq.status = Status.WAITING
        self.waiting.appendleft(PromptGroup(seq.request_id, seq.prompt_ids + seq.output_ids[:-1], [seq], resume=True))

    def abort(self, request_id: str) -> None:
        self.waiting = deque(g for g in self.waiting if g.request_id != request_id)

    def next_prefills(self, batch: RunningBatch, spent: int = 0, extra_rows: int = 0,
                      extra_width: int = 0) -> list[PromptGroup]:
        """Groups to prefill now. `spent`: prompt tokens already prefilled since the last decode
        step; while it is 0 the head group always may go, otherwise only within the budget.
        `extra_rows`/`extra_width`: rows and width of prompts already taken for this step."""
        picked: list[PromptGroup] = []
        rows, width, prefill = len(batch) + extra_rows, max(batch.width + 1, extra_width), spent
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
