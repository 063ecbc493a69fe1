"""Tiny stand-ins for unit tests: a byte-level tokenizer, a tiny random Llama, fake model clients."""
from __future__ import annotations

import asyncio
import io
from typing import AsyncIterator

import numpy as np

from deployments.types import (Choice, ChoiceDelta, EmbedResult, GenerateChunk, GenerateResult, ImageResult,
                               ModelCard, RankedLogprob, ScoreResult, TokenizeResult, TokenLogprob, ToolCall, ToolCallDelta, Usage)


class ByteTokenizer:
    """ids 0..255 are bytes, 256 is EOS; decode mirrors a byte-level BPE's behaviour on split UTF-8."""

    eos_token_id = 256
    pad_token_id = 256
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

    def __len__(self) -> int:
        return 257

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, continue_final_message=False,
                            **kw):
        import jinja2
        text = jinja2.Template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          **kw)
        if continue_final_message:   # as transformers does: the text ends with the last message's content
            final = messages[-1]["content"]
            text = text[: text.rindex(final) + len(final)]
        return text


def tiny_llama(vocab: int = 257, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=256, bos_token_id=None, pad_token_id=256)
    return LlamaForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- fake model clients

PROMPT_IDS = [1, 2, 3]   # what FakeChatClient says the prompt was, with return_token_ids
PROMPT_LOGPROBS = [None, [RankedLogprob(2, -2.5, 4, "b"), RankedLogprob(0, -0.25, 1, "x")],   # with prompt_logprobs: 1
                   [RankedLogprob(3, -0.5, 1, "c")]]


class FakeChatClient:
    """Answers with the last user message reversed, one character per chunk (its bytes are the
    token ids, with return_token_ids)."""

    def __init__(self, fail_with: Exception | None = None):
        self.fail_with = fail_with
        self.requests = []

    async def card(self) -> ModelCard:
        return ModelCard(id="fake-chat", kind="chat", created=1, capabilities=["chat.completions"], context_length=128)

    def _answer(self, req) -> str:
        if req.messages is not None:
            return str(req.messages[-1]["content"])[::-1]
        return str(req.prompts[0])[::-1]

    async def generate(self, req) -> GenerateResult:
        self.requests.append(req)
        if self.fail_with:
            raise self.fail_with
        text = self._answer(req)
        lp = [TokenLogprob(c, -0.5, list(c.encode()), [(c, -0.5, list(c.encode()))]) for c in text]
        ids = (list(text.encode()), PROMPT_IDS) if req.sampling.return_token_ids else (None, None)
        scored = PROMPT_LOGPROBS if req.sampling.prompt_logprobs is not None else None
        choices = [Choice(i, text, "stop", lp if req.sampling.logprobs is not None else None, None, *ids, scored)
                   for i in range(req.sampling.n)]
        if req.tools is not None:
            choices = [Choice(0, "", "tool_calls", None, [ToolCall("call_1", "get_weather", '{"city": "Paris"}')])]
        return GenerateResult(choices, Usage(3, len(text) * req.sampling.n))

    async def generate_stream(self, req) -> AsyncIterator[GenerateChunk]:
        self.requests.append(req)
        if self.fail_with:
            raise self.fail_with
        if req.tools is not None:   # two calls, streamed as the LLM server does: id and name, then fragments
            calls = [ToolCall("call_1", "get_weather", '{"city": "Paris"}'), ToolCall("call_2", "get_time", "{}")]
            yield GenerateChunk([ChoiceDelta(0, "", tool_call_deltas=[ToolCallDelta(0, "call_1", "get_weather", ""),
                                                                      ToolCallDelta(0, None, None, '{"city": ')])])
            yield GenerateChunk([ChoiceDelta(0, "", tool_call_deltas=[ToolCallDelta(0, None, None, '"Paris"}'),
                                                                      ToolCallDelta(1, "call_2", "get_time", "{}")])])
            yield GenerateChunk([ChoiceDelta(0, "", None, "tool_calls", calls)], Usage(3, 9))
            return
        text = self._answer(req)
        for k, c in enumerate(text):
            last = k == len(text) - 1
            lp = [TokenLogprob(c, -0.5, list(c.encode()))] if req.sampling.logprobs is not None else None
            ids = {"token_ids": list(c.encode()), "prompt_token_ids": None if k else PROMPT_IDS} \
                if req.sampling.return_token_ids else {}
            so_far = Usage(3, (k + 1) * req.sampling.n) if req.sampling.continuous_usage and not last else None
            yield GenerateChunk([ChoiceDelta(i, c, lp, "stop" if last else None, **ids) for i in range(req.sampling.n)],
                                Usage(3, len(text) * req.sampling.n) if last else None, so_far)
            await asyncio.sleep(0)


    async def tokenize(self, req) -> TokenizeResult:
        self.requests.append(req)
        text = req.prompt if req.messages is None else "".join(m["content"] for m in req.messages)
        ids = list(text.encode())
        return TokenizeResult(ids, 128, [chr(i) for i in ids] if req.return_token_strs else None)

    async def detokenize(self, tokens) -> str:
        return bytes(tokens).decode()


