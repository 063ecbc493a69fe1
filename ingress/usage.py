"""Usage accounting per subject and model, exported as Prometheus counters through Ray's metrics
(`ray_modelhub_usage_*` on each node's metrics port). Counts only: never prompts or outputs.
Must not import torch.
"""
from __future__ import annotations

from typing import Any

USAGE_METRICS = {
    "requests": "Requests served (a model answered).",
    "prompt_tokens": "Prompt tokens of chat and completions requests.",
    "completion_tokens": "Completion tokens generated.",
    "embedding_tokens": "Input tokens of embeddings requests.",
    "images": "Images generated.",
}


class UsageMeter:
    """`record()` adds one request's usage; `counters` maps a usage name to an object with
    `inc(value, tags=...)` (Ray's Counter in the ingress, a plain recorder in tests)."""

    def __init__(self, counters: dict[str, Any] | None = None):
        self.counters = counters if counters is not None else ray_counters()

    def record(self, subject: str, model: str, **usage: int) -> None:
        tags = {"subject": subject, "model": model}
        self.counters["requests"].inc(1, tags=tags)
        for name, value in usage.items():
            if value:
                self.counters[name].inc(value, tags=tags)


def ray_counters() -> dict[str, Any]:
    from ray.util.metrics import Counter
    return {name: Counter(f"modelhub_usage_{name}", description=text, tag_keys=("subject", "model"))
            for name, text in USAGE_METRICS.items()}
