"""The utility endpoints through Ray Serve with the real models: /tokenize and /detokenize on
SmolLM2, /v1/rerank and /v1/score on the cross-encoder and on MiniLM (cosine), GET /version."""
from __future__ import annotations

import httpx2
import pytest

from tests.integration.conftest import CHAT, EMB

RERANK = "tiny-random-cross-encoder"
DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "France's capital city is Paris."]


@pytest.fixture(scope="module")
def http(server_url):
    with httpx2.Client(base_url=server_url.removesuffix("/v1"), timeout=120) as h:
        yield h


def test_tokenize_counts_the_prompt_tokens_that_chat_bills(http, client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tokens = http.post("/tokenize", json={"model": CHAT, "messages": messages}).json()
    billed = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=1).usage.prompt_tokens
    assert tokens["count"] == billed == len(tokens["tokens"]) and tokens["max_model_len"] == 8192
    plain = http.post("/tokenize", json={"model": CHAT, "prompt": "Hello world", "return_token_strs": True}).json()
    assert plain["count"] == 2 and "".join(plain["token_strs"]).replace("Ġ", " ") == "Hello world"
    back = http.post("/detokenize", json={"model": CHAT, "tokens": plain["tokens"]}).json()
    assert back == {"prompt": "Hello world"}


def test_rerank_with_the_cross_encoder_and_with_minilm(http):
    for model in (RERANK, EMB):
        r = http.post("/v1/rerank", json={"model": model, "query": "What is the capital of France?",
                                          "documents": DOCS, "top_n": 2})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
        assert results[0]["document"]["text"] == DOCS[results[0]["index"]]
    # MiniLM is a real model: both Paris documents outrank the bananas
    ranked = http.post("/v1/rerank", json={"model": EMB, "query": "capital of France", "documents": DOCS}).json()
    assert ranked["results"][-1]["index"] == 1


def test_score_in_vllms_shape_and_omitted_model_goes_to_the_cross_encoder(http):
    r = http.post("/v1/score", json={"text_1": "capital of France", "text_2": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == RERANK and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(0.0 <= d["score"] <= 1.0 for d in body["data"])            # the sigmoid of one logit
    assert body["usage"]["prompt_tokens"] > 0
    again = http.post("/score", json={"model": RERANK, "text_1": ["capital of France"] * 3, "text_2": DOCS}).json()
    assert [d["score"] for d in again["data"]] == pytest.approx([d["score"] for d in body["data"]], abs=1e-6)


def test_version_and_models_list_the_rerank_kind(http, client):
    assert http.get("/version").json()["version"]
    card = {m.id: m.model_extra for m in client.models.list().data}[RERANK]
    assert card["kind"] == "rerank" and card["capabilities"] == ["rerank", "score"]


def test_seed_conformance_embeddings_without_model_and_top_p_minus_one(http, client):
    body = http.post("/v1/embeddings", json={"input": "hello"}).json()    # the openai SDK always sends `model`
    assert body["model"] == EMB and len(body["data"][0]["embedding"]) == 384
    out = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], top_p=-1,
                                         temperature=0, max_tokens=4)
    assert out.choices[0].message.content
