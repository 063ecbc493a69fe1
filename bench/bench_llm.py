"""LLM serving benchmark: SmolLM2-135M through the full HTTP path vs HF `generate` static batches.

For each concurrency level, closed-loop clients stream greedy chat completions of exactly --tokens
output tokens (EOS banned with logit_bias) and we report aggregate output tok/s, TTFT p50/p99 and the
inter-token latency p50. The reference, in the same run, is HF `generate` on a static batch of the
same size in this process, also greedy (the practical limit of this stack). Prints a markdown table.

    .venv/bin/python bench/bench_llm.py [--levels 1,8,32,128] [--tokens 64] [--seconds 30]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import default_args, median, pct, print_table, start_app, stop_app  # noqa: E402

CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = ["Write a short story about a robot.", "Explain how rain forms.", "Describe the city of Paris.",
             "What makes a good friend?", "Tell me about the history of bread.", "How do airplanes fly?",
             "Write a poem about autumn.", "Why is the sky blue?"]


async def one_request(session, url, i, tokens, eos_id):
    body = {"model": CHAT, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "logit_bias": {str(eos_id): -100},
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    usage = 0
    async with session.post(url + "/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    itl = (last - first) / max(1, usage - 1) if first and usage > 1 else None
    return first - start, itl, usage


async def run_level(url, concurrency, tokens, seconds, eos_id):
    ttfts, itls, total, errors = [], [], 0, 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def client(k):
            nonlocal total, errors
            i = k
            while time.perf_counter() < deadline:
                try:
                    ttft, itl, n = await one_request(session, url, i, tokens, eos_id)
                except Exception as exc:  # counted, reported
                    errors += 1
                    print("error:", exc, file=sys.stderr)
                    continue
                ttfts.append(ttft)
                if itl is not None:
                    itls.append(itl)
                total += n
                i += concurrency
        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"tok_s": total / elapsed, "ttft_p50": median(ttfts), "ttft_p99": pct(ttfts, 99),
            "itl_p50": median(itls), "requests": len(ttfts), "errors": errors}


def static_batch_reference(batch_sizes, tokens):
    """HF generate on a static batch: output tok/s, in this process, before the server starts."""
    import torch

    from deployments.config import LLMEngineConfig
    from deployments.llm.loader import load_causal_lm
    args = default_args()
    chat = next(m for m in args["models"] if m["kind"] == "chat")
    model, tok = load_causal_lm(chat["source"], LLMEngineConfig(), torch.device("cpu"), torch.float32)
    tok.padding_side = "left"
    out = {}
    for b in batch_sizes:
        texts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                         add_generation_prompt=True, tokenize=False) for i in range(b)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=4, do_sample=False)   # warm-up
            t = time.perf_counter()
            model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tok.eos_token_id)
            out[b] = b * tokens / (time.perf_counter() - t)
        print(f"reference: static batch {b}: {out[b]:.1f} tok/s", flush=True)
    del model
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="1,8,32,128")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--url", default=None, help="benchmark an already running server instead of starting one")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=32)
    opts = p.parse_args()
    levels = [int(x) for x in opts.levels.split(",")]
    ref = {} if opts.no_reference else static_batch_reference([lv for lv in levels if lv <= 32], opts.tokens)
    url = opts.url
    if url is None:
        args = default_args()
        args["models"] = [m for m in args["models"] if m["kind"] == "chat"]
        args["models"][0].setdefault("engine", {})["max_num_seqs"] = opts.max_num_seqs
        url = start_app(args)
    try:
        asyncio.run(run_level(url, 2, 8, 5, 2))   # warm-up
        rows = []
        results = {}
        for c in levels:
            r = run_level_sync(url, c, opts.tokens, opts.seconds)
            results[c] = r
            ratio = r["tok_s"] / ref[c] if c in ref else float("nan")
            rows.append([c, r["tok_s"], ref.get(c, float("nan")), ratio, r["ttft_p50"], r["ttft_p99"],
                         r["itl_p50"] * 1000, r["requests"], r["errors"]])
            print(f"concurrency {c}: {r}", flush=True)
        print()
        print_table(["concurrency", "tok/s (HTTP)", "static tok/s", "ratio", "TTFT p50 s", "TTFT p99 s",
                     "ITL p50 ms", "requests", "errors"], rows)
        if 1 in results and 32 in results:
            print(f"\nTTFT p50 at 32 / at 1: {results[32]['ttft_p50'] / results[1]['ttft_p50']:.2f}x")
        if 32 in results and 128 in results:
            print(f"tok/s at 128 / at 32: {results[128]['tok_s'] / results[32]['tok_s']:.2f}x")
    finally:
        if opts.url is None:
            stop_app()


def run_level_sync(url, c, tokens, seconds):
    return asyncio.run(run_level(url, c, tokens, seconds, 2))


if __name__ == "__main__":
    main()
