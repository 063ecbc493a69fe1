"""The application builders and the ingress's routing, with fake DeploymentHandles (no Ray): a model
that names an `application` is not deployed by the hub, and the ingress reaches it by a handle to that
application's deployment, for requests, /v1/models, /ready and the cold-start bound alike."""
from __future__ import annotations

import asyncio
import hashlib
import pathlib
import re
from types import SimpleNamespace

import httpx2
import pytest
import yaml

from deployments.builder import deployment_name
from ingress import app as ingress_app
from ingress.readiness import ServeReadiness
from tests.unit.fakes import FakeChatClient, FakeEmbedClient

HUB = {"models": [{"id": "local-chat", "kind": "chat", "source": "x"},
                  {"id": "routed-chat", "kind": "chat", "application": "chat-app", "cold_start_timeout_s": 0.2},
                  {"id": "routed-emb", "kind": "embedding", "application": "emb-app"}],
       "ingress": {"coalesce_embeddings": False}}


class FakeResponse:
    """What `handle.method.remote(...)` returns: awaitable, or async-iterable with stream=True; cancellable."""

    def __init__(self, call, stream: bool):
        self._call, self.stream = call, stream

    def __await__(self):
        return self._call().__await__()

    def __aiter__(self):
        return self._call().__aiter__()

    def cancel(self):
        pass


class FakeHandle:
    """A DeploymentHandle stand-in that calls a fake model client and records which methods it was asked.
    While `available()` is false (no replica), a call waits, as in a real handle's queue."""

    def __init__(self, client, calls: list, available=lambda: True, stream: bool = False):
        self.client, self.calls, self.available, self.stream = client, calls, available, stream

    def options(self, stream: bool = False) -> "FakeHandle":
        return FakeHandle(self.client, self.calls, self.available, stream)

    def __getattr__(self, method: str):
        async def call(*args):
            await self._replica()
            return await getattr(self.client, method)(*args)

        async def stream(*args):
            await self._replica()
            async for chunk in getattr(self.client, method)(*args):
                yield chunk

        def remote(*args):
            self.calls.append(method)
            return FakeResponse(lambda: (stream if self.stream else call)(*args), self.stream)
        return SimpleNamespace(remote=remote)

    async def _replica(self) -> None:
        while not self.available():
            await asyncio.sleep(0.01)


def overview(deployments: dict[str, tuple[str, int]]):
    """A fake ApplicationStatusOverview: deployment name -> (status, running replicas)."""
    return SimpleNamespace(deployments={
        name: SimpleNamespace(status=SimpleNamespace(value=status), replica_states={"RUNNING": running}, message="")
        for name, (status, running) in deployments.items()})


@pytest.fixture
def hub(monkeypatch):
    return make_hub(monkeypatch, HUB)


def make_hub(monkeypatch, args: dict) -> SimpleNamespace:
    """The ingress of `args`: the local model's handle bound by build_app's caller, the routed ones looked
    up by (application, deployment); Serve reports the applications as given in `apps`."""
    calls = {key: [] for key in ("local-chat", "routed-chat", "routed-emb")}
    clients = {"local-chat": FakeChatClient(), "routed-chat": FakeChatClient(), "routed-emb": FakeEmbedClient()}
    looked_up = []

    def routed_handle(model):
        looked_up.append((model.application, deployment_name(model.id, model.kind)))
        return FakeHandle(clients[model.id], calls[model.id], available=lambda: model.application in apps)
    apps = {"hub": overview({deployment_name("local-chat", "chat"): ("HEALTHY", 1)}),
            "chat-app": overview({deployment_name("routed-chat", "chat"): ("HEALTHY", 1)}),
            "emb-app": overview({deployment_name("routed-emb", "embedding"): ("HEALTHY", 1)})}
    monkeypatch.setattr(ingress_app, "routed_handle", routed_handle)
    monkeypatch.setattr(ServeReadiness, "_ask_serve", lambda self: self.describe_all(apps, "hub"))
    config = ingress_app.build_app(args)._bound_deployment.init_args[0]   # as the ingress replica gets it
    server = ingress_app.IngressServer(config, {"local-chat": FakeHandle(clients["local-chat"], calls["local-chat"])},
                                       None)
    return SimpleNamespace(api=server.__serve_build_asgi_app__(), calls=calls, looked_up=looked_up, apps=apps)


def http(api) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api), base_url="http://test")


def chat(model: str, stream: bool = False) -> dict:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "abc"}]}


def test_build_app_deploys_only_the_models_that_name_no_application():
    hub = ingress_app.build_app(HUB)._bound_deployment
    config, handles = hub.init_args[0], hub.init_args[1]
    assert list(handles) == ["local-chat"]
    assert [m["application"] for m in config["models"]] == [None, "chat-app", "emb-app"]


def test_behind_ray_haproxy_per_address_limits_without_trusted_proxies_fail_the_deploy(monkeypatch):
    """`serve deploy` builds the app where RAY_SERVE_ENABLE_HA_PROXY is set: it fails there, naming the
    setting, before any replica starts (the replica checks again, client_limit.ClientThrottle)."""
    limited = {**HUB, "ingress": {"client_limits": {"max_concurrent": 4}}}
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    with pytest.raises(ValueError, match="trusted_proxies"):
        ingress_app.build_app(limited)
    ingress_app.build_app({**HUB, "ingress": {"client_limits": {"max_concurrent": 4, "trusted_proxies": ["10.0.0.0/8"]}}})
    ingress_app.build_app(HUB)   # no per-address limit: nothing to refuse
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY")
    ingress_app.build_app(limited)


