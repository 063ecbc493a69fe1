"""Oversized bodies against the running app: how fast they are refused, and whether chat streams
running alongside slow down. Side by side in one run: the streams alone, then with an attacker
sending 50 MB bodies (with Content-Length, and chunked) in a loop.

    python bench/bench_robustness.py --direct-ingress
    python bench/bench_robustness.py --direct-ingress --bodies-per-s 0 --client-limit 2

--client-limit turns on ingress.client_limits (that many requests a second per client), trusting
X-Forwarded-For from loopback, and the attacker names itself in that header as a load balancer would:
its bodies are then refused with 429 before they are read, and the streams' clients are not limited.
The table also gives the ingress replica's CPU time in each mode: what the server spends, whichever
host the attacker runs on.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import sys
import threading
import time
import urllib.parse
from functools import lru_cache

import aiohttp

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from bench.common import default_args, median, pct, print_table, start_app, stop_app  # noqa: E402

CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
BODY_MB = 50


ATTACKER = "203.0.113.7"


def send_big_body(base: str, chunked: bool) -> float:
    """Sends a 50 MB embeddings body over a raw socket while reading; returns seconds to the refusal
    (413, or 429 under --client-limit)."""
    url = urllib.parse.urlparse(base)
    payload = _payload()
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(payload)
    began = time.perf_counter()
    with socket.create_connection((url.hostname, url.port), timeout=120) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-Forwarded-For: " + ATTACKER.encode() + b"\r\n" + framing + b"\r\n")
        writer = threading.Thread(target=_write_body, args=(sock, payload, chunked), daemon=True)
        writer.start()
        reply = sock.recv(65536)
    took = time.perf_counter() - began
    if not reply.startswith((b"HTTP/1.1 413", b"HTTP/1.1 429")):
        raise RuntimeError(f"expected a 413 or 429, got {reply[:100]!r}")
    return took


@lru_cache(maxsize=1)
def _payload() -> bytes:   # built once: allocating 50 MB per body would measure the attacker, not the server
    return b'{"model": "x", "input": "' + b"word " * (BODY_MB << 18) + b'"}'


def _write_body(sock: socket.socket, payload: bytes, chunked: bool) -> None:
    try:
        for i in range(0, len(payload), 1 << 20):
            piece = payload[i:i + (1 << 20)]
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
    except OSError:
        pass   # the server closed the connection after its 413: expected


async def streams(base: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    """Closed-loop chat streams for `seconds`, each client named by its own X-Forwarded-For (believed
    only under --client-limit); returns (tokens/s, per-request latencies). Any answer but a full
    stream fails the run."""
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 48,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    tokens, latencies = 0, []
    deadline = time.monotonic() + seconds

    async def client(session, i):
        nonlocal tokens
        while time.monotonic() < deadline:
            began = time.perf_counter()
            async with session.post(base + "/chat/completions", json=body,
                                    headers={"X-Forwarded-For": f"198.51.100.{i + 1}"}) as r:
                text = await r.text()
                if r.status != 200:
                    raise RuntimeError(f"a chat stream got {r.status}: {text[:200]}")
            latencies.append(time.perf_counter() - began)
            tokens += 48 if '"completion_tokens":48' in text else 0
    began = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        await asyncio.gather(*(client(s, i) for i in range(clients)))
    return tokens / (time.monotonic() - began), latencies


def attack(base: str, stop, chunked: bool, times, per_s: float) -> None:
    """The attacker's loop, in its own process so that it does not share the stream clients' GIL:
    `per_s` bodies a second, or back to back when 0 (a flood, which on this 2-core machine mostly
    measures the attacker's own sending, kernel copies included, beside the server)."""
    while not stop.is_set():
        began = time.monotonic()
        times.append(send_big_body(base, chunked))
        if per_s:
            stop.wait(max(0.0, 1 / per_s - (time.monotonic() - began)))


def ingress_process():
    """The ingress replica's process (Ray titles it `ray::ServeReplica:modelhub:Ingress`), to read its CPU time."""
    import psutil
    for proc in psutil.process_iter(["cmdline"]):
        if (proc.info["cmdline"] or [""])[0].startswith("ray::ServeReplica:modelhub:Ingress"):
            return proc
    raise RuntimeError("no ingress replica process found")


def cpu_s(proc) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--direct-ingress", action="store_true")
    p.add_argument("--bodies-per-s", type=float, default=2.0, help="the attacker's pace; 0: back to back")
    p.add_argument("--client-limit", type=float, default=None,
                   help="ingress.client_limits.requests_per_s (burst the same); default: no per-client limit")
    a = p.parse_args()
    args = default_args()
    if a.client_limit:
        args["ingress"]["client_limits"] = {"requests_per_s": a.client_limit, "burst": max(1, int(a.client_limit)),
                                            "trusted_proxies": ["127.0.0.0/8"]}
    base = start_app(args, direct_ingress=a.direct_ingress)
    try:
        asyncio.run(streams(base, a.clients, 5))   # warm up
        rows = []
        ingress = ingress_process()
        ctx = multiprocessing.get_context("spawn")   # not fork: this process runs a Ray driver
        manager = ctx.Manager()
        for r in range(a.rounds):   # the order alternates, so drift on the machine hits every mode alike
            modes = ("alone", "with Content-Length bodies", "with chunked bodies")
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                stop, refused = manager.Event(), manager.list()
                attacker = None
                if mode != "alone":
                    attacker = ctx.Process(target=attack, args=(base, stop, "chunked" in mode, refused,
                                                                a.bodies_per_s))
                    attacker.start()
                cpu_before = cpu_s(ingress)
                tps, lat = asyncio.run(streams(base, a.clients, a.seconds))
                stop.set()
                if attacker:
                    attacker.join()
                cpu = cpu_s(ingress) - cpu_before
                refused = list(refused)
                rows.append([mode, tps, median(lat), pct(lat, 99), len(refused),
                             median(refused) if refused else "-", max(refused) if refused else "-", cpu])
        rows.sort(key=lambda row: row[0])
        print_table(["chat streams", "tok/s", "latency p50 s", "p99 s", f"{BODY_MB} MB bodies refused",
                     "refusal p50 s", "refusal max s", "ingress CPU s"], rows)
        print(f"attacker pace: {a.bodies_per_s:g} bodies/s" if a.bodies_per_s else "attacker: back to back")
        print(f"per-client limit: {a.client_limit:g} requests/s" if a.client_limit else "no per-client limit")
        alone = median([row[1] for row in rows if row[0] == "alone"])
        alone_cpu = median([row[7] for row in rows if row[0] == "alone"])
        for mode in ("with Content-Length bodies", "with chunked bodies"):
            mine = [row for row in rows if row[0] == mode]
            tps = median([row[1] for row in mine])
            # the ingress's CPU beyond what serving the streams cost it (scaled to the tokens they got),
            # per body refused
            extra_ms = median([(row[7] - alone_cpu * row[1] / alone) / row[4] * 1000 for row in mine if row[4]])
            print(f"median tok/s {mode} / alone: {tps / alone:.3f}; "
                  f"ingress CPU per refused body, beyond the streams': {extra_ms:.2f} ms")
    finally:
        stop_app()


if __name__ == "__main__":
    main()
