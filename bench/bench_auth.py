"""What auth and rate limiting cost: req/s at 64 clients on GET /v1/models and on single-sentence
embeddings, auth off against auth on (HS256 JWTs, 8 subjects, requests/tokens/concurrency limits
set high enough never to refuse), both apps side by side in one Ray session and measured in
alternating rounds, so drift on the machine hits both alike. aiohttp drives the load. Next to req/s
it reports the CPU time each app's ingress replica spent per request (from /proc), which other
load on the machine disturbs far less than req/s.

    .venv/bin/python bench/bench_auth.py [--clients 64] [--seconds 10] [--rounds 3] [--proxy]

By default each app is reached on its ingress replica's own port (Ray's direct ingress, as
`make serve` runs); --proxy goes through Serve's proxy instead.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import default_args, free_port, print_table  # noqa: E402

EMB = "sentence-transformers/all-MiniLM-L6-v2"
SECRET_ENV, SECRET = "MODELHUB_BENCH_JWT_SECRET", "bench-only-secret-0123456789abcdef"
SUBJECTS = 8
LIMITS = {"requests_per_minute": 600_000, "tokens_per_minute": 60_000_000, "concurrent_requests": 64}


def app_args(auth: bool) -> dict:
    args = default_args()
    args["models"] = [m for m in args["models"] if m["kind"] == "embedding"]
    ingress = args.setdefault("ingress", {})
    # both ingresses alike (the secret is set in both), so only the auth config differs
    ingress["deployment"] = {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": {SECRET_ENV: SECRET}}}}
    if auth:
        ingress["auth"] = {"jwt": {"algorithms": ["HS256"], "secret_env": SECRET_ENV}, "limits": LIMITS}
    return args


def tokens() -> list[str]:
    import jwt
    exp = int(time.time()) + 3600
    return [jwt.encode({"sub": f"tenant-{i}", "exp": exp}, SECRET, algorithm="HS256") for i in range(SUBJECTS)]


def start(direct: bool) -> dict[str, str]:
    """Ray + both apps; returns {"off": base URL, "on": base URL} (each ending in /v1)."""
    import ray
    from ray import serve

    from ingress.app import build_app
    port, proxy_port = free_port(), free_port()
    if direct:
        os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
                           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 4)})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
    serve.run(build_app(app_args(False)), name="off", route_prefix="/off")
    serve.run(build_app(app_args(True)), name="on", route_prefix="/on")
    if not direct:
        return {k: f"http://127.0.0.1:{proxy_port}/{k}/v1" for k in ("off", "on")}
    return asyncio.run(discover(range(port, port + 4)))


async def discover(ports) -> dict[str, str]:
    """Which direct-ingress port serves which app: without a credential, the auth app answers 401."""
    found = {}
    async with aiohttp.ClientSession() as http:
        for port in ports:
            for prefix in ("", "/off", "/on"):
                try:
                    async with http.get(f"http://127.0.0.1:{port}{prefix}/v1/models") as r:
                        status = r.status
                except aiohttp.ClientError:
                    continue
                if status in (200, 401):
                    found["off" if status == 200 else "on"] = f"http://127.0.0.1:{port}{prefix}/v1"
    if set(found) != {"off", "on"}:
        raise RuntimeError(f"could not find both apps on the direct-ingress ports: {found}")
    return found


def ingress_pids() -> dict[str, int]:
    """The ingress replica of each app, by Ray's process title `ray::ServeReplica:<app>:Ingress`."""
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        for mode in ("off", "on"):
            if title.startswith(f"ray::ServeReplica:{mode}:Ingress"):
                pids[mode] = int(entry)
    if set(pids) != {"off", "on"}:
        raise RuntimeError(f"ingress replicas not found by process title: {pids}")
    return pids


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, endpoint: str, clients: int, seconds: float, auth: list[str]) -> dict:
    done, errors = 0, 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def client(k):
            nonlocal done, errors
            headers = {"Authorization": f"Bearer {auth[k % len(auth)]}"} if auth else {}
            body = {"model": EMB, "input": f"The quick brown fox jumps over the lazy dog {k}.",
                    "encoding_format": "base64"}
            while time.perf_counter() < deadline:
                if endpoint == "models":
                    req = session.get(url + "/models", headers=headers)
                else:
                    req = session.post(url + "/embeddings", json=body, headers=headers)
                async with req as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1
                    else:
                        errors += 1
        began = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return {"req_s": done / (time.perf_counter() - began), "errors": errors}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--proxy", action="store_true", help="through Serve's proxy instead of direct ingress")
    opts = p.parse_args()
    urls = start(direct=not opts.proxy)
    pids = ingress_pids()
    creds = {"off": [], "on": tokens()}
    for mode in ("off", "on"):   # warm-up, then what each ingress burns with no requests at all
        asyncio.run(load(urls[mode], "models", 8, 2, creds[mode]))
    idle = {mode: cpu_seconds(pid) for mode, pid in pids.items()}
    time.sleep(10)
    idle = {mode: (cpu_seconds(pids[mode]) - idle[mode]) / 10 * 1000 for mode in pids}
    print(f"idle ingress CPU, ms per second: {idle}", flush=True)
    runs: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    errors = 0
    for endpoint in ("models", "embeddings"):
        for mode in ("off", "on"):   # warm-up: card caches, JWT caches, leases
            asyncio.run(load(urls[mode], endpoint, opts.clients, 3, creds[mode]))
        for r in range(opts.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for mode in order:
                began, cpu0 = time.perf_counter(), cpu_seconds(pids[mode])
                res = asyncio.run(load(urls[mode], endpoint, opts.clients, opts.seconds, creds[mode]))
                served = res["req_s"] * (time.perf_counter() - began)
                res["ingress_cpu_us"] = (cpu_seconds(pids[mode]) - cpu0) / served * 1e6
                runs.setdefault((endpoint, mode), []).append(res["req_s"])
                cpu.setdefault((endpoint, mode), []).append(res["ingress_cpu_us"])
                errors += res["errors"]
                print(f"{endpoint} auth {mode} round {r}: {res}", flush=True)
    rows = []
    for endpoint in ("models", "embeddings"):
        off, on = statistics.median(runs[endpoint, "off"]), statistics.median(runs[endpoint, "on"])
        cpu_off, cpu_on = statistics.median(cpu[endpoint, "off"]), statistics.median(cpu[endpoint, "on"])
        rows.append([endpoint, opts.clients, off, on, on / off, cpu_off, cpu_on, cpu_on / cpu_off,
                     " ".join(f"{x:.0f}" for x in runs[endpoint, "off"]),
                     " ".join(f"{x:.0f}" for x in runs[endpoint, "on"])])
    print(f"\n{'proxy' if opts.proxy else 'direct ingress'}, {opts.rounds} alternating rounds of {opts.seconds:g} s, "
          f"errors {errors}; idle ingress CPU off {idle['off']:.1f} ms/s, on {idle['on']:.1f} ms/s")
    print_table(["endpoint", "clients", "req/s off (median)", "req/s on (median)", "on ÷ off",
                 "ingress CPU µs/req off", "on", "on ÷ off", "req/s rounds off", "req/s rounds on"], rows)
    from ray import serve
    serve.shutdown()
    import ray
    ray.shutdown()


if __name__ == "__main__":
    main()
