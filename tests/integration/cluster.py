"""A local multi-node Ray cluster for tests: `ray start --head` plus a second `ray start --address=...`,
each node with its own temp dir, ports and custom resource, and the application deployed with
`serve deploy` through the head's dashboard REST API, as on a real cluster. Stopping kills only the
processes of this cluster (found by its private temp dir), never other Ray sessions on the machine."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Callable, Optional

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_env() -> dict[str, str]:
    """Environment that puts Ray's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1) on the Serve port instead
    of Serve's Python proxy. HAProxy's own ports default to fixed numbers (9101, 8404): free ones, so two
    clusters (or two CI runs) on one machine do not collide. Its files are per node already
    (/tmp/haproxy-serve/<node id>/)."""
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 1.0) -> Any:
    """Polls `check` until it returns something truthy; fails naming `what` after `timeout_s`."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as exc:   # noqa: BLE001 - a cluster still starting answers with errors
            last = exc
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s (last error: {last!r})")


class LocalCluster:
    """Two Ray nodes on this machine. `nodes` maps a node name to its custom resource; each node
    offers `cpus` CPUs (declared, so several nodes can share the machine's cores)."""

    def __init__(self, nodes: tuple[str, ...] = ("head", "worker"), cpus: int = 2, haproxy: bool = False):
        """haproxy: Ray's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1) serves the Serve port instead of
        Serve's Python proxy, forwarding to the ingress replicas' own HTTP ports (direct ingress)."""
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="mh-", dir="/tmp"))   # short: unix socket paths
        self.names, self.cpus = nodes, cpus
        self.gcs_port, self.dashboard_port, self.serve_port = free_port(), free_port(), free_port()
        # Ray token auth off on this throwaway localhost cluster (a head would otherwise turn it on when
        # ~/.ray/auth_token exists, and a worker started without the token could not join).
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)
        for key in [k for k in self.env if k.startswith("RAY_SERVE_")]:
            del self.env[key]   # e.g. the direct-ingress ports the suite's own Ray session set in os.environ
        self.env["RAY_worker_niceness"] = "0"   # as in conftest.py: replicas at the driver's priority
        if haproxy:
            first = free_port()
            self.env.update({
                **haproxy_env(),
                # the ingress replicas' own ports, which HAProxy forwards to
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first + 8)})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    def start(self) -> "LocalCluster":
        head, *workers = self.names
        self._ray_start(head, "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}")
        for name in workers:
            self._ray_start(name, f"--address={self.address}")
        wait_for(lambda: len(self.nodes()) == len(self.names), 120, "all nodes alive")
        return self

    def _ray_start(self, name: str, *args: str) -> None:
        done = subprocess.run(
            [str(BIN / "ray"), "start", *args, f"--temp-dir={self.root / name}", f"--num-cpus={self.cpus}",
             "--num-gpus=0", f"--resources={json.dumps({name: 100})}", "--node-ip-address=127.0.0.1",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"],
            env=self.env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"ray start for node {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")

    def stop(self) -> None:
        """Kills every process whose command line names this cluster's temp dir (raylets, GCS, agents,
        dashboard) and their children (workers), then removes the dir. Runs on failure too (the fixture's finally)."""
        import psutil
        mine = {p for p in psutil.process_iter(["cmdline"]) if str(self.root) in " ".join(p.info["cmdline"] or [])}
        for p in list(mine):   # workers retitle themselves (ray::...): found as the raylets' children
            try:
                mine.update(p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        for p in mine:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(mine, timeout=30)
        keep = os.environ.get("MODELHUB_KEEP_CLUSTER_LOGS")   # a folder to copy the nodes' logs to, for post-mortems
        if keep:
            for name in self.names:
                subprocess.run(["cp", "-r", str(self.root / name / "session_latest" / "logs"),
                                f"{keep}/{self.root.name}-{name}"], check=False)
        subprocess.run(["rm", "-rf", str(self.root)], check=False)

    # ------------------------------------------------------------------ what the cluster reports

    def nodes(self) -> dict[str, str]:
        """Alive nodes: our node name (its custom resource) -> Ray node id."""
        from ray.util.state import list_nodes
        out = {}
        for n in list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], detail=True):
            name = next((k for k in n.resources_total if k in self.names), None)
            if name:
                out[name] = n.node_id
        return out

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.dashboard + path, timeout=30) as r:
            return json.loads(r.read())

    def serve_details(self) -> dict[str, Any]:
        """Serve's view (the same as serve.status(), with replicas): GET /api/serve/applications/."""
        return self.get("/api/serve/applications/")

    def replicas(self, app: str, deployment: str, state: Optional[str] = "RUNNING") -> list[dict[str, Any]]:
        apps = self.serve_details().get("applications", {})
        dep = apps.get(app, {}).get("deployments", {}).get(deployment, {})
        return [r for r in dep.get("replicas", []) if state is None or r["state"] == state]

    def deploy(self, config: dict[str, Any]) -> None:
        """`serve deploy` of a whole Serve config through the dashboard's REST API."""
        path = self.root / f"serve-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(config))
        subprocess.run([str(BIN / "serve"), "deploy", str(path), "-a", self.dashboard],
                       env=self.env, check=True, capture_output=True, timeout=120)

    def app_status(self, app: str) -> str:
        return self.serve_details().get("applications", {}).get(app, {}).get("status", "NOT_STARTED")

    def wait_running(self, *apps: str, timeout_s: float = 600) -> None:
        def running():
            states = {a: self.app_status(a) for a in apps}
            failed = {a: s for a, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
            if failed:
                raise AssertionError(f"applications failed: {failed}: {self.serve_details()}")
            return all(s == "RUNNING" for s in states.values())
        wait_for(running, timeout_s, f"applications {apps} RUNNING", poll_s=2)