class FakeRerankClient:
    """Scores a pair by the words its two texts share."""

    async def card(self) -> ModelCard:
        return ModelCard(id="fake-rerank", kind="rerank", created=1, capabilities=["rerank", "score"])

    async def score(self, req) -> ScoreResult:
        scores = [float(len(set(q.split()) & set(d.split()))) for q, d in req.pairs]
        return ScoreResult(scores, sum(len(q) + len(d) for q, d in req.pairs))


class FakeEmbedClient:
    def __init__(self, dim: int = 8):
        self.dim = dim

    async def card(self) -> ModelCard:
        return ModelCard(id="fake-embed", kind="embedding", created=1, embedding_dimensions=self.dim)

    async def embed(self, req) -> EmbedResult:
        vecs = np.stack([np.full(self.dim, float(len(x)), dtype=np.float32) for x in req.inputs])
        return EmbedResult(vecs, sum(len(x) for x in req.inputs))


class FakeImageClient:
    async def card(self) -> ModelCard:
        return ModelCard(id="fake-image", kind="image", created=1, image_sizes=["64x64"])

    async def images(self, req) -> ImageResult:
        from PIL import Image
        out = []
        for _ in range(req.n):
            buf = io.BytesIO()
            Image.new("RGB", (req.width, req.height), (255, 0, 0)).save(buf, format="PNG")
            out.append(buf.getvalue())
        return ImageResult(out)


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    async def remote(self, *args):
        return self.fn(*args)


class FakeImageStore:
    """Mimics the ImageStore handle (`.put.remote`, `.get.remote`, ...) over a real ImageStore."""

    def __init__(self, ttl_s: int = 3600, **kw):
        from deployments.images.store import ImageStore
        self.store = ImageStore(ttl_s, **kw)
        self.put = _Remote(self.store.put)
        self.get = _Remote(self.store.get)
        self.url_secret = _Remote(self.store.url_secret)




def byte_grammars():
    """structured.Grammars over ByteTokenizer's vocabulary (xgrammar sees raw bytes, 256 is EOS)."""
    import xgrammar as xgr
    from deployments.llm.structured import Grammars
    info = xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b""], xgr.VocabType.RAW, vocab_size=257,
                             stop_token_ids=[256])
    return Grammars(ByteTokenizer(), 257, [256], tokenizer_info=info)


class FakeServingEngine:
    """Stands in for AsyncLLMEngine behind a real LLMServer (built_engine.ServingEngine): every
    choice streams the bytes of "fake reply" one per chunk, up to its max_tokens. Needs no torch."""

    REPLY = "fake reply"

    def __init__(self):
        self.num_in_flight_seqs = 0
        self.requests = []

    async def generate(self, req) -> AsyncIterator[GenerateChunk]:
        self.requests.append(req)
        n, limit = req.params.n * len(req.prompts), req.max_tokens[0]
        text = self.REPLY[:limit]
        reason = "length" if limit < len(self.REPLY) else "stop"
        for k, c in enumerate(text):
            last = k == len(text) - 1
            yield GenerateChunk([ChoiceDelta(i, c, None, reason if last else None) for i in range(n)],
                                Usage(sum(len(p) for p in req.prompts), len(text) * n) if last else None)
            await asyncio.sleep(0)

    def check_health(self) -> None:
        return None

    def stats(self) -> dict[str, int]:
        return {"running": 0, "waiting": 0, "in_flight_seqs": self.num_in_flight_seqs}

    def load(self):
        from deployments.llm.built_engine import EngineLoad
        return EngineLoad()

    def grammars(self):
        raise NotImplementedError("FakeServingEngine serves no structured outputs")
