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
from deployments.types import RankedLogprob, SamplingParams, TokenLogprob

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
    echo_logprobs: Optional[list[Optional[TokenLogprob]]] = None   # echo + logprobs: the prompt's entries
    prompt_logprobs: Optional[list[Optional[list[RankedLogprob]]]] = None   # vLLM's prompt_logprobs, until sent
    ids_sent: int = 0             # return_token_ids: output tokens already in a delta
    prompt_ids_sent: bool = False  # return_token_ids: the prompt's ids went out (on the first delta)
    owner: Any = None   # the engine-side request this sequence belongs to
    no_token_left: bool = False   # its masks (grammar, bans, allowed tokens) excluded every token (sampler)
    matcher: Any = None  # xgrammar GrammarMatcher: response_format, structured_outputs or a forced tool call
    _bias: Optional[tuple] = field(default=None, repr=False)
    _allowed: Optional[torch.Tensor] = field(default=None, repr=False)
    _seen: Optional[torch.Tensor] = field(default=None, repr=False)
    _seen_outputs: int = field(default=0, repr=False)

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

    def allowed_tokens(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """allowed_token_ids as a tensor, built once per sequence (without ids the model's head lacks)."""
        if self._allowed is None:
            ids = sorted(i for i in set(self.params.allowed_token_ids) if i < vocab_size)
            self._allowed = torch.tensor(ids, dtype=torch.long, device=device)
        return self._allowed

    def bad_word_bans(self) -> list[int]:
        """vLLM's bad_words: the last token of each bad word whose other tokens end the output so far
        (a one-token word is always banned)."""
        out = self.output_ids
        return [w[-1] for w in self.params.bad_word_ids
                if len(w) - 1 <= len(out) and out[len(out) - len(w) + 1:] == w[:-1]]

    def seen_tokens(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """A [vocab_size] mask of the tokens in the prompt and the output so far (repetition_penalty),
        built from the prompt once and then kept up to date with each new output token."""
        if self._seen is None:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self._mark_seen(self.prompt_ids)
        if self._seen_outputs < len(self.output_ids):
            self._mark_seen(self.output_ids[self._seen_outputs:])
            self._seen_outputs = len(self.output_ids)
        return self._seen

    def _mark_seen(self, ids: list[int]) -> None:
        t = torch.tensor(ids, dtype=torch.long, device=self._seen.device)
        self._seen[t[t < self._seen.shape[0]]] = True   # a tokenizer may hold ids the model's head lacks

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
