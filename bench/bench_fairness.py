"""Per-client limits under a sustained flood: does one client's flood crowd out another?

The small chat deployment of tests/integration/test_faults.py (max_num_seqs 4, max_waiting 2,
max_queued_requests 2), in three apps side by side, reached through direct ingress:

- "no limit": API keys, no per-client limit.
- "tenant limit": the greedy tenant's key has `auth.limits.concurrent_requests`.
- "address limit": `ingress.client_limits.max_concurrent` per network address (X-Forwarded-For from
  loopback, a trusted proxy).

A greedy client keeps `--greedy` long streams outstanding (each 64 tokens, end of text banned),
sending the next one as soon as one ends or 0.1 s after a refusal (it ignores Retry-After). Under
"tenant limit" each of its streams comes from its own address, so only the tenant's limit applies;
elsewhere all come from one address. Meanwhile a polite tenant, from its own address, asks short
questions (8 tokens) one after another. Prints, per app and round, what the polite client got and
its latency against the same app unloaded, and the greedy client's throughput.

    python bench/bench_fairness.py --rounds 2 --seconds 30
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time

import aiohttp

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from bench.bench_overload import ASK, small_app  # noqa: E402
from bench.common import median, pct, print_table, start_app, stop_app  # noqa: E402

GREEDY, POLITE = "bench-greedy-key", "bench-polite-key"   # made-up keys of this benchmark's apps
NO_EOS = {"0": -100, "2": -100}   # SmolLM2's <|endoftext|> and <|im_end|>
LONG = {**ASK, "max_tokens": 64, "logit_bias": NO_EOS, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Tell me a long story."}]}
HELD = 2   # what either limit lets the greedy client hold at once
APPS = {"no limit": "", "tenant limit": "/tenant", "address limit": "/address"}


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def app_args(limit: str) -> dict:
    """bench_overload's small app, with API keys and the one limit `limit` names."""
    args = small_app()
    greedy = {"sha256": _sha(GREEDY), "subject": "greedy"}
    if limit == "tenant limit":
        greedy["limits"] = {"concurrent_requests": HELD}
    args["ingress"]["auth"] = {"keys": [greedy, {"sha256": _sha(POLITE), "subject": "polite"}]}
    if limit == "address limit":
        args["ingress"]["client_limits"] = {"max_concurrent": HELD, "trusted_proxies": ["127.0.0.0/8"]}
    return args


async def _polite_once(s: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    headers = {"Authorization": f"Bearer {POLITE}", "X-Forwarded-For": "198.51.100.200"}
    began = time.perf_counter()
    async with s.post(url + "/chat/completions", json=ASK, headers=headers) as r:
        await r.read()
        return r.status, time.perf_counter() - began


async def _greedy_worker(s: aiohttp.ClientSession, url: str, address: str, stop: float, got: dict) -> None:
    headers = {"Authorization": f"Bearer {GREEDY}", "X-Forwarded-For": address}
    while time.monotonic() < stop:
        async with s.post(url + "/chat/completions", json=LONG, headers=headers) as r:
            if r.status != 200:
                got[r.status] = got.get(r.status, 0) + 1
                await r.read()
                await asyncio.sleep(0.1)
                continue
            async for line in r.content:
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    got["tokens"] += int(line.split(b'"completion_tokens":')[1].split(b",")[0])
            got[200] = got.get(200, 0) + 1


async def run_mode(url: str, limit: str, greedy: int, seconds: float) -> dict:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300), connector=conn) as s:
        alone = [(await _polite_once(s, url))[1] for _ in range(8)]
        began = time.monotonic()
        stop = began + seconds
        got = {"tokens": 0}
        addresses = [f"203.0.113.{i + 1}" if limit == "tenant limit" else "203.0.113.1" for i in range(greedy)]
        workers = [asyncio.create_task(_greedy_worker(s, url, a, stop, got)) for a in addresses]
        await asyncio.sleep(2)   # the flood has taken what it can
        polite = []
        while time.monotonic() < stop:
            polite.append(await _polite_once(s, url))
            await asyncio.sleep(0.2)
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - began
        after = await _polite_once(s, url)
    served = [t for status, t in polite if status == 200]
    base = median(alone)
    return {"polite": len(polite), "ok": len(served), "refused": sum(st in (429, 503) for st, _ in polite),
            "other": sum(st not in (200, 429, 503) for st, _ in polite), "alone": base,
            "p50": median(served) / base, "p99": pct(served, 99) / base,
            "greedy_tok_s": got["tokens"] / elapsed, "greedy_ok": got.get(200, 0),
            "greedy_429": got.get(429, 0), "greedy_503": got.get(503, 0), "after": after[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--greedy", type=int, default=12, help="streams the greedy client keeps outstanding")
    a = p.parse_args()
    from ray import serve

    from ingress.app import build_app
    first = start_app(app_args("no limit"), direct_ingress=True, direct_ports=len(APPS))
    try:
        for limit, prefix in APPS.items():
            if prefix:
                serve.run(build_app(app_args(limit)), name=prefix.strip("/"), route_prefix=prefix)
        urls = {limit: common.direct_url(first, len(APPS), prefix) for limit, prefix in APPS.items()}
        rows, got = [], {k: [] for k in urls}
        for r in range(a.rounds):   # alternating order: drift on the machine hits every app alike
            for limit in (list(urls) if r % 2 == 0 else list(urls)[::-1]):
                m = asyncio.run(run_mode(urls[limit], limit, a.greedy, a.seconds))
                got[limit].append(m)
                rows.append([limit, r + 1, f"{m['ok']}/{m['polite']}", m["refused"], m["other"], m["alone"],
                             m["p50"], m["p99"], m["greedy_tok_s"], m["greedy_ok"], m["greedy_429"],
                             m["greedy_503"], m["after"]])
        rows.sort(key=lambda row: (list(APPS).index(row[0]), row[1]))
        print_table(["app", "round", "polite 200", "polite 429/503", "other", "polite alone p50 s",
                     "polite p50 / alone", "polite p99 / alone", "greedy tok/s", "greedy 200", "greedy 429",
                     "greedy 503", "after"], rows)
        for limit, ms in got.items():
            share = sum(m["ok"] for m in ms) / max(1, sum(m["polite"] for m in ms))
            print(f"{limit}: polite served {share:.0%}, median p50 / alone "
                  f"{median([m['p50'] for m in ms]):.2f}x, greedy {median([m['greedy_tok_s'] for m in ms]):.0f} tok/s")
    finally:
        stop_app()


if __name__ == "__main__":
    main()
