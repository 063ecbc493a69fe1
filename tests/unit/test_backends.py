"""The model registry: /v1/models comes from the configs, a model's own details are asked once of a
running replica, and a model that may be at zero replicas is never called just to be listed."""
from __future__ import annotations

import asyncio

from deployments.config import parse_app_config
from deployments.types import ModelCard
from ingress.auth import ANONYMOUS
from ingress.backends import ModelEntry, ModelRegistry


class CountingClient:
    def __init__(self, card: ModelCard, hang: bool = False):
        self._card, self.hang, self.calls = card, hang, 0

    async def card(self) -> ModelCard:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        return self._card


def _registry(scale_to_zero: bool, running: int, hang: bool = False):
    scaling = {"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}} if scale_to_zero else {}
    cfg = parse_app_config({"models": [
        {"id": "chat", "kind": "chat", "source": "x", "deployment": scaling},
        {"id": "emb", "kind": "embedding", "source": "x"},
        {"id": "img", "kind": "image", "source": "x", "engine": {"sizes": ["64x64"]}}]})
    clients = {"chat": CountingClient(ModelCard("chat", "chat", 5, context_length=2048), hang=hang),
               "emb": CountingClient(ModelCard("emb", "embedding", 5, context_length=256, embedding_dimensions=384)),
               "img": CountingClient(ModelCard("img", "image", 5))}
    asked = []

    async def replicas():
        asked.append(1)
        return {"chat": {"running_replicas": running}, "emb": {"running_replicas": 1}, "img": {"running_replicas": 1}}
    registry = ModelRegistry({m.id: ModelEntry(m, clients[m.id]) for m in cfg.models}, replicas=replicas,
                             details_timeout_s=0.05)
    return registry, clients, asked


def test_a_model_at_zero_is_listed_from_its_config_without_being_called():
    registry, clients, asked = _registry(scale_to_zero=True, running=0)
    cards = {c.id: c for c in asyncio.run(registry.cards(ANONYMOUS))}
    assert list(cards) == ["chat", "emb", "img"]
    assert clients["chat"].calls == 0 and asked   # Serve was asked, the model was not
    assert cards["chat"].capabilities[0] == "chat.completions" and cards["chat"].context_length is None
    assert cards["emb"].embedding_dimensions == 384 and clients["emb"].calls == 1
    assert cards["img"].image_sizes == ["64*64"] and clients["img"].calls == 0   # the config says it all


def test_details_are_asked_once_of_a_running_model_and_cached():
    registry, clients, _ = _registry(scale_to_zero=True, running=1)

    async def twice():
        return await registry.cards(ANONYMOUS), await registry.card("chat", ANONYMOUS)
    cards, chat = asyncio.run(twice())
    assert chat.context_length == 2048 and chat.created == registry.created
    assert clients["chat"].calls == 1 and clients["emb"].calls == 1


def test_a_model_slow_to_answer_is_listed_from_its_config_and_asked_again_later():
    registry, clients, _ = _registry(scale_to_zero=False, running=1, hang=True)

    async def twice():
        return await registry.cards(ANONYMOUS), await registry.cards(ANONYMOUS)
    first, _ = asyncio.run(twice())
    assert [c.id for c in first] == ["chat", "emb", "img"] and first[0].context_length is None
    assert clients["chat"].calls == 2


def test_a_model_still_loading_is_listed_from_its_config_without_waiting_for_it():
    registry, clients, asked = _registry(scale_to_zero=False, running=0, hang=True)
    cards = asyncio.run(registry.cards(ANONYMOUS))
    assert cards[0].id == "chat" and clients["chat"].calls == 0 and asked
