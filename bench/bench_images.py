"""Images benchmark: tiny-random-sd through the full HTTP path (Ray Serve, aiohttp, b64_json) vs the
same pipeline called in this process, in the same run. Reports the median seconds per image at
concurrency 1 and their ratio (direct / HTTP), then images/s of closed-loop clients at concurrency 4
with batching on (max_batch_size 4) and off (1), the median of a few rounds. Prints markdown tables.

    .venv/bin/python bench/bench_images.py [--size 64] [--steps 4] [--requests 20] [--seconds 4] [--rounds 3]
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


def image_args(size: int, steps: int, max_batch_size: int) -> dict:
    """serve_config.yaml's application with only its image model, at one size and step count."""
    args = default_args()
    args["models"] = [m for m in args["models"] if m["kind"] == "image"]
    args["models"][0]["engine"].update(sizes=[f"{size}x{size}"], default_steps=steps, max_batch_size=max_batch_size)
    return args


def direct_seconds_per_image(args: dict, requests: int) -> float:
    """ImagePipeline.generate for one image at a time, in this process: the floor for the HTTP path."""
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
    return median([one(i) for i in range(requests)])


async def one_image(session: aiohttp.ClientSession, url: str, i: int) -> float:
    body = {"prompt": f"a red fox {i}", "response_format": "b64_json"}
    start = time.perf_counter()
    async with session.post(url + "/images/generations", json=body) as resp:
        data = await resp.json()
        if resp.status != 200 or len(data["data"]) != 1:
            raise RuntimeError(f"HTTP {resp.status}: {data}")
    return time.perf_counter() - start


async def http_seconds_per_image(url: str, requests: int) -> float:
    async with aiohttp.ClientSession() as session:
        for i in range(3):   # warm-up
            await one_image(session, url, i)
        return median([await one_image(session, url, i) for i in range(requests)])


async def images_per_second(url: str, concurrency: int, seconds: float, rounds: int) -> float:
    """Closed-loop clients, one image per request; the median of `rounds` rounds."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client(deadline: float) -> int:
            done = 0
            while time.perf_counter() < deadline:
                await one_image(session, url, done)
                done += 1
            return done

        await asyncio.gather(*(one_image(session, url, k) for k in range(concurrency)))   # warm-up
        rates = []
        for _ in range(rounds):
            start = time.perf_counter()
            counts = await asyncio.gather(*(client(start + seconds) for _ in range(concurrency)))
            rates.append(sum(counts) / (time.perf_counter() - start))
        return median(rates)


def redeploy(args: dict) -> None:
    from ray import serve

    from ingress.app import build_app
    serve.run(build_app(args), name="modelhub", route_prefix="/")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--requests", type=int, default=20, help="sequential requests at concurrency 1")
    p.add_argument("--seconds", type=float, default=4, help="length of one round at concurrency 4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on both paths (Ray gives a 0.25-CPU replica OMP_NUM_THREADS=1)")
    p.add_argument("--direct-ingress", action="store_true", help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1")
    opts = p.parse_args()
    import torch
    torch.set_num_threads(opts.threads)
    on, off = (image_args(opts.size, opts.steps, b) for b in (4, 1))
    direct = direct_seconds_per_image(on, opts.requests)
    url = start_app(on, direct_ingress=opts.direct_ingress, env={"OMP_NUM_THREADS": str(opts.threads)})
    try:
        http_on = asyncio.run(http_seconds_per_image(url, opts.requests))
        rate_on = asyncio.run(images_per_second(url, 4, opts.seconds, opts.rounds))
        if opts.direct_ingress:   # a redeployed ingress could not take the port its predecessor holds
            stop_app()
            url = start_app(off, direct_ingress=True, env={"OMP_NUM_THREADS": str(opts.threads)})
        else:
            redeploy(off)
        http_off = asyncio.run(http_seconds_per_image(url, opts.requests))
        rate_off = asyncio.run(images_per_second(url, 4, opts.seconds, opts.rounds))
    finally:
        stop_app()
    print(f"\n{opts.size}x{opts.size}, {opts.steps} steps, {opts.threads} torch thread(s), direct ingress "
          f"{'on' if opts.direct_ingress else 'off'}; medians\n")
    print_table(["concurrency 1", "direct s/image", "HTTP s/image", "ratio direct/HTTP"],
                [["batching on (max_batch_size 4)", direct, http_on, direct / http_on],
                 ["batching off (max_batch_size 1)", direct, http_off, direct / http_off]])
    print()
    print_table(["concurrency 4", "images/s (HTTP)"],
                [["batching on (max_batch_size 4)", rate_on], ["batching off (max_batch_size 1)", rate_off],
                 ["on / off", rate_on / rate_off]])


if __name__ == "__main__":
    main()
