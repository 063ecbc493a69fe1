"""Unit tests run without Ray Serve; @serve.batch works on plain asyncio except for one warning
check that asks for the replica context, which we skip here. Where Ray is not installed at all (the
GPU machines), the engine's unit tests still run; the tests that use Serve then fail on import."""
import importlib.util

import pytest


@pytest.fixture(autouse=True)
def _serve_batch_outside_a_replica(monkeypatch):
    if importlib.util.find_spec("ray") is None:
        return
    from ray.serve import batching
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
