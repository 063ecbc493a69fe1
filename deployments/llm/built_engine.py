"""What an engine factory hands the LLMServer: the serving engine, its tokenizer and context window,
and the interface the server needs from that engine (so a fake can stand in, in unit tests).

Must not import torch: the server and its fakes use it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from deployments.types import GenerateChunk


@dataclass(frozen=True)
class EngineLoad:
    """What an engine holds, as of its last step: what autoscaling and stats read."""

    running_seqs: int = 0            # in the running batch
    waiting_seqs: int = 0            # waiting for a place in it (a request's n sequences count n)
    waiting_prompt_tokens: int = 0   # prompt tokens still to prefill for the waiting sequences

    @property
    def seqs(self) -> int:
        return self.running_seqs + self.waiting_seqs


class ServingEngine(Protocol):
    """What LLMServer calls on its engine (AsyncLLMEngine is the real one)."""

    num_in_flight_seqs: int

    def generate(self, req: Any) -> AsyncIterator[GenerateChunk]: ...   # req: request.EngineRequest
    def check_health(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def load(self) -> EngineLoad: ...
    def grammars(self) -> Any: ...   # a structured.Grammars over the engine's vocabulary


@dataclass
class BuiltEngine:
    engine: ServingEngine
    tokenizer: Any
    max_model_len: int
