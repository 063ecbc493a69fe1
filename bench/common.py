"""Helpers shared by the benchmarks: start the app on Ray Serve, percentiles, table printing.

Load is generated with aiohttp (httpx itself collapses past ~32 connections on this machine).
"""
from __future__ import annotations

import pathlib
import statistics
from typing import Any

import yaml

from tests.integration.cluster import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROXY_URL: list[str] = []   # under direct_ingress, start_app() leaves Serve's proxy URL (/v1) here


def default_args() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]


def start_app(args: dict[str, Any], direct_ingress: bool = False, env: dict[str, str] | None = None,
              direct_ports: int = 1) -> str:
    """Starts Ray + Serve with `args`; returns the /v1 base URL.

    direct_ingress: RAY_SERVE_ENABLE_DIRECT_INGRESS=1, where the ingress replica serves HTTP itself
    (on a port from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT) and requests skip the proxy hop.
    env: environment variables for every Ray worker (e.g. OMP_NUM_THREADS).
    direct_ports: ports kept for ingress replicas under direct ingress (one per app a bench adds)."""
    import os

    import ray
    from ray import serve

    from ingress.app import build_app
    port, proxy_port = free_port(), free_port()
    os.environ.pop("RAY_SERVE_ENABLE_DIRECT_INGRESS", None)
    if direct_ingress:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + direct_ports)   # exclusive
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env} if env else None)
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port if direct_ingress else port})
    PROXY_URL[:] = [f"http://127.0.0.1:{proxy_port}/v1"] if direct_ingress else []
    serve.run(build_app(args), name="modelhub", route_prefix="/")
    return f"http://127.0.0.1:{port}/v1"


def direct_url(first_port_url: str, ports: int, prefix: str) -> str:
    """The direct-ingress URL of the app under `prefix`, among the `ports` ports start_app kept: each
    app's ingress replica takes its own, in no fixed order."""
    import urllib.request
    port = int(first_port_url.rsplit(":", 1)[1].split("/")[0])
    for candidate in range(port, port + ports):
        url = f"http://127.0.0.1:{candidate}{prefix}/v1"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{candidate}{prefix}/health", timeout=10) as r:
                if r.status == 200:
                    return url
        except OSError:
            continue
    raise RuntimeError(f"no direct-ingress port answers under {prefix}")


def stop_app() -> None:
    import ray
    from ray import serve
    serve.shutdown()
    ray.shutdown()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
