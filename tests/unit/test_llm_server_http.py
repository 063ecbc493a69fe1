"""The HTTP -> ingress -> LLMServer path with a fake engine: request preparation (chat template,
tokenization, max_tokens) and streaming, all without torch (checked in a fresh process)."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys


def serve_once() -> dict:
    """One streamed and one whole chat completion over HTTP; returns what came back and which heavy
    modules the process imported."""
    import httpx2

    from deployments.config import ChatModelConfig, parse_app_config
    from deployments.llm.built_engine import BuiltEngine
    from deployments.llm.server import LLMServer
    from ingress.api import create_api
    from ingress.backends import ModelEntry, ModelRegistry
    from tests.unit.fakes import ByteTokenizer, FakeImageStore, FakeServingEngine

    fake = FakeServingEngine()
    server = LLMServer(ChatModelConfig(id="tiny", kind="chat", source="x"),
                       engine_factory=lambda cfg: BuiltEngine(fake, ByteTokenizer(), 64))
    cfg = parse_app_config({"models": [{"id": "tiny", "kind": "chat", "source": "x"}]})
    app = create_api(ModelRegistry({"tiny": ModelEntry(cfg.models[0], _InProcess(server))}),
                     image_store=FakeImageStore())

    async def go():
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t") as h:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            whole = (await h.post("/v1/chat/completions", json=body)).json()
            events = []
            async with h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
            return whole, events
    whole, events = asyncio.run(go())
    heavy = [m for m in ("torch", "transformers") if m in sys.modules]
    prompt = fake.requests[0].prompts[0]
    return {"whole": whole, "streamed": "".join(e["choices"][0]["delta"].get("content") or "" for e in events),
            "prompt": bytes(prompt).decode(), "max_tokens": fake.requests[0].max_tokens, "heavy": heavy}


class _InProcess:
    """The LLMServer as the ingress's model client, in this process (no Serve handle)."""

    def __init__(self, server):
        self.server = server

    async def card(self):
        return self.server.card()

    async def generate(self, req):
        return await self.server.generate(req)

    def generate_stream(self, req):
        return self.server.generate_stream(req)


def test_http_to_llm_server_through_a_fake_engine_without_torch():
    code = "import json; from tests.unit.test_llm_server_http import serve_once; print(json.dumps(serve_once()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    assert got["prompt"] == "<user>hi<assistant>" and got["max_tokens"] == [4]
    assert got["whole"]["choices"][0]["message"]["content"] == "fake" == got["streamed"]
    assert got["whole"]["choices"][0]["finish_reason"] == "length"
    assert got["whole"]["usage"]["completion_tokens"] == 4
