"""/ready from Serve's deployment states (faked here), and /health, without calling any model."""
from __future__ import annotations

from types import SimpleNamespace

from ingress.readiness import ServeReadiness, describe
from tests.unit.test_api import make_app, raw_client, run


def state(status, running=1, message=""):
    return SimpleNamespace(status=SimpleNamespace(value=status), replica_states={"RUNNING": running},
                           message=message)


def test_describe_marks_serving_states_healthy():
    assert describe(state("HEALTHY"))["healthy"] and describe(state("UPSCALING"))["healthy"]
    assert not describe(state("UNHEALTHY", 0, "replica died"))["healthy"]
    assert describe(state("UPDATING", 1))["healthy"] and not describe(state("UPDATING", 0))["healthy"]   # roll vs. first start
    assert describe(state("DEPLOY_FAILED", 0, "x" * 900))["message"] == "x" * 500
    assert describe(None) == {"healthy": False, "status": "NOT_DEPLOYED", "running_replicas": 0}


def test_ready_is_503_with_per_model_detail_until_every_model_is_healthy():
    states = {"a": describe(state("HEALTHY")), "b": describe(state("UPDATING", 0))}

    async def readiness():
        return states

    async def go():
        async with raw_client(make_app(readiness=readiness)) as h:
            first = await h.get("/ready")
            states["b"] = describe(state("HEALTHY"))
            return first, await h.get("/ready"), await h.get("/health")
    first, second, health = run(go())
    assert first.status_code == 503 and first.headers["retry-after"]
    assert first.json()["models"]["b"] == {"healthy": False, "status": "UPDATING", "running_replicas": 0}
    assert second.status_code == 200 and second.json()["status"] == "ready"
    assert health.status_code == 200


def test_readiness_asks_serve_once_per_ttl_however_many_probes():
    calls = []
    r = ServeReadiness({"m": (None, "chat:m")}, ttl_s=60)
    r._ask_serve = lambda: calls.append(1) or {"m": describe(state("HEALTHY"))}

    async def go():
        import asyncio
        return await asyncio.gather(*(r() for _ in range(20)))
    out = run(go())
    assert len(calls) == 1 and all(o["m"]["healthy"] for o in out)


def test_each_model_is_looked_up_in_its_own_application_or_the_hubs():
    apps = {"hub": SimpleNamespace(deployments={"chat:a": state("HEALTHY"), "chat:b": state("HEALTHY")}),
            "b-app": SimpleNamespace(deployments={"chat:b": state("UPDATING", 0)})}
    r = ServeReadiness({"a": (None, "chat:a"), "b": ("b-app", "chat:b"), "c": ("c-app", "chat:c")})
    out = r.describe_all(apps, own_app="hub")
    assert out["a"]["healthy"] and out["b"]["status"] == "UPDATING"   # b's deployment in the hub is not b
    assert out["c"] == {"healthy": False, "status": "NOT_DEPLOYED", "running_replicas": 0,
                        "message": "Serve application 'c-app' is not deployed"}
