"""LLM serving benchmark: SmolLM2-135M through the full HTTP path vs HF `generate` static batches.

For each concurrency level, closed-loop clients stream greedy chat completions of exactly --tokens
output tokens (EOS banned with logit_bias) and we report aggregate output tok/s, TTFT p50/p99 and the
inter-token latency p50. The reference, in the same run, is HF `generate` on a static batch of the
same size in this process, also greedy (the practical limit of this stack). Prints a markdown table.

    .venv/bin/python bench/bench_llm.py [--levels 1,8,32,128] [--tokens 64] [--seconds 30]

--compare 64,64:separate,512 serves the model once per engine variant in one app (max_prefill_tokens,
":separate" for mixed_steps off, ":cpsN" for max_chunks_per_s N, ":plain" for prepack_weights off,
":nolate" for late_admission off, ":nobi" for batch_invariant off, ":slots" for kv_cache slots)
and, at each level, runs them in turns (--rounds, order alternating) with the static reference
measured before and after: this machine drifts by ±20-40% within minutes, so only same-run ratios
count.

--peer starts Hugging Face `transformers serve --continuous-batching` (the peer named in issue #3)
on the same weights (bf16, CPU) beside our app, and runs it in the same turns.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import default_args, free_port, median, pct, print_table, start_app, stop_app  # noqa: E402

CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = ["Write a short story about a robot.", "Explain how rain forms.", "Describe the city of Paris.",
             "What makes a good friend?", "Tell me about the history of bread.", "How do airplanes fly?",
             "Write a poem about autumn.", "Why is the sky blue?"]


async def one_request(session, url, i, tokens, eos_id, model=CHAT):
    # the bias is a float: transformers serve answers 500 to an integer one
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "logit_bias": {str(eos_id): -100.0},
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
    return start, first, last, itl, usage


async def run_level(url, concurrency, tokens, seconds, eos_id, warmup=0.0, model=CHAT):
    """Closed loop for `seconds` after `warmup`. Throughput counts the tokens received inside the
    measured window (each request's tokens spread evenly between its first and last token); latency
    stats count requests started inside it, finished or not by its end (warm-up requests see every
    client arrive at once)."""
    ttfts, itls, total, errors = [], [], 0.0, 0
    begin = time.perf_counter()
    measure_from = begin + warmup
    deadline = begin + warmup + seconds
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def client(k):
            nonlocal total, errors
            i = k
            while time.perf_counter() < deadline:
                try:
                    started, first, last, itl, n = await one_request(session, url, i, tokens, eos_id, model)
                except Exception as exc:  # counted, reported
                    errors += 1
                    print("error:", exc, file=sys.stderr)
                    continue
                i += concurrency
                total += _tokens_inside(first, last, n, measure_from, deadline)
                if started < measure_from:
                    continue
                ttfts.append(first - started)
                if itl is not None:
                    itls.append(itl)
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        elapsed = deadline - measure_from
    return {"tok_s": total / elapsed, "ttft_p50": median(ttfts), "ttft_p99": pct(ttfts, 99),
            "itl_p50": median(itls), "requests": len(ttfts), "errors": errors}


async def run_window(url, concurrency, tokens, eos_id, model=CHAT):
    """One burst: `concurrency` streams start together; throughput counts only the window in which all
    of them are mid-stream (from the last first token to the first last token), so it is the decode
    steady state at that batch, without the ramp-up and tail of a closed loop."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        done = await asyncio.gather(*(one_request(session, url, k, tokens, eos_id, model)
                                      for k in range(concurrency)), return_exceptions=True)
    ok = [d for d in done if not isinstance(d, BaseException) and d[1] is not None]
    errors = len(done) - len(ok)
    lo, hi = max(d[1] for d in ok), min(d[2] for d in ok)
    window = hi - lo
    inside = sum(_tokens_inside(first, last, n, lo, hi) for _, first, last, _, n in ok)
    ttfts = [first - started for started, first, *_ in ok]
    itls = [d[3] for d in ok if d[3] is not None]
    return {"tok_s": inside / window if window > 0 else float("nan"), "window_s": window,
            "ttft_p50": median(ttfts), "ttft_p99": pct(ttfts, 99), "itl_p50": median(itls),
            "requests": len(ok), "errors": errors}


def _tokens_inside(first: float, last: float, n: int, lo: float, hi: float) -> float:
    if n <= 1 or last <= first:
        return float(n) if lo <= last <= hi else 0.0
    overlap = max(0.0, min(last, hi) - max(first, lo))
    return n * overlap / (last - first)


