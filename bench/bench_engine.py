"""The LLM engine in-process, without Ray or HTTP, against HF `generate` as a static batch.

For GPU machines, where no weights can travel: the model is built from a config with random
weights, so outputs are noise but every step costs what the real model's does. No EOS is
configured, so every request runs to --tokens, as in the static batch.

    python bench/bench_engine.py --arch smollm2-135m --device cpu --levels 1,8 --seconds 5
    python bench/bench_engine.py --arch llama-1b --device cuda --levels 1,8,32,128 --budgets 64,2048,2048:separate

Closed loop: `c` requests are in flight; when one finishes, a new one is added before the next
step. Prints, per concurrency and engine variant: static tok/s, engine tok/s, their ratio, TTFT p50
(from being added to the engine to the first token) and the mean step time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

ARCHS = {
    # SmolLM2-135M-Instruct's shape
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    # Llama-3.2-1B's shape
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3.1-8B's shape
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0),
}


class NumberTokenizer:
    """Stands in for a tokenizer: every id decodes to a short word; there is no EOS."""

    eos_token_id = None
    pad_token_id = 0

    def __init__(self, vocab: int):
        self._vocab = vocab

    def __len__(self) -> int:
        return self._vocab

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(f" w{i}" for i in ids)


def build(arch: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**ARCHS[arch], eos_token_id=None, bos_token_id=None, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g).tolist()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def static_batch(model, batch: int, prompt_len: int, tokens: int, device: str, runs: int) -> float:
    """tok/s of HF generate on one batch of equal-length prompts (greedy), best of `runs`."""
    ids = torch.tensor(prompts(batch, prompt_len, model.config.vocab_size, 1), device=device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
              do_sample=False, pad_token_id=0)
    model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})   # warm-up
    best = 0.0
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        sync(device)
        assert out.shape[1] - ids.shape[1] == tokens
        best = max(best, batch * tokens / (time.perf_counter() - t))
    return best


def engine_run(model, concurrency: int, prompt_len: int, tokens: int, seconds: float, mixed: bool,
               budget: int, profile: bool = False, kv_cache: str = "padded") -> dict:
    """Warms up until `concurrency` requests have finished (or 3x seconds), then measures `seconds`.
    TTFT counts only requests added inside the measured window."""
    from deployments.llm.engine import LLMEngine
    from deployments.llm.request import EngineRequest
    from deployments.types import SamplingParams
    engine = LLMEngine(model, NumberTokenizer(model.config.vocab_size), max_model_len=prompt_len + tokens + 8,
                       max_num_seqs=max(concurrency, 1), max_num_batched_tokens=1 << 20, mixed_steps=mixed,
                       max_prefill_tokens=budget, kv_cache=kv_cache)
    pool = prompts(4096, prompt_len, model.config.vocab_size, 2)
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    counter = iter(range(1 << 30))
    inflight: dict = {}

    def new():
        i = next(counter)
        r = EngineRequest(f"r{i}", [pool[i % len(pool)]], params, [tokens])
        engine.add(r)
        inflight[r] = time.perf_counter()

    forward_s = [0.0]
    inner = model.forward

    def timed_forward(*a, **kw):
        sync(str(engine.device))
        t = time.perf_counter()
        out = inner(*a, **kw)
        sync(str(engine.device))
        forward_s[0] += time.perf_counter() - t
        return out

    model.forward = timed_forward
    for _ in range(concurrency):
        new()
    ttfts, steps, generated, finished, seen_first = [], [], 0, 0, set()
    begin = time.perf_counter()
    start = None
    profiler = None
    while True:
        if profile and start is not None and profiler is None:
            profiler = torch.profiler.profile(activities=_activities(str(engine.device)))
            profiler.__enter__()
            profiled = 0
        t0 = time.perf_counter()
        out = engine.step()
        t1 = time.perf_counter()
        for req, chunk in out:
            if start is not None:
                generated += sum(1 for d in chunk.choices if d.text)
            if req.request_id not in seen_first:
                seen_first.add(req.request_id)
                if start is not None and inflight[req] >= start:
                    ttfts.append(t1 - inflight[req])
            if chunk.usage is not None:
                del inflight[req]
                finished += 1
                new()
        if start is not None:
            steps.append(t1 - t0)
            if profiler is not None:
                profiled += 1
                if profiled == 20:
                    profiler.__exit__(None, None, None)
                    key = "self_cuda_time_total" if str(engine.device).startswith("cuda") else "self_cpu_time_total"
                    print(profiler.key_averages().table(sort_by=key, row_limit=25), flush=True)
                    break
            if t1 - start >= seconds:
                break
        elif finished >= concurrency or t1 - begin >= 3 * seconds:
            start = t1
            forward_s[0] = 0.0
    del model.forward
    return {"tok_s": generated / (t1 - start), "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
            "step_ms": 1000 * statistics.fmean(steps), "forward_ms": 1000 * forward_s[0] / len(steps)}


def _activities(device: str):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="smollm2-135m", choices=sorted(ARCHS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--static-runs", type=int, default=2)
    ap.add_argument("--budgets", default="auto",
                    help="comma-separated max_prefill_tokens variants, each optionally ':separate' "
                         "(mixed steps off) or ':slots' (engine.kv_cache slots); auto = the engine's "
                         "defaults for the device")
    ap.add_argument("--profile", type=int, default=0, help="after the table, profile 20 steps at this concurrency")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build(args.arch, args.device, dtype)
    from deployments.config import LLMEngineConfig
    from deployments.llm.factory import device_defaults
    variants = []
    for v in args.budgets.split(","):
        budget, _, mode = v.partition(":")
        if budget == "auto":
            n, mixed = device_defaults(LLMEngineConfig(), torch.device(args.device))
        else:
            n, mixed = int(budget), mode != "separate"
        kv = "slots" if mode == "slots" else "padded"
        variants.append((f"{n}{'' if mixed else ':separate'}{':slots' if kv == 'slots' else ''}", n, mixed, kv))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# {args.arch} random weights, {args.dtype}, {name}; prompt {args.prompt_tokens} tokens, "
          f"{args.tokens} out; torch {torch.__version__}", flush=True)
    print("| concurrency | static tok/s | engine variant (prefill budget) | engine tok/s | engine ÷ static "
          "| TTFT p50 ms | step mean ms | of which forward ms |")
    print("|---|---|---|---|---|---|---|---|")
    for c in (int(x) for x in args.levels.split(",")):
        static = static_batch(model, c, args.prompt_tokens, args.tokens, args.device, args.static_runs)
        for label, budget, mixed, kv in variants:
            ours = engine_run(model, c, args.prompt_tokens, args.tokens, args.seconds, mixed, budget, kv_cache=kv)
            print(f"| {c} | {static:.1f} | {label} | {ours['tok_s']:.1f} | {ours['tok_s'] / static:.2f} | "
                  f"{1000 * ours['ttft_p50']:.1f} | {ours['step_ms']:.1f} | {ours['forward_ms']:.1f} |", flush=True)
    if args.profile:
        c, (label, budget, mixed, kv) = args.profile, variants[0]
        print(f"\n# torch.profiler: 20 steps at concurrency {c}, variant {label}")
        engine_run(model, c, args.prompt_tokens, args.tokens, args.seconds, mixed, budget, profile=True, kv_cache=kv)


if __name__ == "__main__":
    main()
