"""The deploy manifests: the production serve config passes our builder and Serve's own
ServeDeploySchema, cluster.yaml passes Ray's cluster-launcher schema and has room for every model at
max_replicas, the RayService carries the same serve config, and no dashboard Jobs API is left open."""
from __future__ import annotations

import json
import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRODUCTION = ROOT / "deploy" / "serve_config.production.yaml"
RAYSERVICE = ROOT / "deploy" / "rayservice.yaml"
CLUSTER = ROOT / "cluster.yaml"


def _rayservice_serve_config() -> dict:
    return yaml.safe_load(yaml.safe_load(RAYSERVICE.read_text())["spec"]["serveConfigV2"])


SERVE_CONFIGS = {"production": lambda: yaml.safe_load(PRODUCTION.read_text()), "rayservice": _rayservice_serve_config,
                 "default": lambda: yaml.safe_load((ROOT / "serve_config.yaml").read_text())}


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_passes_serve_schema_and_our_builder(name):
    from ray.serve.schema import ServeDeploySchema

    from ingress.app import build_app
    raw = SERVE_CONFIGS[name]()
    ServeDeploySchema.model_validate(raw)
    for app in raw["applications"]:
        assert app["import_path"] == "ingress.app:build_app"
        build_app(app["args"])   # validates the args and binds every deployment (Serve checks its options)


def test_production_config_has_the_seed_models_all_autoscaled():
    from deployments.config import parse_app_config
    cfg = parse_app_config(SERVE_CONFIGS["production"]()["applications"][0]["args"])
    models = {m.id: m for m in cfg.models}
    llama = models["meta-llama/Meta-Llama-3-70B-Instruct"]
    assert llama.engine.tensor_parallel_size == 4 and llama.engine.device == "cuda"
    assert llama.deployment.ray_actor_options["num_gpus"] == 1
    assert models["intfloat/e5-large-v2"].kind == "embedding"
    assert models["stabilityai/stable-diffusion-xl-base-1.0"].engine.sizes == ["1024*1024", "1792*1024", "1024*1792"]
    assert all(m.deployment.autoscaling_config is not None for m in cfg.models)
    assert cfg.ingress.auth.api_keys_env   # a public port needs keys


def test_rayservice_carries_the_production_serve_config():
    assert _rayservice_serve_config() == SERVE_CONFIGS["production"]()
    spec = yaml.safe_load(RAYSERVICE.read_text())
    assert spec["apiVersion"] == "ray.io/v1" and spec["kind"] == "RayService"
    assert spec["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"


def test_cluster_yaml_passes_rays_cluster_launcher_schema():
    import ray.autoscaler
    from jsonschema import validate
    schema = json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validate(yaml.safe_load(CLUSTER.read_text()), schema)
    with pytest.raises(Exception, match="Additional properties"):   # the schema does catch a typo
        validate({**yaml.safe_load(CLUSTER.read_text()), "max_worker": 3}, schema)


def test_the_dashboard_jobs_api_is_not_open_on_every_interface():
    cluster = yaml.safe_load(CLUSTER.read_text())
    starts = " ".join(cluster["head_start_ray_commands"])
    assert "0.0.0.0" not in starts and "--dashboard-host=127.0.0.1" in starts
    assert "ray dashboard cluster.yaml" in CLUSTER.read_text()   # the file says how to reach it
    head = yaml.safe_load(RAYSERVICE.read_text())["spec"]["rayClusterConfig"]["headGroupSpec"]
    if head["rayStartParams"].get("dashboard-host") == "0.0.0.0":   # in-pod: KubeRay's operator needs it
        assert "port-forward" in RAYSERVICE.read_text() and "Jobs API" in RAYSERVICE.read_text()


def _replica_bundles(model) -> list[dict[str, float]]:
    """The resources one replica takes: one bundle per tensor-parallel rank, else its actor options."""
    actor = model.deployment.ray_actor_options
    bundle = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0), **actor.get("resources", {})}
    return [bundle] * (model.engine.tensor_parallel_size if model.kind == "chat" else 1)


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0) >= v for k, v in need.items() if v)


def _place(groups: list[list[dict]], nodes: list[dict[str, float]]) -> None:
    """First-fit decreasing, each replica's bundles on one node (STRICT_PACK); raises if one does not fit."""
    for bundles in sorted(groups, key=lambda b: -sum(x.get("GPU", 0) for x in b)):
        need = {k: sum(b.get(k, 0) for b in bundles) for k in set().union(*bundles)}
        node = next((n for n in nodes if _fits(need, n)), None)
        if node is None:
            raise AssertionError(f"no node has room for a replica needing {need}")
        for k, v in need.items():
            node[k] = node.get(k, 0) - v


def test_cluster_has_room_for_every_model_at_max_replicas():
    from deployments.config import parse_app_config
    cluster = yaml.safe_load(CLUSTER.read_text())
    nodes = []
    for name, spec in cluster["available_node_types"].items():
        count = 1 if name == cluster["head_node_type"] else spec["max_workers"]
        nodes += [dict(spec["resources"]) for _ in range(count)]
    assert sum(n.get("GPU", 0) for n in nodes) > 0 and len(nodes) - 1 <= cluster["max_workers"]
    cfg = parse_app_config(SERVE_CONFIGS["production"]()["applications"][0]["args"])
    groups = [_replica_bundles(m) for m in cfg.models for _ in range(m.deployment.autoscaling_config.max_replicas)]
    ingress = cfg.ingress.deployment
    groups += [[{"CPU": ingress.ray_actor_options["num_cpus"]}]] * ingress.autoscaling_config.max_replicas
    _place(groups, nodes)
    llama_gpus = [sum(b["GPU"] for b in _replica_bundles(m)) for m in cfg.models if m.kind == "chat"]
    assert llama_gpus == [4]
    with pytest.raises(AssertionError, match="no node has room"):   # full: a fifth Llama replica has no node
        _place([_replica_bundles(cfg.models[0])], nodes)
