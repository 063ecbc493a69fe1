"""Queue-depth autoscaling (deployments/autoscaling.py): the policy as Serve's controller runs it, on
constructed contexts (scale up, down, bounds, delays); the engine load each LLM replica reports
(LLMServer.record_autoscaling_stats); and the config that chooses the policy."""
from __future__ import annotations

import asyncio
import time
import types

import pytest
from ray.serve.autoscaling_policy import _apply_autoscaling_config, replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import SEQUENCES, QueueDepthPolicy, total_sequences
from deployments.config import AutoscalingOptions, ChatModelConfig, ConfigError, parse_app_config
from deployments.llm.built_engine import BuiltEngine, EngineLoad
from deployments.llm.server import LLMServer
from tests.unit.fakes import ByteTokenizer
from tests.unit.llm_helpers import make_server


def _options(**scaling) -> AutoscalingOptions:
    """A chat model's autoscaling options with queue_depth, as the config resolves them."""
    return parse_app_config({"models": [{"id": "m", "kind": "chat", "source": "x", "deployment": {
        "autoscaling_config": {"policy": "queue_depth", **scaling}}}]}).models[0].deployment.autoscaling_config


def _serve_policy(**scaling):
    """What Serve's controller calls each tick: our config -> Serve's AutoscalingConfig -> the policy
    class unpickled and built with its kwargs -> Serve's wrapper (scaling factors and delays)."""
    config = AutoscalingConfig(**_options(**scaling).serve_config())
    raw = config.policy.get_policy()
    return config, _apply_autoscaling_config(raw(**config.policy.policy_kwargs))


def _ctx(config, replicas: int, sequences: list[float], target: int | None = None, requests: float = 0,
         queued: float = 0, state: dict | None = None) -> AutoscalingContext:
    ids = [f"r{i}" for i in range(replicas)]
    return AutoscalingContext(
        deployment_id="chat:m", deployment_name="chat:m", app_name="app", current_num_replicas=replicas,
        target_num_replicas=replicas if target is None else target, running_replicas=ids,
        total_num_requests=requests, total_queued_requests=queued,
        aggregated_metrics={SEQUENCES: dict(zip(ids, sequences))}, raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state or {}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=time.time(), config=config)


@pytest.fixture
def clock(monkeypatch):
    """Serve's delay logic reads time.time() in autoscaling_policy; this clock moves only when told."""
    now = [1000.0]
    monkeypatch.setattr("ray.serve.autoscaling_policy.time", types.SimpleNamespace(time=lambda: now[0]))
    return now


def test_replicas_follow_sequences_over_the_target_where_requests_would_not(clock):
    config, policy = _serve_policy(target_sequences_per_replica=8, min_replicas=1, max_replicas=4,
                                   upscale_delay_s=0)
    # two requests with n=8: 16 sequences in one engine -> two replicas ...
    assert policy(_ctx(config, 1, [16.0], requests=2))[0] == 2
    # ... where Serve's own policy, aiming at 8 requests per replica, sees two requests and keeps one
    serve_side = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=8, upscale_delay_s=0)
    default = _apply_autoscaling_config(replica_queue_length_autoscaling_policy)
    assert default(_ctx(serve_side, 1, [16.0], requests=2))[0] == 1
    assert policy(_ctx(config, 2, [10.0, 9.0]))[0] == 3          # sums every replica's engine
    assert policy(_ctx(config, 1, [8.0], queued=1))[0] == 2      # a request queued at a handle counts


def test_bounds_hold(clock):
    config, policy = _serve_policy(target_sequences_per_replica=8, min_replicas=1, max_replicas=3,
                                   upscale_delay_s=0, downscale_delay_s=0)
    assert policy(_ctx(config, 1, [500.0]))[0] == 3
    assert policy(_ctx(config, 3, [0.0, 0.0, 0.0]))[0] == 1


def test_upscale_waits_for_upscale_delay_s(clock):
    config, policy = _serve_policy(target_sequences_per_replica=8, min_replicas=1, max_replicas=4,
                                   upscale_delay_s=5)
    replicas, state = policy(_ctx(config, 1, [24.0]))
    assert replicas == 1
    clock[0] += 4.9
    replicas, state = policy(_ctx(config, 1, [24.0], state=state))
    assert replicas == 1
    clock[0] += 0.2
    assert policy(_ctx(config, 1, [24.0], state=state))[0] == 3


