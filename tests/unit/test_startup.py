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


def readiness(*states):
    """Serve's answers, one per poll: model id -> detail."""
    answers = list(states)

    async def ask():
        return answers.pop(0) if len(answers) > 1 else answers[0]
    return ask


UP = {"healthy": True, "status": "HEALTHY"}
LOADING = {"healthy": False, "status": "UPDATING"}


def test_ready_line_lists_each_model_kind_and_url_once_every_model_is_up(caplog):
    ready = readiness({"fake-chat": LOADING, "fake-embed": UP}, {"fake-chat": UP, "fake-embed": UP})
    with caplog.at_level(logging.INFO, logger="ray.serve.modelhub.ingress"):
        asyncio.run(announce_when_ready(registry(), ready, "https://hub.example", poll_s=0.01))
    line = caplog.records[-1].getMessage()
    assert "\n" not in line
    assert line == ("ModelHub Serve is ready with 3 models: fake-chat (chat) https://hub.example/v1/chat/completions; "
                    "fake-embed (embedding) https://hub.example/v1/embeddings; "
                    "fake-rerank (rerank) https://hub.example/v1/rerank")


def test_a_model_that_failed_to_start_is_reported_not_ready(caplog):
    ready = readiness({"fake-chat": UP, "fake-embed": {"healthy": False, "status": "DEPLOY_FAILED",
                                                       "message": "fake-embed failed to load: no such file"}})
    with caplog.at_level(logging.INFO, logger="ray.serve.modelhub.ingress"):
        asyncio.run(announce_when_ready(registry(), ready, "http://h", poll_s=0.01))
    last = caplog.records[-1]
    assert last.levelno == logging.ERROR and "not ready: fake-embed failed" in last.getMessage()
    assert "no such file" in last.getMessage()


def test_ready_line_for_one_model():
    from deployments.types import ModelCard
    assert ready_line([ModelCard("m", "image", 1)], "http://h:1") == (
        "ModelHub Serve is ready with 1 model: m (image) http://h:1/v1/images/generations")