class StaticReference:
    """HF `generate` on a static batch in this process: output tok/s for a batch size and dtype."""

    def __init__(self, dtypes: list[str]):
        import torch

        from deployments.config import LLMEngineConfig
        from deployments.llm.loader import load_causal_lm
        from deployments.torch_utils import pick_dtype
        chat = next(m for m in default_args()["models"] if m["kind"] == "chat")
        self.models = {}
        for name in dtypes:   # "auto+packed": HF generate on the weights our engine uses (prepack_weights)
            base, packed = name.removesuffix("+packed"), name.endswith("+packed")
            dtype = pick_dtype(base, torch.device("cpu"), cpu_bf16_if_native=True)
            model, self.tok = load_causal_lm(chat["source"], LLMEngineConfig(prepack_weights=packed),
                                             torch.device("cpu"), dtype)
            self.models[str(dtype).removeprefix("torch.") + ("+packed" if packed else "")] = model
        self.tok.padding_side = "left"

    def run(self, batch: int, tokens: int) -> dict[str, float]:
        import torch
        texts = [self.tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                              add_generation_prompt=True, tokenize=False) for i in range(batch)]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = {}
        for name, model in self.models.items():
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=self.tok.eos_token_id)
                t = time.perf_counter()
                model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                               pad_token_id=self.tok.eos_token_id)
                out[name] = batch * tokens / (time.perf_counter() - t)
            print(f"reference: static batch {batch} {name}: {out[name]:.1f} tok/s", flush=True)
        return out


