"""serve_config.yaml args: validation, helpful unknown-key errors, Serve options."""
from __future__ import annotations

import pathlib

import pytest
import yaml

from deployments.config import ConfigError, DeploymentOptions, parse_app_config, parse_model_app_config, parse_size

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_default_serve_config_is_valid():
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "ingress.app:build_app"
    parsed = parse_app_config(app["args"])
    assert [m.kind for m in parsed.models] == ["chat", "embedding", "image", "rerank"]
    assert "random" in parsed.models[2].id and "random" in parsed.models[3].id   # built in code: named random


@pytest.mark.parametrize("args,fragment", [
    ({"models": [{"id": "a", "kind": "chat", "source": "x", "engine": {"max_num_seq": 3}}]},
     "unknown key 'models.0.engine.max_num_seq'; did you mean 'max_num_seqs'?"),
    ({"models": [{"id": "a", "kind": "chat", "source": "x", "deployment": {"num_replica": 2}}]},
     "did you mean 'num_replicas'?"),
    ({"models": [{"id": "a", "kind": "embedding", "source": "x", "sorce": "y"}]}, "did you mean 'source'?"),
    ({"models": [], "ingres": {}}, "did you mean 'ingress'?"),
    ({"models": [{"id": "a", "kind": "chat", "source": "x", "engine": {"tensor_parallel_size": 0}}]},
     "tensor_parallel_size"),
    ({"models": [{"id": "a", "kind": "image", "source": "x", "engine": {"sizes": ["huge"]}}]}, "WIDTH*HEIGHT"),
    ({"models": [{"id": "a", "kind": "chat", "source": "x"}, {"id": "a", "kind": "chat", "source": "y"}]},
     "appears twice"),
    ({"models": [{"id": "a", "kind": "chat", "source": "x", "engine": {"batch_invariant": True, "device": "cuda"}}]},
     "batch_invariant true does not work with device 'cuda'"),
    ({"models": [{"id": "a", "kind": "chat", "source": "x",
                  "engine": {"batch_invariant": True, "prepack_weights": False}}]},
     "batch_invariant true does not work with prepack_weights false"),
    ({"models": [{"id": "a", "kind": "chat"}]}, "source is required (or `application`"),
    ({"models": [{"id": "a", "kind": "chat", "application": "chat-a", "source": "x", "engine": {"max_num_seqs": 4}}]},
     "move `engine`, `source` to the args of application 'chat-a' (ingress.app:build_model_app)"),
    ({"models": [{"id": "a", "kind": "embedding", "application": "emb-a", "deployment": {"num_replicas": 2}}]},
     "move `deployment` to the args of application 'emb-a'"),
    ({"models": [{"id": "a", "kind": "image", "application": "img-a"}]}, "an image model cannot name an `application`"),
    ({"models": [{"id": "a", "kind": "chat", "source": "x", "aplication": "b"}]}, "did you mean 'application'?"),
])
def test_bad_config_names_the_problem(args, fragment):
    with pytest.raises(ConfigError) as info:
        parse_app_config(args)
    assert fragment in str(info.value)


def test_a_routed_entry_holds_only_what_the_ingress_reads():
    cfg = parse_app_config({"models": [{"id": "a", "kind": "chat", "application": "chat-a", "owned_by": "me",
                                        "cold_start_timeout_s": 30}]})
    routed = cfg.models[0]
    assert routed.application == "chat-a" and routed.source is None and routed.cold_start_timeout_s == 30
    assert routed.card(1).owned_by == "me" and routed.card(1).context_length is None   # asked of the model


@pytest.mark.parametrize("args,fragment", [
    ({"model": {"id": "a", "kind": "chat", "source": "x", "application": "me"}},
     "`application` belong in the hub's entry for this model"),
    ({"model": {"id": "a", "kind": "chat", "source": "x", "cold_start_timeout_s": 9, "owned_by": "me"}},
     "`cold_start_timeout_s`, `owned_by` belong in the hub's entry"),
    ({"model": {"id": "a", "kind": "chat", "source": "x", "engine": {"max_num_seq": 3}}},
     "unknown key 'model.engine.max_num_seq'; did you mean 'max_num_seqs'?"),
    ({"model": {"id": "a", "kind": "chat", "source": "x"}, "route_prefix": "/a"}, "unknown key 'route_prefix'"),
    ({"model": {"id": "a", "kind": "chat"}}, "source is required"),
    ({"models": [{"id": "a", "kind": "chat", "source": "x"}]}, "did you mean 'model'?"),
])
def test_a_model_apps_config_is_one_model_checked_as_the_hub_checks_it(args, fragment):
    with pytest.raises(ConfigError) as info:
        parse_model_app_config(args)
    assert fragment in str(info.value)


