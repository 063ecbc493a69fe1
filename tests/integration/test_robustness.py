"""One client cannot hurt another, on the real application: shared x-request-id values, bodies over
the size limit, never-servable requests, clients that go away mid-request, and /ready's per-model
detail."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from tests.integration.conftest import CHAT, EMB, IMG, default_app_args


def _base(server_url: str) -> str:
    return server_url.removesuffix("/v1")


def test_concurrent_requests_sharing_one_x_request_id_each_get_their_own_answer(server_url):
    prompts = [f"Count from {i} to {i + 3}." for i in range(6)]

    async def go():
        async with httpx.AsyncClient(base_url=server_url, timeout=60) as h:
            return await asyncio.gather(*(h.post("/completions", headers={"x-request-id": "retry-42"}, json={
                "model": CHAT, "prompt": p, "max_tokens": 6 + i, "temperature": 0}) for i, p in enumerate(prompts)))
    rs = asyncio.run(asyncio.wait_for(go(), 120))
    assert [r.status_code for r in rs] == [200] * 6
    assert all(r.headers["x-request-id"] == "retry-42" for r in rs)
    assert [r.json()["usage"]["completion_tokens"] for r in rs] == [6 + i for i in range(6)]


def test_a_50_mb_body_is_refused_with_413_before_it_is_read(server_url, measured):
    """The headers announce 50 MB and the client sends none of it: the 413 must come anyway."""
    url = httpx.URL(server_url)
    began = time.perf_counter()
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{\"model\": \"x\", \"input\": \"" % (50 << 20))
        reply = b""
        while not (b'"code"' in reply and reply.rstrip().endswith((b"}", b"\r\n0"))):   # plain or chunked
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    took = time.perf_counter() - began
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    assert json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])["error"]["code"] == "request_too_large"
    measured(f"50 MB body refused in {took * 1000:.0f} ms")


def test_a_completion_that_can_never_fit_is_400_naming_the_limit(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=CHAT, prompt=["a"] * 300, max_tokens=1)
    assert "max_num_seqs + engine.max_waiting" in info.value.message


def test_ready_lists_every_model_healthy_and_health_is_liveness(server_url):
    with httpx.Client(timeout=30) as h:
        ready = h.get(_base(server_url) + "/ready")
        health = h.get(_base(server_url) + "/health")
    assert ready.status_code == 200 and health.status_code == 200
    models = ready.json()["models"]
    assert set(models) == {m["id"] for m in default_app_args()["models"]} >= {CHAT, EMB, IMG}
    assert all(m["healthy"] and m["status"] == "HEALTHY" and m["running_replicas"] >= 1 for m in models.values())


def test_each_request_leaves_one_access_log_line_in_the_ingress_replica_log_without_its_prompt(server_url):
    import glob
    import os

    import ray
    marker = f"access-{os.getpid()}-{time.time_ns()}"
    with httpx.Client(timeout=60) as h:
        r = h.post(server_url + "/chat/completions", headers={"x-request-id": marker}, json={
            "model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": "SECRET-" + marker}]})
    assert r.status_code == 200
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")
    lines: list[str] = []
    deadline = time.time() + 60
    while time.time() < deadline and not lines:
        for path in glob.glob(os.path.join(logs, "replica_modelhub_Ingress_*.log")):
            with open(path, errors="replace") as f:
                lines += [ln for ln in f if marker in ln]
        time.sleep(0.5)
    access = [ln for ln in lines if '"client_request_id": "%s"' % marker in ln]
    assert len(access) == 1, lines
    entry = json.loads(access[0][access[0].index('{"id"'):access[0].rindex("}") + 1])
    assert entry["status"] == 200 and entry["route"] == "/v1/chat/completions" and entry["completion_tokens"] <= 2
    assert not any("SECRET-" in ln for ln in lines)


def test_clients_that_go_away_mid_request_do_not_harm_the_others(server_url):
    """Long chats (streams and plain) and an image start first, so they hold the first rows of the
    running batch; then chats, completions, embeddings and an image that stay. The first ones' clients
    close their connections at random moments (seeded) while the others run. Every other request is
    answered in full, as it is when sent alone, and the models keep serving."""
    import random

    import aiohttp
    rng = random.Random(13)
    stay, leave = [], []
    for i in range(6):
        chat = {"model": CHAT, "messages": [{"role": "user", "content": f"Write about the number {i}."}],
                "max_tokens": 32, "temperature": 0}
        stay += [[("/chat/completions", {**chat, "stream": True}), ("/chat/completions", chat),
                  ("/completions", {"model": CHAT, "prompt": f"{i} plus {i} is", "max_tokens": 24, "temperature": 0}),
                  ("/embeddings", {"model": EMB, "input": [f"sentence {i}.{j}" for j in range(4)]})][i % 4]]
        leave += [("/chat/completions", {**chat, "max_tokens": 300, "stream": i % 2 == 0,
                                         "messages": [{"role": "user", "content": f"A long story, {i}."}]})]
    leave += [("/images/generations", {"model": IMG, "prompt": "a fox", "size": "64x64", "response_format": "b64_json"})]
    stay += [("/images/generations", {"model": IMG, "prompt": "a boat", "size": "64x64", "response_format": "b64_json"})]

    def answer(path: str, status: int, text: str):
        """What must be the same alone and among the others: the text, or the vectors (rounded)."""
        if status != 200:
            return status, text[:300]
        if path == "/embeddings":
            return [[round(x, 4) for x in d["embedding"]] for d in json.loads(text)["data"]]
        if path == "/images/generations":
            return len(json.loads(text)["data"])
        if text.startswith("data: "):   # a stream: its content deltas joined
            chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
            return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        choice = json.loads(text)["choices"][0]
        return choice.get("text", None) or choice["message"]["content"]

    async def send(s, path, body, started: asyncio.Event | None = None):
        async with s.post(server_url + path, json=body) as r:
            text = ""
            async for line in r.content:
                text += line.decode()
                if started is not None and text.startswith("data: "):
                    started.set()
            return answer(path, r.status, text)

    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
            alone = [await send(s, p, b) for p, b in stay]
            streaming = {i: asyncio.Event() for i, (_, b) in enumerate(leave) if b.get("stream")}
            leavers = [asyncio.create_task(send(s, p, b, streaming.get(i))) for i, (p, b) in enumerate(leave)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streaming.values())), 60)
            stayers = [asyncio.create_task(send(s, p, b)) for p, b in stay]
            for task in rng.sample(leavers, len(leavers)):
                await asyncio.sleep(rng.uniform(0.1, 0.4))
                task.cancel()                       # the client goes away: its connection closes
            together = await asyncio.wait_for(asyncio.gather(*stayers), 150)
            await asyncio.gather(*leavers, return_exceptions=True)
            after = [await send(s, p, b) for p, b in stay[:4]]
        return alone, together, after
    alone, together, after = asyncio.run(go())
    assert together == alone
    assert after == alone[:4]
