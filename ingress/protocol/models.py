"""GET /v1/models: the standard Model object plus what a client needs to pick a model."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from deployments.types import ModelCard


def model_json(card: ModelCard) -> dict[str, Any]:
    extra = {k: v for k, v in asdict(card).items() if v is not None and k not in ("id", "created", "owned_by")}
    return {"id": card.id, "object": "model", "created": card.created, "owned_by": card.owned_by, **extra}


def model_list_json(cards: list[ModelCard]) -> dict[str, Any]:
    return {"object": "list", "data": [model_json(c) for c in cards]}