def test_the_ingress_runs_on_one_event_loop_unless_told_otherwise_and_the_operators_env_wins():
    def env(ingress: dict) -> dict:
        hub = ingress_app.build_app({**HUB, "ingress": ingress})._bound_deployment
        return hub.ray_actor_options.get("runtime_env", {}).get("env_vars", {})
    assert env({}) == ingress_app.SINGLE_LOOP_ENV
    assert env({"single_event_loop": False}) == {}
    mine = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "OTHER": "x"}
    assert env({"deployment": {"ray_actor_options": {"runtime_env": {"env_vars": mine}}}}) == {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", **mine}


def test_build_model_app_binds_the_one_model_under_the_name_the_hub_looks_up():
    model = {"id": "routed-chat", "kind": "chat", "source": "x", "engine": {"max_num_seqs": 4},
             "deployment": {"graceful_shutdown_timeout_s": 120}}
    bound = ingress_app.build_model_app({"model": model})._bound_deployment
    assert bound.name == deployment_name("routed-chat", "chat")
    assert bound.init_args[0].engine.max_num_seqs == 4
    assert bound._deployment_config.graceful_shutdown_timeout_s == 120
    with pytest.raises(ValueError, match="`application` belong in the hub's entry"):
        ingress_app.build_model_app({"model": {**model, "application": "chat-app"}})


def test_the_operations_guides_example_passes_serve_schema_and_both_builders():
    from ray.serve.schema import ServeDeploySchema
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = doc[doc.index("## Updating without downtime"):doc.index("## Calling models from another Ray job")]
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S)[1])
    ServeDeploySchema.model_validate(config)
    hub, solo = config["applications"]
    routed = ingress_app.build_app(hub["args"])._bound_deployment.init_args[1]
    assert "meta-llama/Meta-Llama-3-70B-Instruct" not in routed and solo["route_prefix"] is None
    assert ingress_app.build_model_app(solo["args"])._bound_deployment.name == \
        deployment_name("meta-llama/Meta-Llama-3-70B-Instruct", "chat")


def test_requests_for_a_routed_model_go_to_its_applications_deployment(hub):
    async def go():
        async with http(hub.api) as h:
            plain = await h.post("/v1/chat/completions", json=chat("routed-chat"))
            streamed = await h.post("/v1/chat/completions", json=chat("routed-chat", stream=True))
            local = await h.post("/v1/chat/completions", json=chat("local-chat"))
            emb = await h.post("/v1/embeddings", json={"model": "routed-emb", "input": "abcd"})
            return plain, streamed, local, emb
    plain, streamed, local, emb = asyncio.run(go())
    assert sorted(hub.looked_up) == [("chat-app", "chat:routed-chat"), ("emb-app", "embedding:routed-emb")]
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == "cba"
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    assert local.status_code == 200 and emb.status_code == 200 and len(emb.json()["data"][0]["embedding"]) == 8
    assert hub.calls["routed-chat"] == ["generate", "generate_stream"] and hub.calls["local-chat"] == ["generate"]
    assert hub.calls["routed-emb"] == ["embed"]


def test_models_and_ready_list_a_routed_model_from_its_own_application(hub):
    async def go():
        async with http(hub.api) as h:
            return (await h.get("/v1/models")).json(), await h.get("/ready")
    models, ready = asyncio.run(go())
    assert [m["id"] for m in models["data"]] == ["local-chat", "routed-chat", "routed-emb"]
    assert ready.status_code == 200
    assert ready.json()["models"]["routed-chat"] == {"healthy": True, "status": "HEALTHY", "running_replicas": 1}


def test_a_routed_model_whose_application_is_missing_is_not_ready_and_its_requests_are_bounded(hub):
    del hub.apps["chat-app"]

    async def go():
        async with http(hub.api) as h:
            return await h.get("/ready"), await h.post("/v1/chat/completions", json=chat("routed-chat"))
    ready, reply = asyncio.run(go())
    assert ready.status_code == 503
    assert ready.json()["models"]["routed-chat"] == {
        "healthy": False, "status": "NOT_DEPLOYED", "running_replicas": 0,
        "message": "Serve application 'chat-app' is not deployed"}
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_starting"   # cold_start_timeout_s


def test_a_routed_model_is_in_a_keys_scope_as_a_local_one(monkeypatch):
    monkeypatch.setenv("TEST_MODELHUB_KEYS", "local-only")
    args = {**HUB, "ingress": {**HUB["ingress"], "auth": {"api_keys_env": "TEST_MODELHUB_KEYS", "keys": [
        {"sha256": hashlib.sha256(b"local-only").hexdigest(), "subject": "t", "models": ["local-*"]}]}}}
    hub = make_hub(monkeypatch, args)

    async def go():
        async with http(hub.api) as h:
            key = {"Authorization": "Bearer local-only"}
            return ((await h.get("/v1/models", headers=key)).json(),
                    await h.post("/v1/chat/completions", json=chat("routed-chat"), headers=key),
                    await h.post("/v1/chat/completions", json=chat("local-chat"), headers=key))
    models, routed, local = asyncio.run(go())
    assert [m["id"] for m in models["data"]] == ["local-chat"]
    assert routed.status_code == 404 and routed.json()["error"]["code"] == "model_not_found"
    assert local.status_code == 200 and hub.calls["routed-chat"] == []