def test_serve_options_merge_defaults_and_explicit_fields():
    opts = DeploymentOptions(max_ongoing_requests=7, ray_actor_options={"num_gpus": 1}).serve_options(
        {"max_ongoing_requests": 64, "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}})
    assert opts == {"max_ongoing_requests": 7, "num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}
    auto = DeploymentOptions(autoscaling_config={"min_replicas": 1, "max_replicas": 4}).serve_options(
        {"num_replicas": 1, "ray_actor_options": {}})
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 4


def test_parse_size_accepts_both_forms():
    assert parse_size("512x256") == (512, 256)
    assert parse_size("1024*1024") == (1024, 1024)
    assert parse_size("0x5") is None and parse_size("big") is None


def test_engine_defaults_follow_the_device_unless_set():
    import torch

    from deployments.config import LLMEngineConfig
    from deployments.llm.factory import device_defaults
    assert device_defaults(LLMEngineConfig(), torch.device("cpu")) == (64, True)
    assert device_defaults(LLMEngineConfig(), torch.device("cuda")) == (2048, False)
    explicit = LLMEngineConfig(max_prefill_tokens=256, mixed_steps=True)
    assert device_defaults(explicit, torch.device("cuda")) == (256, True)
    assert device_defaults(LLMEngineConfig(mixed_steps=False), torch.device("cpu")) == (64, False)


def test_a_tensor_parallel_chat_model_asks_serve_for_one_bundle_per_rank_on_one_node():
    from deployments.builder import model_deployment
    cfg = parse_app_config({"models": [{"id": "a", "kind": "chat", "source": "x",
                                        "engine": {"tensor_parallel_size": 3},
                                        "deployment": {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}}}]})
    replica = model_deployment(cfg.models[0])._bound_deployment._replica_config
    assert replica.placement_group_bundles == [{"CPU": 0.5, "GPU": 1}] * 3
    assert replica.placement_group_strategy == "STRICT_PACK"


def test_image_sizes_are_shown_w_star_h_however_written():
    cfg = parse_app_config({"models": [{"id": "i", "kind": "image", "source": "builtin:x",
                                        "engine": {"sizes": ["512x256", "64*64"]}}]})
    assert cfg.models[0].engine.sizes == ["512*256", "64*64"]


def test_tensor_parallel_ranks_follow_the_configured_strategy_and_carry_custom_resources():
    from deployments.builder import model_deployment
    cfg = parse_app_config({"models": [{"id": "a", "kind": "chat", "source": "x",
                                        "engine": {"tensor_parallel_size": 2, "tensor_parallel_placement": "SPREAD"},
                                        "deployment": {"ray_actor_options": {"num_cpus": 1,
                                                                             "resources": {"big_node": 0.1}}}}]})
    replica = model_deployment(cfg.models[0])._bound_deployment._replica_config
    assert replica.placement_group_bundles == [{"CPU": 1, "big_node": 0.1}] * 2
    assert replica.placement_group_strategy == "SPREAD"
    with pytest.raises(ConfigError, match="tensor_parallel_placement"):
        parse_app_config({"models": [{"id": "a", "kind": "chat", "source": "x",
                                      "engine": {"tensor_parallel_placement": "ANYWHERE"}}]})


def _scaling(kind, engine=None, **autoscaling):
    model = {"id": "m", "kind": kind, "source": "x", "engine": engine or {},
             "deployment": {"autoscaling_config": autoscaling}}
    return parse_app_config({"models": [model]}).models[0].deployment.autoscaling_config


def test_autoscaling_is_typed_and_unset_fields_take_the_kinds_defaults():
    chat = _scaling("chat", {"max_num_seqs": 16}, max_replicas=3)
    assert (chat.min_replicas, chat.max_replicas, chat.target_ongoing_requests) == (1, 3, 8)
    assert chat.downscale_delay_s == 300
    assert _scaling("embedding", {"max_batch_size": 32}).target_ongoing_requests == 16
    image = _scaling("image", {"max_batch_size": 2}, target_ongoing_requests=5)
    assert image.target_ongoing_requests == 5 and image.upscale_delay_s == 10   # explicit wins
    auto = parse_app_config({"models": [{"id": "m", "kind": "chat", "source": "x",
                                         "deployment": {"num_replicas": "auto"}}]}).models[0]
    assert auto.deployment.num_replicas is None and auto.deployment.autoscaling_config.target_ongoing_requests == 16


def test_autoscaling_reaches_serve_as_its_own_autoscaling_config():
    from ray.serve.config import AutoscalingConfig

    from deployments.builder import model_deployment
    cfg = parse_app_config({"models": [{"id": "m", "kind": "embedding", "source": "x", "deployment": {
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 2, "downscale_to_zero_delay_s": 60}}}]})
    deployment_config = model_deployment(cfg.models[0])._bound_deployment._deployment_config
    serve_side = deployment_config.autoscaling_config
    assert isinstance(serve_side, AutoscalingConfig)
    assert (serve_side.min_replicas, serve_side.max_replicas, serve_side.target_ongoing_requests) == (0, 2, 32)
    assert serve_side.downscale_to_zero_delay_s == 60 and serve_side.downscale_delay_s == 120
    assert cfg.models[0].min_replicas == 0


@pytest.mark.parametrize("scaling,fragment", [
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas (3) is above max_replicas (2)"),
    ({"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}, "initial_replicas (5) must lie between"),
    ({"max_replica": 2}, "did you mean 'max_replicas'?"),
    ({"target_ongoing_requests": 0}, "target_ongoing_requests"),
    ({"min_replicas": -1}, "min_replicas"),
])
def test_bad_autoscaling_names_the_problem(scaling, fragment):
    with pytest.raises(ConfigError) as info:
        parse_app_config({"models": [{"id": "m", "kind": "chat", "source": "x",
                                      "deployment": {"autoscaling_config": scaling}}]})
    assert fragment in str(info.value)
    with pytest.raises(ConfigError, match="not both"):
        parse_app_config({"models": [{"id": "m", "kind": "chat", "source": "x",
                                      "deployment": {"num_replicas": 2, "autoscaling_config": {}}}]})
