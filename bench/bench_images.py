"""Images benchmark: tiny-random-sd through the full HTTP path (Ray Serve, aiohttp, b64_json) vs the
same pipeline called in this process, in the same run.

One app serves the image model twice, with batching on (max_batch_size 4) and off (1), so nothing
restarts between the two and every comparison is interleaved (this machine drifts by ±20% within
minutes). Concurrency 1: a direct ImagePipeline.generate call and an HTTP request take turns; we
report median seconds per image and the median per-pair ratio direct / HTTP. Concurrency 4:
closed-loop clients, rounds alternating between the batching-on and -off deployments; median
images/s of each. Prints markdown tables.

    .venv/bin/python bench/bench_images.py [--direct-ingress] [--size 64] [--steps 4] [--requests 20]
        [--seconds 4] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import default_args, median, print_table, start_app, stop_app  # noqa: E402

ON, OFF = "tiny-random-sd", "tiny-random-sd-unbatched"


def image_args(size: int, steps: int) -> dict:
    """serve_config.yaml's application with only its image model, at one size and step count, served
    twice: batching on (max_batch_size 4, model ON) and off (1, model OFF)."""
    args = default_args()
    base = next(m for m in args["models"] if m["kind"] == "image")
    base["engine"].update(sizes=[f"{size}x{size}"], default_steps=steps)
    on = {**base, "id": ON, "engine": {**base["engine"], "max_batch_size": 4}}
    off = {**base, "id": OFF, "engine": {**base["engine"], "max_batch_size": 1}}
    args["models"] = [on, off]
    return args


def load_direct(args: dict):
    """ImagePipeline.generate for one image, in this process: returns a function timing one call."""
    from deployments.config import ImageModelConfig
    from deployments.images.jobs import ImageJob
    from deployments.images.pipeline import ImagePipeline
    cfg = ImageModelConfig.model_validate(args["models"][0])
    pipeline = ImagePipeline.load(cfg.source, cfg.engine)
    width, height = (int(x) for x in cfg.engine.sizes[0].split("x"))

    def one(i: int) -> float:
        job = ImageJob(f"a red fox {i}", 1, width, height, cfg.engine.default_steps, cfg.engine.guidance_scale)
        start = time.perf_counter()
        pipeline.generate([job])
        return time.perf_counter() - start

    for i in range(3):   # warm-up
        one(i)
    return one


async def one_image(session: aiohttp.ClientSession, url: str, model: str, i: int) -> float:
    body = {"model": model, "prompt": f"a red fox {i}", "response_format": "b64_json"}
    start = time.perf_counter()
    async with session.post(url + "/images/generations", json=body) as resp:
        data = await resp.json()
        if resp.status != 200 or len(data["data"]) != 1:
            raise RuntimeError(f"HTTP {resp.status}: {data}")
    return time.perf_counter() - start


async def paired(url: str, model: str, direct, requests: int) -> list[float]:
    """Concurrency 1, the direct call and the HTTP request taking turns. Returns the medians: direct
    s/image, HTTP s/image, per-pair ratio direct / HTTP."""
    pairs = []
    async with aiohttp.ClientSession() as session:
        for i in range(3):   # warm-up
            await one_image(session, url, model, i)
        for i in range(requests):
            d = direct(i)
            h = await one_image(session, url, model, i)
            pairs.append((d, h))
    return [median([d for d, _ in pairs]), median([h for _, h in pairs]), median([d / h for d, h in pairs])]


async def alternating_rates(url: str, concurrency: int, seconds: float, rounds: int) -> dict[str, float]:
    """Closed-loop clients, one image per request, rounds alternating ON / OFF; median images/s each."""
    rates: dict[str, list[float]] = {ON: [], OFF: []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client(model: str, deadline: float) -> int:
            done = 0
            while time.perf_counter() < deadline:
                await one_image(session, url, model, done)
                done += 1
            return done

        for model in (ON, OFF):   # warm-up
            await asyncio.gather(*(one_image(session, url, model, k) for k in range(concurrency)))
        for _ in range(rounds):
            for model in (ON, OFF):
                start = time.perf_counter()
                counts = await asyncio.gather(*(client(model, start + seconds) for _ in range(concurrency)))
                rates[model].append(sum(counts) / (time.perf_counter() - start))
    return {m: median(r) for m, r in rates.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--requests", type=int, default=20, help="request pairs at concurrency 1")
    p.add_argument("--seconds", type=float, default=4, help="length of one round at concurrency 4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on both paths (Ray gives a 0.25-CPU replica OMP_NUM_THREADS=1)")
    p.add_argument("--direct-ingress", action="store_true", help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1")
    opts = p.parse_args()
    import torch
    torch.set_num_threads(opts.threads)
    args = image_args(opts.size, opts.steps)
    direct = load_direct(args)
    url = start_app(args, direct_ingress=opts.direct_ingress, env={"OMP_NUM_THREADS": str(opts.threads)})
    try:
        c1 = {m: asyncio.run(paired(url, m, direct, opts.requests)) for m in (ON, OFF)}
        rates = asyncio.run(alternating_rates(url, 4, opts.seconds, opts.rounds))
    finally:
        stop_app()
    print(f"\n{opts.size}x{opts.size}, {opts.steps} steps, {opts.threads} torch thread(s), direct ingress "
          f"{'on' if opts.direct_ingress else 'off'}; medians\n")
    print_table(["concurrency 1 (direct and HTTP take turns)", "direct s/image", "HTTP s/image",
                 "ratio direct/HTTP (median of pairs)"],
                [["batching on (max_batch_size 4)", *c1[ON]], ["batching off (max_batch_size 1)", *c1[OFF]]])
    print()
    print_table(["concurrency 4 (rounds alternate)", "images/s (HTTP)"],
                [["batching on (max_batch_size 4)", rates[ON]], ["batching off (max_batch_size 1)", rates[OFF]],
                 ["on / off", rates[ON] / rates[OFF]]])


if __name__ == "__main__":
    main()
