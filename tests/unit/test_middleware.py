"""The request middleware in-process: server-made ids, the body-size limit (413), the access log."""
from __future__ import annotations

import asyncio
import json
import logging

from deployments.config import RequestLimits
from tests.unit.test_api import CHAT, EMB, make_app, raw_client, run

PARIS = {"model": CHAT, "messages": [{"role": "user", "content": "Paris"}]}


def small_app(**limits):
    return make_app(limits=RequestLimits(**limits))


def test_a_body_over_the_limit_is_413_from_content_length_before_it_is_read():
    received = []

    async def go():
        app = small_app(max_body_bytes=4096)

        async def receive():      # a 50 MB body that must never be pulled in
            received.append(1)
            return {"type": "http.request", "body": b"x" * 65536, "more_body": True}
        sent = []

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "headers": [(b"content-length", str(50 << 20).encode()),
                                                  (b"content-type", b"application/json")],
                 "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": "",
                 "app": app}
        await app(scope, receive, send)
        return sent
    sent = run(go())
    assert sent[0]["status"] == 413 and received == []
    err = json.loads(sent[1]["body"])["error"]
    assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error" and "4096" in err["message"]


def test_a_chunked_body_over_the_limit_is_413_while_it_streams_in():
    pulled = []

    async def go():
        async def body():
            for _ in range(1000):          # 64 MB if it were all read
                pulled.append(1)
                yield b" " * 65536
        async with raw_client(small_app(max_body_bytes=100_000)) as h:
            return await h.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
    r = run(go())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert len(pulled) < 10


def test_server_makes_the_id_and_echoes_the_clients_or_its_own():
    async def go():
        async with raw_client(make_app()) as h:
            mine = await h.post("/v1/chat/completions", json=PARIS, headers={"x-request-id": "client-7"})
            none = await h.post("/v1/chat/completions", json=PARIS)
            junk = await h.post("/v1/chat/completions", json=PARIS, headers={"x-request-id": "a\tb" * 200})
        return mine, none, junk
    mine, none, junk = run(go())
    assert mine.headers["x-request-id"] == "client-7"
    assert none.headers["x-request-id"].startswith("req_")
    assert junk.headers["x-request-id"].startswith("req_")


def test_requests_sharing_an_x_request_id_reach_the_model_with_distinct_ids():
    from tests.unit.fakes import FakeChatClient
    chat = FakeChatClient()

    async def go():
        async with raw_client(make_app(chat)) as h:
            return await asyncio.gather(*(h.post("/v1/chat/completions", json={**PARIS, "messages": [
                {"role": "user", "content": f"m{i}"}]}, headers={"x-request-id": "dup"}) for i in range(8)))
    rs = run(go())
    assert [r.json()["choices"][0]["message"]["content"] for r in rs] == [f"m{i}"[::-1] for i in range(8)]
    assert len({r.request_id for r in chat.requests}) == 8


def test_access_log_has_one_line_per_request_without_prompts(caplog):
    async def go():
        async with raw_client(make_app()) as h:
            await h.post("/v1/chat/completions", json={**PARIS, "messages": [
                {"role": "user", "content": "SECRET prompt"}]}, headers={"x-request-id": "c-1"})
            await h.post("/v1/chat/completions", json={**PARIS, "model": "evil\n" + "m" * 500})
            await h.post("/v1/embeddings", json={"model": EMB, "input": "SECRET"})
    with caplog.at_level(logging.INFO, logger="ray.serve.modelhub.access"):
        run(go())
    records = [r for r in caplog.records if r.name == "ray.serve.modelhub.access"]
    lines = [json.loads(r.getMessage()) for r in records]
    assert len(lines) == 3
    # Serve's stderr handler skips them (its log_to_stderr filter): they go to the replica's log file only
    assert all(r.log_to_stderr is False for r in records)
    chat_ok, missing, emb = lines
    assert chat_ok["status"] == 200 and chat_ok["route"] == "/v1/chat/completions" and chat_ok["model"] == CHAT
    assert chat_ok["client_request_id"] == "c-1" and chat_ok["id"].startswith("req_")
    assert chat_ok["prompt_tokens"] == 3 and chat_ok["completion_tokens"] == len("SECRET prompt")
    assert missing["status"] == 404 and len(missing["model"]) <= 131 and "\n" not in json.dumps(missing)[1:-1]
    assert emb["status"] == 200 and emb["prompt_tokens"] == len("SECRET")
    assert not any("SECRET" in r.getMessage() for r in caplog.records)


def test_image_file_urls_are_logged_by_route_not_by_token(caplog):
    async def go():
        async with raw_client(make_app()) as h:
            return await h.get("/v1/images/files/s3cr3t-token.png")
    with caplog.at_level(logging.INFO, logger="ray.serve.modelhub.access"):
        assert run(go()).status_code == 404
    assert not any("s3cr3t" in r.getMessage() for r in caplog.records)


def test_unknown_route_and_method_get_openai_error_json():
    async def go():
        async with raw_client(make_app()) as h:
            return await h.get("/v1/nope"), await h.get("/v1/chat/completions")
    for r in run(go()):
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}

