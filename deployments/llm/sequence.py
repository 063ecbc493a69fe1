"""One generated choice: its tokens, sampling state, text and finish reason.

A request with `n` choices over several prompts owns several sequences; each knows its choice
index. Sequences are created and mutated only on the engine thread.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from deployments.llm.detokenizer import IncrementalDetokenizer, StopMatcher
from deployments.types import SamplingParams, TokenLogprob

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(eq=False)
class Sequence:
    request_id: str
    choice_index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    detok: IncrementalDetokenizer
    stop: StopMatcher
    generator: Optional[torch.Generator] = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None
    finish_reported: bool = False   # its finishing delta went out (engine._delta)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None   # echo + logprobs
    owner: Any = None   # the engine-side request this sequence belongs to
    matcher: Any = None  # xgrammar GrammarMatcher: response_format or a forced tool call (structured.py)
    _bias: Optional[tuple] = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """logit_bias as (token ids, values), built once per sequence."""
        if self._bias is None:
            self._bias = (torch.tensor(list(self.params.logit_bias), dtype=torch.long),
                          torch.tensor(list(self.params.logit_bias.values()), dtype=torch.float32))
        return self._bias

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
