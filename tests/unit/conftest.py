"""Unit tests run without Ray Serve; @serve.batch works on plain asyncio except for one warning
check that asks for the replica context, which we skip here."""
import pytest


@pytest.fixture(autouse=True)
def _serve_batch_outside_a_replica(monkeypatch):
    from ray.serve import batching
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
