"""Constrained decoding cost on the default model (SmolLM2-135M) in-process: no Ray, no HTTP.

At batch 8, the same decode steps are timed with 0, 4 and 8 rows under a forced tool-call grammar
(tool_choice "required" over three tools): the step time, the time spent filling and applying the
token masks and accepting tokens, and the overhead against an unconstrained batch. Also the time
to compile each tool schema's grammar, cold and again (cached by schema).

    python bench/bench_structured.py --rounds 3 --tokens 40
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from deployments.config import ChatModelConfig  # noqa: E402
from deployments.llm import sampler as sampler_module  # noqa: E402
from deployments.llm import engine as engine_module  # noqa: E402
from deployments.llm import structured  # noqa: E402
from deployments.llm.chat_template import render_chat  # noqa: E402
from deployments.llm.request import EngineRequest  # noqa: E402
from deployments.llm.factory import build_engine  # noqa: E402
from deployments.llm.tool_calls import FORMATS  # noqa: E402
from deployments.types import SamplingParams, ToolSpec  # noqa: E402
from tests.integration.test_structured import ASK, TOOLS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Timed:
    """Wraps the sampler's grammar mask and the matchers' accept step to add up their time."""

    def __init__(self):
        self.seconds = 0.0
        self._apply = structured.apply_grammars
        self._new_matcher = structured.new_matcher

    def apply(self, logits, seqs):
        t = time.perf_counter()
        self._apply(logits, seqs)
        self.seconds += time.perf_counter() - t

    def new_matcher(self, grammar):
        matcher = self._new_matcher(grammar)
        return None if matcher is None else _TimedMatcher(matcher, self)


class _TimedMatcher:
    def __init__(self, matcher, timed: _Timed):
        self._m, self._timed = matcher, timed

    def accept_token(self, token: int) -> bool:
        t = time.perf_counter()
        ok = self._m.accept_token(token)
        self._timed.seconds += time.perf_counter() - t
        return ok

    def __getattr__(self, name):
        return getattr(self._m, name)


def chat_config() -> ChatModelConfig:
    args = yaml.safe_load(open(os.path.join(ROOT, "serve_config.yaml")))["applications"][0]["args"]
    chat = next(m for m in args["models"] if m["kind"] == "chat")
    return ChatModelConfig.model_validate(chat)


def run_batch(engine, grammars, prompt: list[int], constrained: int, tokens: int, timed: _Timed):
    """Decode steps with all 8 rows alive: (step seconds, grammar seconds) per step."""
    spec = FORMATS["hermes"].structural_tag(ToolSpec(TOOLS, "required"))
    for i in range(8):
        req = EngineRequest(f"r{time.monotonic_ns()}-{i}", [prompt], SamplingParams(temperature=1.0, seed=i,
                                                                                       max_tokens=tokens), [tokens])
        if i < constrained:
            req.grammar, req.grammar_spec = grammars.compile(spec), spec
        engine.add(req)
    steps = []
    while engine.has_work():
        full = engine.num_running_seqs() == 8 and not engine.num_waiting_seqs()
        timed.seconds = 0.0
        t = time.perf_counter()
        engine.step()
        if full:
            steps.append((time.perf_counter() - t, timed.seconds))
    return steps


def compile_times(engine) -> list[tuple[str, float, float]]:
    out = []
    grammars = structured.Grammars.for_engine(engine)
    grammars.compile({"type": "json_object"})            # builds the tokenizer info first, outside the timings
    for tool in TOOLS:
        name = tool["function"]["name"]
        spec = FORMATS["hermes"].structural_tag(ToolSpec(TOOLS, name))
        t = time.perf_counter()
        grammars.compile(spec)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        grammars.compile(spec)
        out.append((name, cold, time.perf_counter() - t))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: serve_config.yaml's)")
    a = ap.parse_args()
    cfg = chat_config()
    if a.threads:
        cfg.engine.num_threads = a.threads
    loaded = build_engine(cfg, cfg.source)
    engine, tok = loaded.engine, loaded.tokenizer
    timed = _Timed()
    sampler_module.apply_grammars = timed.apply
    engine_module.new_matcher = timed.new_matcher
    print("| schema (named tool) | compile cold ms | compile again ms |\n|---|---|---|")
    for name, cold, warm in compile_times(engine):
        print(f"| {name} | {cold * 1e3:.1f} | {warm * 1e3:.3f} |")
    grammars = structured.Grammars.for_engine(engine)
    prompt = tok(render_chat(tok, ASK, ToolSpec(TOOLS, "required")), add_special_tokens=False)["input_ids"]
    results: dict[int, list] = {0: [], 4: [], 8: []}
    run_batch(engine, grammars, prompt, 8, 8, timed)      # warm-up
    for _ in range(a.rounds):
        for k in results:                                  # modes alternate, so machine drift hits all alike
            results[k] += run_batch(engine, grammars, prompt, k, a.tokens, timed)
    base = statistics.median(s for s, _ in results[0])
    print(f"\nbatch 8, prompt {len(prompt)} tokens, {a.rounds} rounds x {a.tokens} tokens\n")
    print("| constrained rows | steps | step ms (median) | ms per token | grammar ms per step (mask, apply, accept) | step vs 0 |")
    print("|---|---|---|---|---|---|")
    for k, steps in results.items():
        step = statistics.median(s for s, _ in steps)
        mask = statistics.median(g for _, g in steps)
        print(f"| {k} of 8 | {len(steps)} | {step * 1e3:.1f} | {step * 1e3 / 8:.2f} | {mask * 1e3:.2f} | "
              f"{(step / base - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
