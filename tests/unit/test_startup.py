"""The ready line: once every model answers, one line lists each model, its kind and its URL."""
from __future__ import annotations

import asyncio
import logging

from deployments.config import parse_app_config
from ingress.backends import ModelEntry, ModelRegistry
from ingress.startup import announce_when_ready, ready_line
from tests.unit.fakes import FakeChatClient, FakeEmbedClient, FakeRerankClient


def registry(embed_client=None):
    cfg = parse_app_config({"models": [{"id": "fake-chat", "kind": "chat", "source": "x"},
                                       {"id": "fake-embed", "kind": "embedding", "source": "x"},
                                       {"id": "fake-rerank", "kind": "rerank", "source": "x"}]})
    clients = [FakeChatClient(), embed_client or FakeEmbedClient(), FakeRerankClient()]
    return ModelRegistry({m.id: ModelEntry(m, c) for m, c in zip(cfg.models, clients)})


def test_ready_line_lists_each_model_kind_and_url(caplog):
    with caplog.at_level(logging.INFO, logger="ray.serve.modelhub.ingress"):
        asyncio.run(announce_when_ready(registry(), "https://hub.example"))
    line = caplog.records[-1].getMessage()
    assert "\n" not in line
    assert line == ("ModelHub Serve is ready with 3 models: fake-chat (chat) https://hub.example/v1/chat/completions; "
                    "fake-embed (embedding) https://hub.example/v1/embeddings; "
                    "fake-rerank (rerank) https://hub.example/v1/rerank")


def test_a_model_that_never_answers_is_reported_not_ready(caplog):
    class Broken(FakeEmbedClient):
        async def card(self):
            raise RuntimeError("replica died")
    with caplog.at_level(logging.INFO, logger="ray.serve.modelhub.ingress"):
        asyncio.run(announce_when_ready(registry(Broken()), "http://h"))
    assert caplog.records[-1].levelno == logging.ERROR and "not ready" in caplog.records[-1].getMessage()


def test_ready_line_for_one_model():
    from deployments.types import ModelCard
    assert ready_line([ModelCard("m", "image", 1)], "http://h:1") == (
        "ModelHub Serve is ready with 1 model: m (image) http://h:1/v1/images/generations")
