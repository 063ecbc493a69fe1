"""Prometheus metrics of an LLM replica through Ray's metrics agent (`ray.util.metrics`).

The ones vLLM users look for, under `modelhub_llm_*` (Ray's exporter adds the `ray_` prefix), each
tagged with the model id: time to first token, queue time, end-to-end latency and step duration
(histograms), prompt and generation tokens of finished requests (counters), and running and
waiting sequences (gauges). Ray serves them with its own metrics (replica, handle, proxy) on each
node's metrics export port. The engine thread records them after each step; nothing is recorded
per token.
"""
from __future__ import annotations

from typing import Any, Optional

_LATENCY_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


class EngineMetrics:
    def __init__(self, model: str, metrics: Optional[Any] = None):
        if metrics is None:
            from ray.util import metrics
        tags, keys = {"model": model}, ("model",)

        def made(metric):
            metric.set_default_tags(tags)
            return metric

        def histogram(name: str, description: str):
            return made(metrics.Histogram(name, description, boundaries=_LATENCY_S, tag_keys=keys))

        self.ttft = histogram("modelhub_llm_time_to_first_token_seconds",
                              "Time from a request's arrival at the engine to its first output token.")
        self.queue = histogram("modelhub_llm_queue_time_seconds",
                               "Time a request waited for a place in the running batch.")
        self.e2e = histogram("modelhub_llm_e2e_request_latency_seconds",
                             "Time from a request's arrival at the engine to its last output token.")
        self.step = histogram("modelhub_llm_step_seconds", "Duration of one engine step (one forward pass).")
        self.prompt_tokens = made(metrics.Counter("modelhub_llm_prompt_tokens_total",
                                                  "Prompt tokens of finished requests.", tag_keys=keys))
        self.generation_tokens = made(metrics.Counter("modelhub_llm_generation_tokens_total",
                                                      "Output tokens of finished requests.", tag_keys=keys))
        self.running = made(metrics.Gauge("modelhub_llm_num_requests_running",
                                          "Sequences in the running batch.", tag_keys=keys))
        self.waiting = made(metrics.Gauge("modelhub_llm_num_requests_waiting",
                                          "Sequences waiting for a place in the running batch.", tag_keys=keys))

    def record_step(self, engine: Any, outputs: list, started: float, now: float) -> None:
        """After one engine step (monotonic times): the step's duration, occupancy, and the
        requests that got their first token or finished in it. A request that failed alone in the
        step has its error for a chunk, and no usage to count."""
        self.step.observe(now - started)
        self.running.set(engine.num_running_seqs())
        self.waiting.set(engine.num_waiting_seqs())
        prompt = generated = 0
        for req, chunk in outputs:
            if req.first_token_at is None and any(s.output_ids for s in req.seqs):
                req.first_token_at = now
                self.ttft.observe(now - req.arrival)
                if req.scheduled_at is not None:
                    self.queue.observe(req.scheduled_at - req.arrival)
            if not isinstance(chunk, BaseException) and chunk.usage is not None:
                self.e2e.observe(now - req.arrival)
                prompt += chunk.usage.prompt_tokens
                generated += chunk.usage.completion_tokens
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generation_tokens.inc(generated)
