"""The CrossEncoder scorer and the rerank deployment class on the built-in tiny random cross-encoder."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.config import RerankEngineConfig, RerankModelConfig
from deployments.errors import InvalidRequestError
from deployments.rerank.scorer import CrossEncoderScorer, budget_chunks
from deployments.rerank.server import RerankServer
from deployments.types import ScoreRequest

SOURCE = "builtin:tiny-random-cross-encoder"
PAIRS = [("what is the capital of France?", "Paris is the capital of France."),
         ("what is the capital of France?", "Cats sleep most of the day."),
         ("rivers", "A river is a natural flowing watercourse " * 8),
         ("x", "y")]


@pytest.fixture(scope="module")
def scorer():
    return CrossEncoderScorer.load(SOURCE, RerankEngineConfig())


def server(scorer, **engine) -> RerankServer:
    cfg = RerankModelConfig(id="r", kind="rerank", source=SOURCE, engine=engine)
    return RerankServer(cfg, scorer_factory=lambda source, e: CrossEncoderScorer(scorer.model, e))


def test_scores_are_the_cross_encoders_under_any_token_budget(scorer):
    tiny_budget = CrossEncoderScorer(scorer.model, RerankEngineConfig(max_batch_tokens=16))
    ref = scorer.model.predict(PAIRS)
    for s in (scorer, tiny_budget):
        assert np.abs(s.score(PAIRS, s.count_tokens(PAIRS)) - ref).max() < 1e-5


def test_budget_chunks_sort_by_length_and_respect_the_budget():
    chunks = list(budget_chunks([5, 1, 9, 3], 10))
    assert chunks == [[1, 3], [0], [2]]


def test_concurrent_requests_are_batched_and_each_gets_its_own_scores(scorer):
    calls = []
    srv = server(scorer, batch_wait_timeout_s=0.05)
    real = srv.scorer.score
    srv.scorer.score = lambda pairs, lengths: (calls.append(len(pairs)), real(pairs, lengths))[1]

    async def go():
        return await asyncio.gather(*(srv.score(ScoreRequest([p])) for p in PAIRS))
    results = asyncio.run(go())
    ref = scorer.model.predict(PAIRS)
    assert [r.scores[0] for r in results] == pytest.approx(list(ref), abs=1e-5)
    assert sum(calls) == len(PAIRS) and len(calls) < len(PAIRS)          # gathered into fewer calls
    assert results[0].prompt_tokens == scorer.count_tokens(PAIRS[:1])[0]


def test_too_long_or_too_many_pairs_are_400(scorer):
    long_pair = [("q", "word " * 600)]
    with pytest.raises(InvalidRequestError) as info:
        scorer.count_tokens(long_pair)
    assert info.value.code == "context_length_exceeded" and info.value.param == "documents"
    truncating = CrossEncoderScorer(scorer.model, RerankEngineConfig(truncate=True))
    assert truncating.count_tokens(long_pair) == [truncating.max_length]
    with pytest.raises(InvalidRequestError, match="At most 2 documents"):
        asyncio.run(server(scorer, max_documents=2).score(ScoreRequest(PAIRS)))


def test_card_says_rerank(scorer):
    card = server(scorer).card()
    assert card.kind == "rerank" and card.capabilities == ["rerank", "score"] and card.context_length == 512


def test_unknown_builtin_names_what_exists():
    with pytest.raises(ValueError, match="tiny-random-cross-encoder"):
        CrossEncoderScorer.load("builtin:nope", RerankEngineConfig())