def test_downscale_waits_for_downscale_delay_s_and_a_dip_resets_it(clock):
    config, policy = _serve_policy(target_sequences_per_replica=8, min_replicas=1, max_replicas=4,
                                   downscale_delay_s=10)
    replicas, state = policy(_ctx(config, 3, [1.0, 0.0, 0.0]))
    assert replicas == 3
    clock[0] += 6
    replicas, state = policy(_ctx(config, 3, [8.0, 8.0, 8.0], state=state))   # load is back: the wait resets
    assert replicas == 3
    clock[0] += 6
    replicas, state = policy(_ctx(config, 3, [1.0, 0.0, 0.0], state=state))
    assert replicas == 3                                                        # only 0 s of a new wait
    clock[0] += 10
    assert policy(_ctx(config, 3, [1.0, 0.0, 0.0], state=state))[0] == 1


def test_scale_to_zero_and_back(clock):
    config, policy = _serve_policy(target_sequences_per_replica=8, min_replicas=0, max_replicas=2,
                                   downscale_delay_s=0, downscale_to_zero_delay_s=30)
    replicas, state = policy(_ctx(config, 1, [0.0]))
    assert replicas == 1                                      # idle: zero after downscale_to_zero_delay_s
    clock[0] += 30
    assert policy(_ctx(config, 1, [0.0], state=state))[0] == 0
    assert policy(_ctx(config, 0, [], requests=1))[0] == 1    # a request at zero: Serve's cold-start path
    assert policy(_ctx(config, 0, [], target=1))[0] == 1      # a replica still starting reports nothing yet


def test_total_sequences_without_reports_is_the_handle_queue():
    ctx = types.SimpleNamespace(aggregated_metrics=None, total_queued_requests=None)
    assert total_sequences(ctx) == 0
    ctx.aggregated_metrics, ctx.total_queued_requests = {"other": {"r0": 5.0}}, 2.0
    assert total_sequences(ctx) == 2.0


def test_the_policy_refuses_a_target_that_is_not_positive():
    with pytest.raises(ValueError, match="target_sequences_per_replica"):
        QueueDepthPolicy(0)


# ----------------------------------------------------------------------------- what a replica reports

class _LoadedEngine:
    """A serving engine that only reports a given load."""

    def __init__(self, load: EngineLoad):
        self._load = load

    def load(self) -> EngineLoad:
        return self._load


def test_the_server_reports_its_engines_load_to_serve():
    cfg = ChatModelConfig(id="m", kind="chat", source="x")
    engine = _LoadedEngine(EngineLoad(running_seqs=5, waiting_seqs=11, waiting_prompt_tokens=300))
    server = LLMServer(cfg, engine_factory=lambda _: BuiltEngine(engine, ByteTokenizer(), 64))
    stats = server.record_autoscaling_stats()
    assert stats == {"engine_sequences": 16, "engine_running_sequences": 5, "engine_waiting_sequences": 11,
                     "engine_waiting_prompt_tokens": 300}
    assert all(isinstance(v, (int, float)) for v in stats.values())   # what Serve accepts from this hook


def test_a_request_counts_each_of_its_sequences_while_it_runs_and_nothing_after():
    """n=3 over two prompts (a completions prompt list) holds six sequences, in the real engine."""
    from deployments.types import GenerateRequest, SamplingParams
    # long generations, so the six-sequence state lasts while the probe polls on a busy machine
    server = make_server(max_num_seqs=4, max_waiting=8, max_model_len=256)

    async def go():
        req = GenerateRequest("r", SamplingParams(max_tokens=240, temperature=1.0, n=3, logit_bias={256: -100.0}),
                              prompts=["hello", "abc"])
        stream = server.generate_stream(req)
        await stream.__anext__()   # the request is in the engine
        seen = await _until(server, lambda stats: stats["engine_running_sequences"] == 3)
        await stream.aclose()      # the client goes: its sequences are aborted
        after = await _until(server, lambda stats: stats["engine_sequences"] == 0)
        return seen, after
    seen, after = asyncio.run(go())
    # a prompt's n sequences join the batch together: "hello" x3 runs, "abc" x3 waits (max_num_seqs 4)
    assert seen == {"engine_sequences": 6, "engine_running_sequences": 3, "engine_waiting_sequences": 3,
                    "engine_waiting_prompt_tokens": len("abc")}
    assert after == {"engine_sequences": 0, "engine_running_sequences": 0, "engine_waiting_sequences": 0,
                     "engine_waiting_prompt_tokens": 0}