def start_transformers_serve(source: str) -> tuple[str, str, subprocess.Popen]:
    """`transformers serve` on our cached safetensors copy of the model; returns (url, model, process)."""
    from deployments.llm.loader import cache_root, dequantized_copy
    from deployments.sources import resolve_source
    resolved = resolve_source(source)
    path = dequantized_copy(resolved, cache_root(None)) if resolved.kind == "gguf" else resolved.path
    port = free_port()
    cli = os.path.join(os.path.dirname(sys.executable), "transformers")
    proc = subprocess.Popen([cli, "serve", path, "--continuous-batching", "--device", "cpu", "--dtype", "bfloat16",
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"

    async def ready():
        async with aiohttp.ClientSession() as session:
            await one_request(session, url, 0, 4, 2, path)
    for _ in range(120):
        try:
            asyncio.run(ready())
            return url, path, proc
        except Exception:  # not up yet
            if proc.poll() is not None:
                raise RuntimeError("transformers serve exited") from None
            time.sleep(1)
    proc.kill()
    raise RuntimeError("transformers serve did not come up in 120 s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="1,8,32,128")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--url", default=None, help="benchmark an already running server instead of starting one")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--ref-dtypes", default="auto,float32",
                   help="dtypes of the static-batch reference ('auto' = what the server uses here; a "
                        "'+packed' suffix runs HF generate on prepacked weights, as our engine does)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--warmup", type=float, default=None, help="seconds per level not counted (default: seconds/3)")
    p.add_argument("--direct-ingress", action="store_true", help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1")
    p.add_argument("--stream-interval-ms", type=float, default=None)
    p.add_argument("--max-chunks-per-s", type=float, default=None)
    p.add_argument("--num-threads", type=int, default=None, help="torch threads of the LLM replica")
    p.add_argument("--max-prefill-tokens", type=int, default=None)
    p.add_argument("--compare", default=None,
                   help="engine variants served side by side and run in turns: comma-separated "
                        "max_prefill_tokens values, each optionally with ':separate', ':cpsN', ':plain', ':nolate', ':nobi' or ':slots'")
    p.add_argument("--rounds", type=int, default=2, help="turns per variant and level with --compare/--peer")
    p.add_argument("--peer", action="store_true", help="also run `transformers serve --continuous-batching`")
    p.add_argument("--window", action="store_true",
                   help="each turn is one burst of `level` streams; tok/s counts only the window in which all of "
                        "them are mid-stream (issue #18's steady state) instead of a closed loop for --seconds")
    opts = p.parse_args()
    levels = [int(x) for x in opts.levels.split(",")]
    reference = None if opts.no_reference else StaticReference(opts.ref_dtypes.split(","))
    compare = {}   # label -> (model id, engine overrides)
    for item in (opts.compare.split(",") if opts.compare else []):
        mpt, *modes = item.split(":")
        mixed = "separate" not in modes
        overrides = {"max_prefill_tokens": int(mpt), "mixed_steps": mixed}
        overrides.update({"max_chunks_per_s": float(m[3:]) for m in modes if m.startswith("cps")})
        if "plain" in modes:
            overrides["prepack_weights"] = False
        if "nolate" in modes:
            overrides["late_admission"] = False
        if "nobi" in modes:
            overrides["batch_invariant"] = False
        if "slots" in modes:
            overrides["kv_cache"] = "slots"
        label = f"mpt {mpt} {'mixed' if mixed else 'separate'}" + "".join(
            f" {m}" for m in modes if m.startswith("cps") or m in ("plain", "nolate", "nobi", "slots"))
        compare[label] = (f"{CHAT}@{item}", overrides)
    variants = {label: model for label, (model, _) in compare.items()} or {"ours" if opts.peer else "": CHAT}
    rounds = opts.rounds if compare or opts.peer or opts.window else 1
    url, engine = opts.url, {}
    if url is None:
        args = default_args()
        chat = next(m for m in args["models"] if m["kind"] == "chat")
        engine = chat.setdefault("engine", {})
        engine["max_num_seqs"] = opts.max_num_seqs
        for key in ("max_prefill_tokens", "num_threads", "stream_interval_ms", "max_chunks_per_s"):
            if getattr(opts, key) is not None:
                engine[key] = getattr(opts, key)
        args["models"] = [chat]
        if compare:   # one deployment per variant, sharing one CPU of Ray's accounting (only one runs at a time)
            args["models"] = [{**chat, "id": model, "engine": {**engine, **overrides},
                               "deployment": {"ray_actor_options": {"num_cpus": 1 / len(compare)}}}
                              for model, overrides in compare.values()]
        url = start_app(args, direct_ingress=opts.direct_ingress)
    urls = {label: url for label in variants}
    peer = None
    try:
        if opts.peer:
            chat_source = next(m for m in default_args()["models"] if m["kind"] == "chat")["source"]
            peer_url, peer_model, peer = start_transformers_serve(chat_source)
            variants["transformers serve"], urls["transformers serve"] = peer_model, peer_url
        for label, model in variants.items():
            asyncio.run(run_level(urls[label], 2, 8, 5, 2, model=model))   # warm-up
        rows, results = [], {}
        names = list(reference.models) if reference else []
        warmup = opts.seconds / 3 if opts.warmup is None else opts.warmup
        for c in levels:
            # the reference runs right before and after each level, so both see the same machine weather
            use_ref = reference is not None and c <= 32
            refs_before = reference.run(c, opts.tokens) if use_ref else {}
            runs: dict[str, list[dict]] = {label: [] for label in variants}
            for k in range(rounds):
                order = list(variants.items()) if k % 2 == 0 else list(variants.items())[::-1]
                for label, model in order:
                    r = asyncio.run(run_window(urls[label], c, opts.tokens, 2, model=model) if opts.window else
                                    run_level(urls[label], c, opts.tokens, opts.seconds, 2, warmup, model=model))
                    runs[label].append(r)
                    print(f"concurrency {c} {label}: {r}", flush=True)
            refs_after = reference.run(c, opts.tokens) if use_ref and rounds > 1 else refs_before
            ref = {n: (refs_before[n] + refs_after[n]) / 2 for n in refs_before}
            for label, rs in runs.items():
                r = {key: median([x[key] for x in rs]) for key in ("tok_s", "ttft_p50", "ttft_p99", "itl_p50")}
                r.update(requests=sum(x["requests"] for x in rs), errors=sum(x["errors"] for x in rs))
                results[(label, c)] = r
                refs = []
                for n in names:
                    refs += [ref.get(n, float("nan")), r["tok_s"] / ref[n] if n in ref else float("nan")]
                rows.append(([label] if len(variants) > 1 else []) + [c, r["tok_s"], *refs, r["ttft_p50"], r["ttft_p99"],
                                                           r["itl_p50"] * 1000, r["requests"], r["errors"]])
        print(f"\nHTTP path: direct ingress {'on' if opts.direct_ingress else 'off'}, stream_interval_ms "
              f"{opts.stream_interval_ms or 0}, max_chunks_per_s {engine.get('max_chunks_per_s', 'default') if opts.url is None else '?'}, "
              f"threads {engine.get('num_threads') if opts.url is None else '?'}; {opts.tokens} output tokens/request, "
              f"greedy, " + ("tok/s inside the window where every stream of a burst is mid-stream" if opts.window
                                  else "warm-up excluded") + (f"; median of {rounds} turns per variant, reference = mean of before and after"
                                              if rounds > 1 else ""))
        ref_cols = [h for n in names for h in (f"static {n} tok/s", f"ratio vs {n}")]
        print_table((["variant"] if len(variants) > 1 else []) + ["concurrency", "tok/s (HTTP)", *ref_cols, "TTFT p50 s",
                                                         "TTFT p99 s", "ITL p50 ms", "requests", "errors"], rows)
        for label in variants:
            name = f" ({label})" if label else ""
            if (label, 1) in results and (label, 32) in results:
                ratio = results[(label, 32)]["ttft_p50"] / results[(label, 1)]["ttft_p50"]
                print(f"TTFT p50 at 32 / at 1{name}: {ratio:.2f}x")
            if (label, 32) in results and (label, 128) in results:
                ratio = results[(label, 128)]["tok_s"] / results[(label, 32)]["tok_s"]
                print(f"tok/s at 128 / at 32{name}: {ratio:.2f}x")
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(30)
        if opts.url is None:
            stop_app()


if __name__ == "__main__":
    main()
