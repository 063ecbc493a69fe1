"""One client cannot hurt another, on the real application: shared x-request-id values, bodies over
the size limit, never-servable requests, and /ready's per-model detail."""
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


def test_a_50_mb_body_is_refused_with_413_before_it_is_read(server_url):
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
    print(f"\n50 MB body refused in {took * 1000:.0f} ms")


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