async def _until(server: LLMServer, probe, timeout_s: float = 30.0) -> dict:
    """Polls the load the engine thread publishes (after each step) until `probe` holds."""
    deadline = time.monotonic() + timeout_s
    while not probe(stats := server.record_autoscaling_stats()):
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine's load stayed at {stats}")
        await asyncio.sleep(0.01)
    return stats


# ----------------------------------------------------------------------------- config

def test_queue_depth_is_chosen_per_chat_model_and_reaches_serve_as_its_custom_policy():
    from deployments.builder import model_deployment
    cfg = parse_app_config({"models": [{"id": "m", "kind": "chat", "source": "x", "engine": {"max_num_seqs": 16},
                                        "deployment": {"autoscaling_config": {"policy": "queue_depth",
                                                                              "max_replicas": 3}}}]})
    scaling = cfg.models[0].deployment.autoscaling_config
    assert (scaling.target_sequences_per_replica, scaling.target_ongoing_requests) == (8, None)   # half a batch
    assert scaling.upscale_delay_s == 15 and scaling.downscale_delay_s == 300                   # the kind's delays
    serve_side = model_deployment(cfg.models[0])._bound_deployment._deployment_config.autoscaling_config
    assert serve_side.policy.policy_function == "deployments.autoscaling:QueueDepthPolicy"
    assert serve_side.policy.policy_kwargs == {"target_sequences_per_replica": 8}
    assert (serve_side.max_replicas, serve_side.upscale_delay_s) == (3, 15)
    # the ingress gets the config as JSON and validates it again
    assert type(cfg).model_validate(cfg.model_dump(mode="json")).models[0].deployment.autoscaling_config == scaling


def test_the_default_stays_serves_request_policy():
    from deployments.builder import model_deployment
    cfg = parse_app_config({"models": [{"id": "m", "kind": "chat", "source": "x", "engine": {"max_num_seqs": 16},
                                        "deployment": {"autoscaling_config": {}}}]})
    assert cfg.models[0].deployment.autoscaling_config.policy == "requests"
    serve_side = model_deployment(cfg.models[0])._bound_deployment._deployment_config.autoscaling_config
    assert serve_side.policy.is_default_policy_function() and serve_side.target_ongoing_requests == 8


@pytest.mark.parametrize("kind,scaling,fragment", [
    ("chat", {"policy": "tokens"}, "policy"),
    ("chat", {"policy": "queue_depth", "target_ongoing_requests": 4}, "target_ongoing_requests is the 'requests'"),
    ("chat", {"target_sequences_per_replica": 4}, "target_sequences_per_replica needs policy 'queue_depth'"),
    ("chat", {"policy": "queue_depth", "target_sequences_per_replica": 0}, "target_sequences_per_replica"),
    ("embedding", {"policy": "queue_depth"}, "autoscaling_config.policy 'queue_depth' does not apply to embedding"),
    ("image", {"policy": "queue_depth"}, "autoscaling_config.policy 'queue_depth' does not apply to image"),
])
def test_a_policy_that_does_not_fit_is_a_config_error_naming_the_field(kind, scaling, fragment):
    with pytest.raises(ConfigError) as info:
        parse_app_config({"models": [{"id": "m", "kind": kind, "source": "x",
                                      "deployment": {"autoscaling_config": scaling}}]})
    assert fragment in str(info.value)


def test_the_ingress_scales_on_requests_only():
    with pytest.raises(ConfigError, match="ingress.deployment.autoscaling_config.policy 'queue_depth'"):
        parse_app_config({"models": [{"id": "m", "kind": "chat", "source": "x"}],
                          "ingress": {"deployment": {"autoscaling_config": {"policy": "queue_depth"}}}})
