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


METRICS_PORT = [0]   # Ray's Prometheus endpoint of the running session


@pytest.fixture(scope="session", params=["direct-ingress", "proxy"])
def server_url(request):
    """The app as `make serve` runs it (direct ingress: the ingress replica serves HTTP itself) and
    as `serve run serve_config.yaml` does (through Serve's proxy); every test runs against both."""
    import os

    import ray
    from ray import serve

    from ingress.app import build_app
    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    port, proxy_port = _free_port(), _free_port()
    direct = request.param == "direct-ingress"
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1)} if direct else {}
    saved = {k: os.environ.pop(k, None) for k in ("RAY_SERVE_ENABLE_DIRECT_INGRESS",
                                                  "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT",
                                                  "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT")}
    os.environ.update(env)   # read by the Ray processes that ray.init starts
    METRICS_PORT[0] = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT[0])
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port if direct else port})
    serve.run(build_app(args), name="modelhub", route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()
    ray.shutdown()
    for k in env:
        os.environ.pop(k, None)
    os.environ.update({k: v for k, v in saved.items() if v is not None})


@pytest.fixture(scope="session")
def client(server_url):
    import openai
    return openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def aclient(server_url):
    """A factory: an AsyncOpenAI client must be made inside the event loop that uses it."""
    import openai
    return lambda: openai.AsyncOpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=120)
