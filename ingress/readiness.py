"""/ready's source of truth: each model deployment's state as Serve's controller reports it, in the
hub's own application or in the application a model is routed to (its config's `application`).

It asks the controller (one call for every application, cached for `ttl_s`), never the models
themselves, so probing /ready costs the models nothing. Never imports torch.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Optional

_SERVING = {"HEALTHY", "UPSCALING", "DOWNSCALING"}   # Serve's deployment states that answer requests


class ServeReadiness:
    def __init__(self, deployments: dict[str, tuple[Optional[str], str]], ttl_s: float = 2.0):
        """`deployments`: model id -> (its Serve application, None for this replica's own; its deployment name)."""
        self.deployments = deployments
        self.ttl_s = ttl_s
        self._cached: Optional[tuple[float, dict[str, dict[str, Any]]]] = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> dict[str, dict[str, Any]]:
        async with self._lock:   # one controller call at a time, however many probes arrive
            if self._cached is None or time.monotonic() - self._cached[0] > self.ttl_s:
                self._cached = (time.monotonic(), await asyncio.to_thread(self._ask_serve))
            return self._cached[1]

    def running_replicas(self, model_id: str) -> Callable[[], Awaitable[int]]:
        """A probe of one model's running replicas (for ColdStartGuard)."""
        async def probe() -> int:
            return int((await self()).get(model_id, {}).get("running_replicas", 0))
        return probe

    def _ask_serve(self) -> dict[str, dict[str, Any]]:
        from ray import serve
        return self.describe_all(serve.status().applications, serve.get_replica_context().app_name)

    def describe_all(self, applications: dict[str, Any], own_app: str) -> dict[str, dict[str, Any]]:
        """Each model's detail from Serve's {application name: ApplicationStatusOverview}."""
        out = {}
        for model, (app_name, name) in self.deployments.items():
            app = applications.get(app_name or own_app)
            out[model] = describe(app.deployments.get(name) if app is not None else None)
            if app is None and app_name is not None:
                out[model]["message"] = f"Serve application {app_name!r} is not deployed"
        return out


def describe(state: Any) -> dict[str, Any]:
    """One deployment's readiness detail from its DeploymentStatusOverview (None: not deployed)."""
    if state is None:
        return {"healthy": False, "status": "NOT_DEPLOYED", "running_replicas": 0}
    status = getattr(state.status, "value", str(state.status))
    running = int(state.replica_states.get("RUNNING", 0))
    serving = status in _SERVING or (status == "UPDATING" and running > 0)   # a rolling update: old replicas serve
    detail = {"healthy": serving, "status": status, "running_replicas": running}
    if state.message:
        detail["message"] = state.message[:500]
    return detail
