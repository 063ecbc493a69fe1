"""The hub on a real two-node Ray cluster (tests/integration/cluster.py), deployed with `serve deploy`
through the dashboard's REST API: placement follows the config, an idle model stays at zero replicas
while /v1/models and /ready list it, a cold start serves its first request, another Ray job calls the
models through typed handles, a loaded model scales up and back down alone, tensor-parallel ranks
land per their placement strategy, and a model in its own application, served through the hub's /v1,
is updated alone. Timings are printed (bench/README.md has them), never asserted."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import warnings

import httpx
import pytest

from deployments.builder import deployment_name
from tests.integration.cluster import ROOT, LocalCluster, wait_for
from tests.integration.conftest import CHAT, EMB, IMG, default_app_args

APP = "modelhub"
SOLO, SOLO_APP = "smollm2-solo", "chat-solo"   # a chat model in an application of its own, routed by the hub
UNPLACEABLE = "never-starts"
CHAT_DEP, EMB_DEP, IMG_DEP = deployment_name(CHAT, "chat"), deployment_name(EMB, "embedding"), deployment_name(IMG, "image")
SOLO_DEP = deployment_name(SOLO, "chat")

# Quick autoscaling so the test sees it within minutes: Serve's own defaults wait 30 s to scale up
# and 600 s to scale down.
FAST = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0, "upscale_delay_s": 1.0, "downscale_delay_s": 4.0}


def app_args() -> dict:
    """The default app, each model pinned to a node by its custom resource: the chat model on the
    worker (autoscaled 1..2), embeddings and images on the head and both scaled to zero when idle, the
    reranker on the head with one replica; SOLO routed to its own application (solo_app)."""
    args = default_app_args()
    chat, emb, img, rerank = (next(m for m in args["models"] if m["kind"] == k)
                              for k in ("chat", "embedding", "image", "rerank"))
    rerank["deployment"] = {"ray_actor_options": {"num_cpus": 0.1, "resources": {"head": 1}}}
    chat["engine"].update(num_threads=1, max_num_seqs=4)
    chat["deployment"] = {"ray_actor_options": {"num_cpus": 0.5, "resources": {"worker": 1}},
                          "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                                 **FAST}}
    emb["engine"]["num_threads"] = 1
    for model in (emb, img):
        model["cold_start_timeout_s"] = 600
        model["deployment"] = {"ray_actor_options": {"num_cpus": 0.25, "resources": {"head": 1}},
                               "autoscaling_config": {"min_replicas": 0, "max_replicas": 1, **FAST,
                                                      "downscale_to_zero_delay_s": 600}}
    # A model whose replica can never start (no node offers its resource): requests get 503 after the bound.
    args["models"].append({"id": UNPLACEABLE, "kind": "image", "source": img["source"], "engine": {"sizes": ["64x64"]},
                           "cold_start_timeout_s": 3,
                           "deployment": {"ray_actor_options": {"num_cpus": 0.1, "resources": {"nowhere": 1}},
                                          "autoscaling_config": {"min_replicas": 0, "max_replicas": 1, **FAST}}})
    args["models"].append({"id": SOLO, "kind": "chat", "application": SOLO_APP, "cold_start_timeout_s": 600})
    args["ingress"]["deployment"]["ray_actor_options"]["resources"] = {"head": 1}
    return args


def solo_app(default_max_tokens: int = 3) -> dict:
    """SmolLM2 as SOLO in an application of its own (no ingress, no HTTP route), on the worker, scaled to
    zero when idle. Its `default_max_tokens` shows which config a reply came from."""
    chat = default_app_args()["models"][0]
    chat["id"] = SOLO
    chat["engine"].update(num_threads=1, max_num_seqs=4, default_max_tokens=default_max_tokens)
    chat["deployment"] = {"ray_actor_options": {"num_cpus": 0.25, "resources": {"worker": 1}},
                          "graceful_shutdown_timeout_s": 300,
                          "autoscaling_config": {"min_replicas": 0, "max_replicas": 1, **FAST,
                                                 "downscale_to_zero_delay_s": 600}}
    return {"name": SOLO_APP, "route_prefix": None, "import_path": "ingress.app:build_model_app",
            "args": {"model": chat}}


def serve_config(cluster: LocalCluster, extra_apps: list[dict] = (), solo: dict | None = None) -> dict:
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": cluster.serve_port},
            "applications": [{"name": APP, "route_prefix": "/", "import_path": "ingress.app:build_app",
                              "args": app_args()}, solo or solo_app(), *extra_apps]}


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(("head", "worker"))
    try:
        c.start()
        c.deploy(serve_config(c))
        c.wait_running(APP, SOLO_APP)
        yield c
    finally:
        c.stop()


def ready_within(cluster: LocalCluster, timeout_s: float) -> httpx.Response:
    """/ready once it answers 200. A deployment can pass through a transient not-ready state (a CI run
    once saw the chat model UPDATING with no running replica right after it had answered, as while
    Serve's controller recovers its replicas); that is reported, with what Serve said, not failed on."""
    first = None

    def ready():
        nonlocal first
        reply = httpx.get(f"{cluster.url}/ready", timeout=60)
        if reply.status_code != 200 and first is None:
            first = reply.text
        return reply if reply.status_code == 200 else None
    reply = wait_for(ready, timeout_s, "/ready answering 200")
    if first is not None:
        deployments = cluster.serve_details()["applications"][APP]["deployments"]
        warnings.warn(f"/ready was not ready at first: {first}; Serve now: "
                      f"{ {name: (d['status'], d['message']) for name, d in deployments.items()} }")
    return reply


def node_of(replicas: list[dict]) -> set[str]:
    return {r["node_id"] for r in replicas}


def test_each_model_runs_on_the_node_its_resource_pins_it_to(cluster):
    nodes = cluster.nodes()
    assert set(nodes) == {"head", "worker"}
    assert node_of(cluster.replicas(APP, CHAT_DEP)) == {nodes["worker"]}
    assert node_of(cluster.replicas(APP, "Ingress")) == {nodes["head"]}
    reply = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=120, json={
        "model": CHAT, "max_tokens": 8, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_an_idle_model_stays_at_zero_while_listed_and_its_first_request_waits_for_the_cold_start(cluster, measured):
    assert cluster.replicas(APP, IMG_DEP, state=None) == [] and cluster.replicas(APP, EMB_DEP, state=None) == []
    models = httpx.get(f"{cluster.url}/v1/models", timeout=60).json()["data"]
    listed = {m["id"]: m for m in models}
    assert listed[IMG]["image_sizes"] == ["64*64", "128*128", "256*256"] and "embedding_dimensions" not in listed[EMB]
    ready = ready_within(cluster, 120)
    assert ready.json()["models"][IMG] == {"healthy": True, "status": "HEALTHY", "running_replicas": 0}
    deadline = time.monotonic() + 5   # several autoscaling periods: listing woke nothing
    while time.monotonic() < deadline:
        assert cluster.replicas(APP, IMG_DEP, state=None) == [] and cluster.replicas(APP, EMB_DEP, state=None) == []
        time.sleep(0.5)
    cold = {}
    for model, path, body in ((EMB, "embeddings", {"input": "hello"}),
                              (IMG, "images/generations", {"prompt": "a red square", "size": "64x64"})):
        start = time.monotonic()
        reply = httpx.post(f"{cluster.url}/v1/{path}", json={"model": model, **body}, timeout=300)
        cold[model] = time.monotonic() - start
        assert reply.status_code == 200, reply.text
    measured(f"cold start, zero to response: {json.dumps({k: round(v, 1) for k, v in cold.items()})}")
    assert len(cluster.replicas(APP, IMG_DEP)) == 1
    start = time.monotonic()
    reply = httpx.post(f"{cluster.url}/v1/images/generations", timeout=300,
                       json={"model": UNPLACEABLE, "prompt": "x", "size": "64x64"})
    measured(f"a model that cannot start: {reply.status_code} after {time.monotonic() - start:.1f} s (bound 3 s)")
    assert reply.status_code == 503 and reply.headers["retry-after"] == "3", reply.text
    assert reply.json()["error"]["code"] == "model_starting"
    dims = wait_for(lambda: {m["id"]: m for m in httpx.get(f"{cluster.url}/v1/models", timeout=60).json()["data"]}
                    [EMB].get("embedding_dimensions"), 60, "details of a running model in /v1/models")
    assert dims == 384


def test_another_ray_job_calls_every_model_through_typed_handles(cluster):
    done = subprocess.run([sys.executable, "-m", "tests.integration.handle_driver", cluster.address],
                          cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["typed"] and got["png"] and got["embedding_shape"] == [2, 384]
    assert "Paris" in got["chat"] and got["stream"] == got["chat"]   # greedy: a stream is the same answer
    assert got["chunks"] > 1 and got["stream_usage"] == 8 and got["completion"]


class Load:
    """Clients that keep `concurrency` chat requests in flight until stopped; records every status."""

    def __init__(self, url: str, concurrency: int, max_tokens: int = 32):
        self.url, self.concurrency, self.max_tokens = url, concurrency, max_tokens
        self.statuses: list[int] = []
        self._stop = asyncio.Event()
        self._thread = None

    def __enter__(self) -> "Load":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=300)

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=300) as http:
            await asyncio.gather(*(self._client(http) for _ in range(self.concurrency)))

    async def _client(self, http: httpx.AsyncClient) -> None:
        body = {"model": CHAT, "max_tokens": self.max_tokens, "messages": [{"role": "user", "content": "Tell me a story."}]}
        while not self._stop.is_set():
            try:
                reply = await http.post(f"{self.url}/v1/chat/completions", json=body)
                self.statuses.append(reply.status_code)
            except httpx.HTTPError:
                self.statuses.append(0)


def test_a_loaded_model_scales_up_then_back_down_and_the_others_do_not_move(cluster, measured):
    def others():
        return len(cluster.replicas(APP, EMB_DEP)), len(cluster.replicas(APP, IMG_DEP))
    before = others()
    assert len(cluster.replicas(APP, CHAT_DEP)) == 1
    seen_others = set()

    def chat_replicas(n):
        seen_others.add(others())
        return len(cluster.replicas(APP, CHAT_DEP)) == n
    start = time.monotonic()
    with Load(cluster.url, concurrency=6) as load:
        wait_for(lambda: chat_replicas(2), 600, "a second chat replica under load")
        up_s = time.monotonic() - start
    stopped = time.monotonic()
    wait_for(lambda: chat_replicas(1) and len(cluster.replicas(APP, CHAT_DEP, state=None)) == 1, 600,
             "back to one chat replica after the load")
    down_s = time.monotonic() - stopped
    measured(f"autoscaling: 1 -> 2 replicas {up_s:.1f} s after the load started, 2 -> 1 {down_s:.1f} s after it "
          f"stopped (upscale_delay_s {FAST['upscale_delay_s']}, downscale_delay_s {FAST['downscale_delay_s']}); "
          f"{len(load.statuses)} requests")
    assert seen_others == {before}
    assert load.statuses and set(load.statuses) == {200}


def tp_app(name: str, strategy: str) -> dict:
    """SmolLM2 sharded over 3 ranks (9 heads, 3 KV heads), its bundles placed by `strategy`."""
    return {"name": name, "route_prefix": f"/{name}", "import_path": "ingress.app:build_app", "args": {
        "models": [{"id": name, "kind": "chat", "source": default_app_args()["models"][0]["source"],
                    "engine": {"tensor_parallel_size": 3, "tensor_parallel_placement": strategy, "num_threads": 1,
                               "max_num_seqs": 2},
                    "deployment": {"ray_actor_options": {"num_cpus": 0.05}}}],
        "ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.05, "resources": {"head": 1}}}}}}


def test_tensor_parallel_ranks_follow_the_strategy_and_an_untouched_app_keeps_serving(cluster):
    from ray.util.state import list_placement_groups
    kept = {r["replica_id"] for dep in (CHAT_DEP, "Ingress") for r in cluster.replicas(APP, dep)}
    with Load(cluster.url, concurrency=2, max_tokens=8) as load:
        cluster.deploy(serve_config(cluster, [tp_app("tp-pack", "STRICT_PACK"), tp_app("tp-spread", "SPREAD")]))
        cluster.wait_running("tp-pack", "tp-spread", APP)
    assert load.statuses and set(load.statuses) == {200}   # the unchanged app served all along...
    assert {r["replica_id"] for dep in (CHAT_DEP, "Ingress") for r in cluster.replicas(APP, dep)} == kept   # ...unrestarted
    pgs = list_placement_groups(address=cluster.dashboard, detail=True, filters=[("state", "=", "CREATED")])
    groups = {app: g for g in pgs for app in ("tp-pack", "tp-spread") if app in (g.name or "")}
    assert set(groups) == {"tp-pack", "tp-spread"}, [g.name for g in pgs]   # Serve names a replica's group after it
    pack_nodes = {b["node_id"] for b in groups["tp-pack"].bundles}
    spread_nodes = {b["node_id"] for b in groups["tp-spread"].bundles}
    assert len(groups["tp-pack"].bundles) == 3 and len(pack_nodes) == 1
    assert len(groups["tp-spread"].bundles) == 3 and spread_nodes == set(cluster.nodes().values())
    for name in ("tp-pack", "tp-spread"):   # the ranks, across nodes or not, answer as one model
        reply = httpx.post(f"{cluster.url}/{name}/v1/chat/completions", timeout=300, json={
            "model": name, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"], reply.text


def stream_chat(url: str, max_tokens: int, first: threading.Event, out: dict, model: str = CHAT, **extra) -> None:
    """One streamed chat request; records the status, time to first byte, finish reason, chunks and the
    time it ended."""
    start = time.monotonic()
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}], **extra}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as reply:
        out["status"] = reply.status_code
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            out.setdefault("first_byte_s", time.monotonic() - start)
            first.set()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out["completion_tokens"] = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                out["finish_reason"] = choice.get("finish_reason") or out.get("finish_reason")
    out["ended"] = time.monotonic()
    first.set()


def stopping_while_streaming(cluster: LocalCluster, old: set[str], stream: dict) -> object:
    """The old replicas once Serve reports them STOPPING, or "ended" if the stream ended first (a
    replica briefly missing from Serve's details while the application is rebuilt is polled again)."""
    if "ended" in stream:
        return "ended"
    return [r for r in cluster.replicas(SOLO_APP, SOLO_DEP, state="STOPPING") if r["replica_id"] in old]


NO_EOS = {"0": -100, "2": -100}   # SmolLM2's end tokens banned: a stream runs its whole max_tokens


def test_a_model_in_its_own_application_cold_starts_through_the_hub_and_updates_alone(cluster, measured):
    cluster.deploy(serve_config(cluster))   # the tensor-parallel apps removed; the hub and SOLO_APP unchanged
    wait_for(lambda: set(cluster.serve_details()["applications"]) == {APP, SOLO_APP}, 300, "the other apps removed")
    assert cluster.replicas(SOLO_APP, SOLO_DEP, state=None) == []   # idle since deployed: still at zero
    assert cluster.replicas(APP, SOLO_DEP, state=None) == []        # and the hub has no deployment of it
    cold, first = {}, threading.Event()
    stream_chat(cluster.url, 4, first, cold, model=SOLO)
    assert cold["status"] == 200 and cold["completion_tokens"] == 4
    measured(f"cold start, SmolLM2 in its own application from zero to first byte through the hub: "
          f"{cold['first_byte_s']:.1f} s")
    old = {r["replica_id"] for r in cluster.replicas(SOLO_APP, SOLO_DEP)}
    hub_deps = (CHAT_DEP, EMB_DEP, IMG_DEP, "Ingress")
    kept = {dep: {r["replica_id"] for r in cluster.replicas(APP, dep)} for dep in hub_deps}
    assert len(old) == 1 and all(kept.values())
    in_flight, first, drained_from = {}, threading.Event(), None
    stream = threading.Thread(target=stream_chat, args=(cluster.url, 192, first, in_flight),
                              kwargs={"model": SOLO, "logit_bias": NO_EOS})
    with Load(cluster.url, concurrency=2, max_tokens=8) as load:   # on another model of the hub
        stream.start()
        assert first.wait(300) and in_flight["status"] == 200
        cluster.deploy(serve_config(cluster, solo=solo_app(default_max_tokens=5)))   # only SOLO_APP's args change
        stopping = wait_for(lambda: stopping_while_streaming(cluster, old, in_flight), 300,
                            "the old SOLO replica stopping", poll_s=0.2)
        drained_from = time.monotonic()
        assert stopping != "ended", "the stream ended before its replica was seen stopping: nothing showed a drain"
        stream.join(600)
        assert not stream.is_alive()
        wait_for(lambda: not old & {r["replica_id"] for r in cluster.replicas(SOLO_APP, SOLO_DEP, state=None)},
                 300, "the old SOLO replica stopped")
    assert {r["replica_id"] for r in stopping} == old
    assert in_flight["ended"] > drained_from   # the stream was still running when its replica began to stop...
    assert in_flight["finish_reason"] == "length" and in_flight["completion_tokens"] == 192   # ...and finished whole
    assert load.statuses and set(load.statuses) == {200}
    assert {dep: {r["replica_id"] for r in cluster.replicas(APP, dep)} for dep in hub_deps} == kept   # unrestarted
    after = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=600, json={
        "model": SOLO, "logit_bias": NO_EOS, "messages": [{"role": "user", "content": "Hello"}]})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 5   # the new config answered
    new = {r["replica_id"] for r in cluster.replicas(SOLO_APP, SOLO_DEP)}
    assert new and not new & old
    measured(f"update of SOLO alone: drained a {in_flight['completion_tokens']}-token stream for "
          f"{in_flight['ended'] - drained_from:.1f} s after its replica began stopping; {len(load.statuses)} "
          f"requests to the hub's own chat model meanwhile, all 200")
