"""Starts the real application (default models from serve_config.yaml) on Ray Serve once per pytest
process: one Ray session, never restarted (a second ray.init in one process can time out on a busy
machine). It serves the app both ways at once: through Ray's direct ingress (the ingress replica's own
HTTP port, as `make serve` runs it) and through Serve's proxy (as `serve run serve_config.yaml` does).
MODELHUB_TEST_FRONT=haproxy puts Ray's HAProxy ingress where Serve's proxy was."""
from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass

import pytest
import yaml

from tests.integration.cluster import ROOT, free_port, haproxy_env, wait_for

CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMB = "sentence-transformers/all-MiniLM-L6-v2"
IMG = "tiny-random-sd"


METRICS_PORT = [0]   # Ray's Prometheus endpoint of the running session


@dataclass
class Hub:
    direct_url: str   # the ingress replica's own port (direct ingress)
    proxy_url: str    # Serve's proxy, route prefix /

    def url(self, mode: str) -> str:
        return self.direct_url if mode == "direct-ingress" else self.proxy_url


def default_app_args() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]


def deploy(app, name: str, route_prefix: str | None, timeout_s: float = 300):
    """serve.run with a deadline: serve.run waits forever for an app whose replicas cannot be scheduled.
    Raises RuntimeError with the app's status message if it fails or is not running by the deadline."""
    import time

    from ray import serve
    from ray.serve.schema import ApplicationStatus
    serve._run(app, _blocking=False, name=name, route_prefix=route_prefix)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        failed = status is not None and status.status == ApplicationStatus.DEPLOY_FAILED
        if failed or time.monotonic() > deadline:
            detail = "; ".join([status.message] + [f"{d}: {s.message}" for d, s in status.deployments.items()
                                                    if s.message]) if status else "not created"
            raise RuntimeError(f"app {name!r} {'failed to deploy' if failed else f'not running after {timeout_s:g} s'}"
                               f": {detail}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def hub():
    import ray
    from ray import serve

    from ingress.app import build_app
    port, proxy_port = free_port(), free_port()
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
           # room for the extra apps some tests deploy beside the default one
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 8),
           # Ray starts workers at nice 15, below the driver: on a busy CI machine any other process
           # then starves the replicas under test. The suite's replicas compete at the driver's priority.
           "RAY_worker_niceness": "0"}
    if os.environ.get("MODELHUB_TEST_FRONT") == "haproxy":
        env.update(haproxy_env())   # every "proxy" test through Ray's HAProxy ingress (docs/operations.md)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)   # read by the Ray processes that ray.init starts
    METRICS_PORT[0] = free_port()
    # The default app reserves exactly 2 CPUs (serve_config.yaml); the third is for the apps some tests
    # deploy beside it (tensor parallel, a broken model, the overload and tenancy apps).
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT[0])
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
    deploy(build_app(default_app_args()), "modelhub", "/", timeout_s=900)
    # As an operator would: the ingress's own /ready (its view of Serve, cached for 2 s) before the first
    # request, so /v1/models already has what only a running model knows (a context length)
    wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=30).status == 200, 120,
             "the hub's /ready")
    yield Hub(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{proxy_port}/v1")
    serve.shutdown()
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session", params=["direct-ingress", "proxy"])
def server_url(request, hub):
    """Every test that takes it runs against both ways in, on the same Ray session."""
    return hub.url(request.param)


@pytest.fixture(scope="session")
def client(server_url):
    import openai
    return openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def aclient(server_url):
    """A factory: an AsyncOpenAI client must be made inside the event loop that uses it."""
    import openai
    return lambda: openai.AsyncOpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=120)
