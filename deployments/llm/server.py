"""The chat/completions Serve deployment: a plain class the app builder wraps with serve.deployment.

It turns GenerateRequests into engine requests (chat template, tokenization, context checks,
tools, grammars) and streams GenerateChunks back, with tool calls parsed out of the text. Torch
and transformers load inside __init__ only, so importing this module (as the ingress builder
does) stays light. No FastAPI here.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Optional

from deployments.autoscaling import RUNNING_SEQUENCES, SEQUENCES, WAITING_PROMPT_TOKENS, WAITING_SEQUENCES
from deployments.config import ChatModelConfig
from deployments.errors import ContextLengthExceededError, InvalidRequestError, OverloadedError
from deployments.llm.built_engine import BuiltEngine
from deployments.llm.tool_calls import FORMATS, ToolCallStream, ToolFormat, default_parser
from deployments.loading import loading, phase
from deployments.types import (Choice, ChoiceDelta, GenerateChunk, GenerateRequest, GenerateResult,
                               ModelCard, TokenizeRequest, TokenizeResult, constraint_param, truncation_length)

LEGACY_COMPLETIONS_MAX_TOKENS = 16   # OpenAI's default max_tokens for /v1/completions


class LLMServer:
    def __init__(self, model_cfg: ChatModelConfig, *,
                 engine_factory: Optional[Callable[[ChatModelConfig], BuiltEngine]] = None):
        self.cfg = model_cfg
        with loading(model_cfg):
            if engine_factory is None:   # torch and transformers load here, not at import
                from deployments.llm.factory import build_async_engine as engine_factory
                phase("imports")
            built: BuiltEngine = engine_factory(model_cfg)
        self.engine, self.tokenizer, self.max_model_len = built.engine, built.tokenizer, built.max_model_len
        self.created = int(time.time())
        self.tool_format = FORMATS[model_cfg.engine.tool_parser or default_parser(self.tokenizer.chat_template)]
        self._grammar_cache = None
        self._compile_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")

    @staticmethod
    def default_options(cfg: ChatModelConfig) -> dict[str, Any]:
        e = cfg.engine
        return {"max_ongoing_requests": e.max_num_seqs + e.max_waiting, "max_queued_requests": 1024,
                "num_replicas": 1, "ray_actor_options": {"num_cpus": 1},
                "health_check_period_s": 10, "graceful_shutdown_timeout_s": 30}

    def card(self) -> ModelCard:
        return replace(self.cfg.card(self.created), context_length=self.max_model_len)

    def stats(self) -> dict[str, int]:
        """Engine occupancy (for tests, dashboards and autoscaling decisions)."""
        return self.engine.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's per-replica custom metrics hook (called every few tenths of a second while the
        deployment autoscales): the engine's load, which autoscaling.QueueDepthPolicy scales on."""
        load = self.engine.load()
        return {SEQUENCES: load.seqs, RUNNING_SEQUENCES: load.running_seqs, WAITING_SEQUENCES: load.waiting_seqs,
                WAITING_PROMPT_TOKENS: load.waiting_prompt_tokens}

    async def check_health(self) -> None:
        self.engine.check_health()

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        """The whole result at once (one Ray round trip for non-streaming calls)."""
        merged: dict[int, ChoiceDelta] = {}
        usage = None
        async for chunk in self.generate_stream(req):
            for d in chunk.choices:
                merged.setdefault(d.index, ChoiceDelta(d.index)).extend(d)
            usage = chunk.usage or usage
        want_logprobs = req.sampling.logprobs is not None
        choices = [Choice(i, d.text, d.finish_reason, d.logprobs if want_logprobs else None, d.tool_calls,
                          d.token_ids, d.prompt_token_ids, d.prompt_logprobs)
                   for i, d in sorted(merged.items()) if d.finish_reason is not None]
        return GenerateResult(choices, usage)

    async def generate_stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        ereq = self._prepare(req)
        spec = self._grammar_spec(req)
        if spec is not None:
            ereq.grammar = await self._compile(spec)
            ereq.grammar_spec = spec
        stream = self.engine.generate(ereq)
        if req.tools is None:
            async for chunk in stream:
                yield chunk
            return
        async for chunk in _with_tool_calls(stream, self.tool_format):
            yield chunk

    def _grammar_spec(self, req: GenerateRequest) -> Optional[dict]:
        """What the reply is constrained to: the response_format, or for tool_choice "required" or a
        named function, well-formed calls in the model's tool format whose arguments match the schemas."""
        if req.tools is not None and req.tools.choice != "auto":
            return self.tool_format.structural_tag(req.tools)
        return req.response_format

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        """Token ids exactly as generation would see them: chat messages through the chat template
        (with `tools` as generation offers them), or a plain prompt."""
        if req.messages is not None:
            from deployments.llm.chat_template import render_chat
            text = render_chat(self.tokenizer, req.messages, req.tools, self.tool_format, req.template)
        else:
            text = req.prompt or ""
        ids = self.tokenizer(text, add_special_tokens=req.add_special_tokens)["input_ids"]
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResult(list(ids), self.max_model_len, strs)

    async def detokenize(self, tokens: list[int]) -> str:
        self._check_token_ids(tokens, "tokens")
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ request preparation

    def _prepare(self, req: GenerateRequest):
        from deployments.llm.request import EngineRequest
        from deployments.llm.chat_template import render_chat
        p = req.sampling
        if p.n > self.cfg.engine.max_n:
            raise InvalidRequestError(f"n={p.n} is above this model's limit of {self.cfg.engine.max_n}.", param="n")
        if req.tools is not None and len(req.tools.tools) > self.cfg.engine.max_tools:
            raise InvalidRequestError(f"Too many tools: {len(req.tools.tools)}; this model accepts at most "
                                      f"{self.cfg.engine.max_tools}.", param="tools", code="invalid_value")
        if req.messages is not None:
            text = render_chat(self.tokenizer, req.messages, req.tools, self.tool_format, req.template)
            prompts, what = [self.tokenizer(text, add_special_tokens=False)["input_ids"]], "messages"
        else:
            prompts, what = [self._tokenize(x) for x in req.prompts or []], "prompt"
        prompts = self._truncate(prompts, p.truncate_prompt_tokens, p.truncation_side)
        self._check_token_ids(p.logit_bias.keys(), "logit_bias")
        self._check_token_ids(p.stop_token_ids, "stop_token_ids")
        self._check_token_ids(p.allowed_token_ids or (), "allowed_token_ids")
        p = replace(p, temperature=self.cfg.engine.default_temperature if p.temperature is None else p.temperature,
                    top_p=self.cfg.engine.default_top_p if p.top_p is None else p.top_p,
                    bad_word_ids=self._bad_word_ids(p.bad_words))
        max_tokens = [self._max_tokens(len(ids), p.max_tokens, what) for ids in prompts]
        return EngineRequest(req.request_id, prompts, p, max_tokens)

    async def _compile(self, spec: dict[str, Any]) -> Any:
        """Compiles a grammar (structured.py) off the event loop, on at most two threads, within
        grammar_compile_timeout_s: a spec still compiling then is a 400 naming its request field; one
        still waiting for a thread is a 503. (A compile cannot be interrupted; it finishes on its
        thread and is cached.)"""
        param = constraint_param(spec)
        timeout = self.cfg.engine.grammar_compile_timeout_s
        job = self._compile_pool.submit(self._grammars().compile, spec)
        done, _ = await asyncio.wait({asyncio.wrap_future(job)}, timeout=timeout)
        if done:
            return done.pop().result()
        if job.cancel():
            raise OverloadedError("Structured-output grammars are busy compiling; retry shortly.")
        raise InvalidRequestError(f"The '{param}' constraint took over {timeout:g} s to compile; simplify it.",
                                  param=param, code="schema_too_complex")

    def _grammars(self):
        if self._grammar_cache is None:
            self._grammar_cache = self.engine.grammars()
        return self._grammar_cache

    def _truncate(self, prompts: list[list[int]], keep: Optional[int], side: str) -> list[list[int]]:
        """vLLM's truncate_prompt_tokens: `keep` tokens of each prompt (-1: as many as the context window
        holds), its last ones (side "left") or its first ("right"); more than the window is a 400, as in vLLM."""
        if keep is None:
            return prompts
        keep = truncation_length(keep, self.max_model_len, "maximum context length")
        return [ids[-keep:] if side == "left" else ids[:keep] for ids in prompts]

    def _bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad_words: each word as it reads at the start of a text and, where that
        is another token sequence of the same length, after a space (as inside a text)."""
        out = []
        for word in words:
            plain = self.tokenizer(word.lstrip(), add_special_tokens=False)["input_ids"]
            spaced = self.tokenizer(" " + word.lstrip(), add_special_tokens=False)["input_ids"]
            out.append(list(plain))
            if spaced and len(spaced) == len(plain) and spaced[0] != plain[0]:
                out.append(list(spaced))
        return [ids for ids in out if ids]

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            self._check_token_ids(ids, "prompt")
        if not ids:
            raise InvalidRequestError("The prompt must not be empty.", param="prompt")
        return ids

    def _check_token_ids(self, ids, param: str) -> None:
        vocab = len(self.tokenizer)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidRequestError(f"Invalid token id {bad[0]} in '{param}': ids must be in [0, {vocab - 1}].",
                                      param=param, code="invalid_value")

    def _max_tokens(self, prompt_len: int, asked: Optional[int], what: str) -> int:
        limit = self.max_model_len
        room = limit - prompt_len
        if asked is None and room >= 1:
            return min(room, self._default_max_tokens(what))
        wanted = prompt_len + (1 if asked is None else asked)
        if wanted > limit:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{wanted} tokens ({prompt_len} in the {what}, {wanted - prompt_len} in the completion). "
                f"Please reduce the length of the {what} or completion.", param=what)
        return asked

    def _default_max_tokens(self, what: str) -> int:
        """The configured default, else OpenAI's: no cap for chat, 16 for legacy completions."""
        configured = self.cfg.engine.default_max_tokens
        if configured is not None:
            return configured
        return LEGACY_COMPLETIONS_MAX_TOKENS if what == "prompt" else self.max_model_len


async def _with_tool_calls(stream: AsyncIterator[GenerateChunk], fmt: ToolFormat) -> AsyncIterator[GenerateChunk]:
    """Streams each choice's plain content and its tool calls (id and name, then argument fragments)
    as they are generated; the choice's last delta also carries the calls (tool_calls.ToolCallStream).
    A reply cut by max_tokens keeps finish_reason "length", its last call possibly incomplete."""
    splitters: dict[int, ToolCallStream] = {}
    async for chunk in stream:
        out = []
        for d in chunk.choices:
            split = splitters.setdefault(d.index, ToolCallStream(fmt))
            text, deltas = split.push(d.text)
            if d.finish_reason is None:
                if text or d.logprobs or deltas or d.token_ids or d.prompt_token_ids:
                    out.append(replace(d, text=text, tool_call_deltas=deltas or None))
                continue
            rest, calls, more = split.finish(cut=d.finish_reason == "length")
            reason = "tool_calls" if calls and d.finish_reason == "stop" else d.finish_reason
            out.append(replace(d, text=text + rest, finish_reason=reason, tool_calls=calls or None,
                               tool_call_deltas=(deltas + more) or None))
        if out or chunk.usage is not None:
            yield replace(chunk, choices=out)
