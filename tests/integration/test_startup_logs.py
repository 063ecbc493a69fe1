"""What a person watching `make serve` reads: each model's load (source, weights, time taken) and one
ready line listing every model, its kind and URL, in the replicas' Serve logs."""
from __future__ import annotations

import glob
import os
import time

import pytest

from tests.integration.conftest import CHAT, EMB, IMG, deploy

# One Ray session serves both ways in; with direct ingress on, the ready line names the ingress
# replica's own port (ingress/startup.py's serve_base_url), so these run once, against that port.
pytestmark = pytest.mark.parametrize("server_url", ["direct-ingress"], indirect=True)

RERANK = "tiny-random-cross-encoder"


def serve_logs() -> str:
    import ray
    logs = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    return "".join(open(f, errors="replace").read() for f in glob.glob(os.path.join(logs, "replica_*.log")))


def test_load_progress_and_the_ready_line_are_logged(server_url, client):
    client.models.list()                        # every model has answered once
    deadline = time.monotonic() + 120           # the ready line is written by a task that may run late
    while "ModelHub Serve is ready" not in (text := serve_logs()) and time.monotonic() < deadline:
        time.sleep(0.5)
    ready = next(line for line in text.splitlines() if "ModelHub Serve is ready with 4 models" in line)
    origin = server_url.removesuffix("/v1")
    for model, kind, path in ((CHAT, "chat", "/v1/chat/completions"), (EMB, "embedding", "/v1/embeddings"),
                              (IMG, "image", "/v1/images/generations"), (RERANK, "rerank", "/v1/rerank")):
        assert f"{model} ({kind}) {origin}{path}" in ready
        assert f"model {model} ({kind}): loading from " in text
        assert f"model {model} ({kind}): loaded in " in text
    assert "1 GGUF file, " in text and "built in code, random weights" in text


def test_a_model_that_fails_to_load_is_named_with_its_cause_in_one_line(server_url):
    from ray import serve

    from deployments.builder import model_deployment
    from deployments.config import EmbeddingModelConfig
    cfg = EmbeddingModelConfig(id="broken-model", kind="embedding", source="/no/such/dir",
                               deployment={"ray_actor_options": {"num_cpus": 0}})   # it never gets to run
    try:
        with pytest.raises(RuntimeError, match="broken-model"):
            deploy(model_deployment(cfg), "broken", None)
    finally:
        serve.delete("broken")
    line = ("model 'broken-model' (embedding) failed to load from '/no/such/dir': SourceError: local model path "
            "not found: /no/such/dir")
    replica_errors = [x for x in serve_log_lines("replica_broken_*.log") if x.startswith("ERROR")]
    assert replica_errors and all(x.endswith(line) for x in replica_errors)       # the traceback follows it
    assert any(x.endswith("ModelLoadError: " + line) for x in serve_log_lines("controller_*.log"))


def serve_log_lines(pattern: str) -> list[str]:
    import ray
    logs = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    return [line.rstrip("\n") for f in glob.glob(os.path.join(logs, pattern)) for line in open(f, errors="replace")
            if line.strip()]
