"""EngineRequest: a tokenized request as the engine holds it, with its sequences and timings.

Plain data; must not import torch (the server builds these, and its unit tests run without torch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from deployments.types import SamplingParams, Usage

if TYPE_CHECKING:
    from deployments.llm.sequence import Sequence


@dataclass(eq=False)
class EngineRequest:
    """A tokenized request: prompts (token ids), each generating params.n choices."""

    request_id: str                       # the engine's key; AsyncLLMEngine sets its own, unique per engine
    prompts: list[list[int]]
    params: SamplingParams
    max_tokens: list[int]                 # per prompt, already clamped to the context window
    seqs: list[Sequence] = field(default_factory=list)
    echo_sent: set = field(default_factory=set)
    grammar: Any = None                      # compiled grammar: response_format, structured_outputs or forced tool calls
    grammar_spec: Optional[dict] = None      # what `grammar` was compiled from (other TP ranks compile it too)
    error: Optional[Exception] = None        # set when this request failed alone (LLMEngine._append)
    arrival: float = field(default_factory=time.monotonic)
    scheduled_at: Optional[float] = None     # admitted into the running batch (monotonic)
    first_token_at: Optional[float] = None   # set by the metrics, when recorded

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def usage(self) -> Usage:
        return Usage(sum(len(p) for p in self.prompts), sum(len(s.output_ids) for s in self.seqs))
