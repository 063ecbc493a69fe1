"""/v1/rerank and /v1/score in-process: a cross-encoder scores pairs itself, a bi-encoder by the cosine
similarity of its vectors; shapes as vLLM serves them; the model may be omitted."""
from __future__ import annotations

import numpy as np
import pytest

from deployments.config import parse_app_config
from deployments.types import EmbedResult
from ingress.api import create_api
from ingress.backends import ModelEntry, ModelRegistry
from tests.unit.fakes import FakeChatClient, FakeRerankClient
from tests.unit.test_api import raw_client, run

CHAT, EMB, RERANK = "fake-chat", "fake-embed", "fake-rerank"
DOCS = ["the cat sat", "dogs bark loudly", "a cat and a dog"]


class AxisEmbedClient:
    """Each text a fixed unit vector, so cosine similarities are known."""

    VECTORS = {"cat": [1.0, 0.0], "the cat sat": [2.0, 0.0], "dogs bark loudly": [0.0, 3.0], "a cat and a dog": [1.0, 1.0]}

    def __init__(self):
        self.calls = []

    async def embed(self, req) -> EmbedResult:
        self.calls.append(list(req.inputs))
        return EmbedResult(np.array([self.VECTORS[t] for t in req.inputs], dtype=np.float32), 7)


def make_app(with_rerank=True):
    models = [{"id": CHAT, "kind": "chat", "source": "x"}, {"id": EMB, "kind": "embedding", "source": "x"}]
    clients = {CHAT: FakeChatClient(), EMB: AxisEmbedClient(), RERANK: FakeRerankClient()}
    if with_rerank:
        models.append({"id": RERANK, "kind": "rerank", "source": "builtin:tiny-random-cross-encoder"})
    cfg = parse_app_config({"models": models})
    return create_api(ModelRegistry({m.id: ModelEntry(m, clients[m.id]) for m in cfg.models})), clients


def post(app, path, body):
    async def go():
        async with raw_client(app) as h:
            return await h.post(path, json=body)
    return run(go())


def test_rerank_sorts_by_relevance_and_keeps_indices():
    app, _ = make_app()
    r = post(app, "/v1/rerank", {"model": RERANK, "query": "a cat", "documents": DOCS, "top_n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == RERANK and body["id"].startswith("rerank-")
    assert [x["index"] for x in body["results"]] == [2, 0]              # 2 shared words, then 1
    assert body["results"][0] == {"index": 2, "relevance_score": 2.0, "document": {"text": DOCS[2]}}
    assert body["usage"]["total_tokens"] > 0


def test_rerank_paths_document_objects_and_return_documents_false():
    app, _ = make_app()
    for path in ("/rerank", "/v2/rerank"):
        r = post(app, path, {"query": "a cat", "documents": [{"text": d} for d in DOCS], "return_documents": False})
        assert r.status_code == 200 and r.json()["model"] == RERANK      # model omitted: the rerank model
        assert len(r.json()["results"]) == 3 and "document" not in r.json()["results"][0]


def test_bi_encoder_scores_by_cosine_similarity_embedding_each_text_once():
    app, clients = make_app(with_rerank=False)
    r = post(app, "/v1/score", {"text_1": "cat", "text_2": DOCS})       # model omitted: the embedding model
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == EMB and body["object"] == "list"
    assert [d["score"] for d in body["data"]] == pytest.approx([1.0, 0.0, 2 ** -0.5])
    assert body["data"][0]["object"] == "score" and body["usage"]["prompt_tokens"] == 7
    assert clients[EMB].calls == [["cat"] + DOCS]
    ranked = post(app, "/v1/rerank", {"model": EMB, "query": "cat", "documents": DOCS}).json()["results"]
    assert [x["index"] for x in ranked] == [0, 2, 1]


def test_score_pairs_lists_pairwise_and_broadcasts_one_text_1():
    app, _ = make_app()
    pairwise = post(app, "/score", {"model": RERANK, "text_1": ["a cat", "dogs"], "text_2": ["a cat", "cats"]})
    assert [d["score"] for d in pairwise.json()["data"]] == [2.0, 0.0]
    one = post(app, "/v1/score", {"model": RERANK, "text_1": ["cat"], "text_2": DOCS})
    assert [d["score"] for d in one.json()["data"]] == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/score", {"model": RERANK, "text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, 400, "text_2"),
    ("/v1/score", {"model": RERANK, "text_1": [], "text_2": ["a"]}, 400, "text_1"),
    ("/v1/rerank", {"model": RERANK, "query": "q", "documents": []}, 400, "documents"),
    ("/v1/rerank", {"model": RERANK, "query": "q", "documents": ["a"], "top_n": -1}, 400, "top_n"),
    ("/v1/rerank", {"model": RERANK, "query": "q", "documents": ["a"], "truncate_prompt_tokens": 5}, 400,
     "truncate_prompt_tokens"),
    ("/v1/rerank", {"model": CHAT, "query": "q", "documents": ["a"]}, 400, "model"),
    ("/v1/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404, None),
])
def test_bad_rerank_and_score_requests(path, body, status, param):
    app, _ = make_app()
    r = post(app, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_a_rerank_model_answers_only_rerank_and_score():
    app, _ = make_app()
    r = post(app, "/v1/embeddings", {"model": RERANK, "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
    assert "rerank and score" in r.json()["error"]["message"]
