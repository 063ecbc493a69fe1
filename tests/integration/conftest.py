"""Starts the real application (default models from serve_config.yaml) on Ray Serve once per session."""
from __future__ import annotations

import pathlib
import socket

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMB = "sentence-transformers/all-MiniLM-L6-v2"
IMG = "tiny-random-sd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server_url():
    import ray
    from ray import serve

    from ingress.app import build_app
    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="modelhub", route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(server_url):
    import openai
    return openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def aclient(server_url):
    """A factory: an AsyncOpenAI client must be made inside the event loop that uses it."""
    import openai
    return lambda: openai.AsyncOpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=120)
