"""/ready's source of truth: each model deployment's state as Serve's controller reports it.

It asks the controller (one call for the whole app, cached for `ttl_s`), never the models
themselves, so probing /ready costs the models nothing. Never imports torch.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

_SERVING = {"HEALTHY", "UPSCALING", "DOWNSCALING"}   # Serve's deployment states that answer requests


class ServeReadiness:
    def __init__(self, deployments: dict[str, str], ttl_s: float = 2.0):
        """`deployments`: model id -> its Serve deployment name, in this replica's application."""
        self.deployments = deployments
        self.ttl_s = ttl_s
        self._cached: Optional[tuple[float, dict[str, dict[str, Any]]]] = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> dict[str, dict[str, Any]]:
        async with self._lock:   # one controller call at a time, however many probes arrive
            if self._cached is None or time.monotonic() - self._cached[0] > self.ttl_s:
                self._cached = (time.monotonic(), await asyncio.to_thread(self._ask_serve))
            return self._cached[1]

    def _ask_serve(self) -> dict[str, dict[str, Any]]:
        from ray import serve
        app_name = serve.get_replica_context().app_name
        app = serve.status().applications.get(app_name)
        states = app.deployments if app is not None else {}
        return {model: describe(states.get(name)) for model, name in self.deployments.items()}


def describe(state: Any) -> dict[str, Any]:
    """One deployment's readiness detail from its DeploymentStatusOverview (None: not deployed)."""
    if state is None:
        return {"healthy": False, "status": "NOT_DEPLOYED", "running_replicas": 0}
    status = getattr(state.status, "value", str(state.status))
    running = int(state.replica_states.get("RUNNING", 0))
    detail = {"healthy": status in _SERVING, "status": status, "running_replicas": running}
    if state.message:
        detail["message"] = state.message[:500]
    return detail
