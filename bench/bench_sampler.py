"""The sampler's cost per step for each of its options, in-process (no model, no Ray).

Random logits over SmolLM2's vocabulary (49,152) for a batch of B rows; every row asks for the same
option. Each option's median time per sampler call is compared with plain sampling (temperature 1)
measured in the same rounds, interleaved, so the ratios hold on a noisy machine.

    python bench/bench_sampler.py --batches 1,32 --rounds 5 --calls 20 [--options "top_k 50,min_p 0.05"]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import print_table  # noqa: E402
from deployments.llm.sampler import Sampler  # noqa: E402
from deployments.llm.sequence import Sequence  # noqa: E402
from deployments.types import SamplingParams  # noqa: E402

VOCAB = 49152
OPTIONS = {   # what each row of the batch asks for (beside temperature 1)
    "plain": {},
    "top_p 0.9": {"top_p": 0.9},
    "top_k 50": {"top_k": 50},
    "min_p 0.05": {"min_p": 0.05},
    "repetition_penalty 1.1": {"repetition_penalty": 1.1},
    "min_tokens 100 (EOS held back)": {"min_tokens": 100},
    "presence + frequency penalty": {"presence_penalty": 0.5, "frequency_penalty": 0.5},
    "allowed_token_ids (1004 ids)": {"allowed_token_ids": list(range(0, VOCAB, 49))},
    "logit_bias (10 entries)": {"logit_bias": {i: 1.0 for i in range(10)}},
    "bad_words (16 two-token words)": {"bad_word_ids": [[i, i + 1] for i in range(100, 132, 2)]},
    "all of them": {"top_p": 0.9, "top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 100,
                    "presence_penalty": 0.5, "frequency_penalty": 0.5},
}


def rows(batch: int, params: dict, prompt_len: int, output_len: int) -> list[Sequence]:
    """Sequences as the engine holds them (no detokenizer or stop strings: the sampler reads neither).
    Their outputs do not grow between calls, so per-sequence state the sampler keeps up to date (the
    seen-token mask of repetition_penalty) is measured in its steady state, less one token's update."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        seq = Sequence("bench", 0, torch.randint(0, VOCAB, (prompt_len,), generator=g).tolist(),
                       SamplingParams(temperature=1.0, **params), max_tokens=10**6, detok=None, stop=None)
        seq.output_ids = torch.randint(0, VOCAB, (output_len,), generator=g).tolist()
        out.append(seq)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20, help="sampler calls per option per round")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--options", default="", help="comma-separated option names to run (default: all; plain always)")
    args = ap.parse_args()
    options = {name: p for name, p in OPTIONS.items()
               if not args.options or name == "plain" or name in args.options.split(",")}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    sampler = Sampler(VOCAB, torch.device("cpu"), eos_ids=[0, 2])
    table = []
    for batch in [int(b) for b in args.batches.split(",")]:
        logits = torch.randn(batch, VOCAB) * 3
        seqs = {name: rows(batch, p, args.prompt_len, args.output_len) for name, p in options.items()}
        times: dict[str, list[float]] = {name: [] for name in options}
        for _ in range(args.rounds):
            for name in options:   # interleaved: every option sees the same machine state
                start = time.perf_counter()
                for _ in range(args.calls):
                    sampler(logits, seqs[name])
                times[name].append((time.perf_counter() - start) / args.calls * 1000)
        plain = statistics.median(times["plain"])
        for name in options:
            ms = statistics.median(times[name])
            table.append([batch, name, f"{ms:.2f}", f"{ms / plain:.2f}x"])
    print_table(["batch", "every row asks for", "ms per call (median)", "vs plain"], table)


if __name__ == "__main__":
    main()
