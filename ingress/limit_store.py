"""The shared buckets behind per-subject rate limits: one small Serve deployment (one replica) that
every ingress replica leases shares from (ingress/ratelimit.py). A plain class, so unit tests run
it in-process. If its replica is lost, Serve starts another with full buckets, and the ingress
meanwhile follows `auth.rate_limit_failure`. Must not import torch or FastAPI.
"""
from __future__ import annotations

import time
from typing import Any


class LimitStore:
    """Buckets keyed by (subject, resource). A rate bucket holds up to `capacity` units and refills at
    `rate` per second; a concurrency bucket (rate 0) holds free slots and refills only by give-backs."""

    def __init__(self):
        self._buckets: dict[tuple[str, str], list[float]] = {}   # [level, capacity, rate, stamp]
        self._swept = time.monotonic()

    @staticmethod
    def default_options() -> dict[str, Any]:
        return {"num_replicas": 1, "max_ongoing_requests": 1000, "ray_actor_options": {"num_cpus": 0.01}}

    def exchange(self, ops: list[tuple[str, str, float, float, float, float]]) -> list[tuple[float, float]]:
        """For each (subject, resource, capacity, rate, want, need): grants `want` units, or all there is
        when that is at least `need`, else nothing. Returns (granted, level left) for each."""
        if time.monotonic() - self._swept > 60:
            self._sweep()
        return [self._lease(*op) for op in ops]

    def give_back(self, items: list[tuple[str, str, float]]) -> None:
        """Unspent shares (or, negative, debts of requests that used more than they reserved)."""
        for subject, resource, amount in items:
            bucket = self._buckets.get((subject, resource))
            if bucket is not None:
                self._refill(bucket)
                bucket[0] = min(bucket[1], bucket[0] + amount)

    def _lease(self, subject: str, resource: str, capacity: float, rate: float, want: float,
               need: float) -> tuple[float, float]:
        bucket = self._buckets.get((subject, resource))
        if bucket is None:
            bucket = self._buckets[(subject, resource)] = [capacity, capacity, rate, time.monotonic()]
        elif bucket[1] != capacity:   # the limit changed: keep what was used, move the ceiling
            bucket[0] += capacity - bucket[1]
            bucket[1], bucket[2] = capacity, rate
        self._refill(bucket)
        if bucket[0] < need or bucket[0] <= 0:
            return 0.0, bucket[0]
        granted = min(want, bucket[0])
        bucket[0] -= granted
        return granted, bucket[0]

    def _sweep(self) -> None:
        """Forgets full buckets (a new one starts full anyway), so memory follows active subjects."""
        for key, bucket in list(self._buckets.items()):
            self._refill(bucket)
            if bucket[0] >= bucket[1]:
                del self._buckets[key]
        self._swept = time.monotonic()

    @staticmethod
    def _refill(bucket: list[float]) -> None:
        now = time.monotonic()
        if bucket[2]:
            bucket[0] = min(bucket[1], bucket[0] + bucket[2] * (now - bucket[3]))
        bucket[3] = now
