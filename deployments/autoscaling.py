"""Serve's custom autoscaling policy for chat models: replicas from the sequences in their engines.

Serve's own policy counts requests in flight; an LLM replica's load is its engine's sequences (a
request with n=8 holds eight). Serve's controller unpickles this module by value, and the config
imports it: standard library only (no torch, no Ray).
"""
from __future__ import annotations

import math
from typing import Any

# What LLMServer.record_autoscaling_stats reports, per replica (Serve averages each over look_back_period_s)
SEQUENCES = "engine_sequences"                           # running plus waiting: what the policy scales on
RUNNING_SEQUENCES = "engine_running_sequences"           # in the running batch
WAITING_SEQUENCES = "engine_waiting_sequences"           # waiting for a place in the batch
WAITING_PROMPT_TOKENS = "engine_waiting_prompt_tokens"   # prompt tokens still to prefill for those


class QueueDepthPolicy:
    """Serve custom autoscaling policy (`autoscaling_config.policy.policy_function`, built once with
    `policy_kwargs`): desired replicas = ceil(sequences in all engines / target per replica), within
    the deployment's bounds. Requests queued at Serve's handles, not yet at a replica, count as one
    sequence each (their n is not known there). Serve's wrapper around custom policies then applies
    the config's upscale/downscale delays and scaling factors, and its bounds once more."""

    def __init__(self, target_sequences_per_replica: float):
        if not target_sequences_per_replica > 0:
            raise ValueError(f"target_sequences_per_replica must be above 0, not {target_sequences_per_replica!r}")
        self.target = float(target_sequences_per_replica)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:   # ctx: ray.serve.config.AutoscalingContext
        if ctx.current_num_replicas == 0:   # replicas still starting report nothing: keep the target
            return ctx.target_num_replicas, {}
        wanted = desired_replicas(total_sequences(ctx), self.target)
        return clamp(wanted, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas), {}


def total_sequences(ctx: Any) -> float:
    """Sequences in the running replicas' engines (each averaged over the look-back window) plus the
    requests queued at handles."""
    per_replica = (ctx.aggregated_metrics or {}).get(SEQUENCES, {})
    return sum(per_replica.values()) + (ctx.total_queued_requests or 0.0)


def desired_replicas(sequences: float, target_per_replica: float) -> int:
    return math.ceil(sequences / target_per_replica)


def clamp(replicas: int, lowest: int, highest: int) -> int:
    return max(lowest, min(highest, replicas))
