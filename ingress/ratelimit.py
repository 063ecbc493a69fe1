"""Per-subject rate limits that hold across every ingress replica, without a remote call per request.

The buckets live in one shared LimitStore (ingress/limit_store.py, a small Serve deployment). Each
replica leases a share of a subject's bucket (`rate_limit_lease_fraction` of the limit) and spends it
locally; it tops the share up in the background when it runs low and gives idle shares back every
`rate_limit_sync_s`. The store never grants more than the bucket holds, so the total admitted over
all replicas never exceeds the limit; the price is that a share idle on one replica is briefly
unavailable to another. Must not import torch.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Optional

from deployments.config import RateLimits
from deployments.errors import ModelHubError, OverloadedError

logger = logging.getLogger("modelhub.ingress")

REQUESTS, TOKENS, CONCURRENT = "requests", "tokens", "concurrent"
IDLE_TICKS = 2   # a share unused this many sync ticks goes back to the store


class RateLimitError(ModelHubError):
    """429, shaped like OpenAI's: `type` is 'requests' or 'tokens', code rate_limit_exceeded."""

    status_code = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, retry_after_s: float, headers: dict[str, str]):
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s))), **headers}
        super().__init__(message, headers=headers)
        self.type = kind


class Pool:
    """This replica's share of one subject's bucket: `held` units leased and not yet spent."""

    __slots__ = ("key", "capacity", "rate", "batch", "held", "level", "stamp", "used", "idle", "pending", "waiting")

    def __init__(self, key: tuple[str, str], capacity: float, rate: float, batch: float):
        self.key = key
        self.capacity, self.rate, self.batch = capacity, rate, batch
        self.held = 0.0
        self.level, self.stamp = capacity, time.monotonic()   # the store's level at our last exchange
        self.used = False
        self.idle = 0        # sync ticks since it was last used
        self.pending: Optional[asyncio.Future] = None
        self.waiting = 0.0   # units requests are waiting for while a lease is fetched

    def remaining(self) -> float:
        """Best local estimate of what the subject has left (the store's level, refilled, plus our share)."""
        refilled = min(self.capacity, self.level + self.rate * (time.monotonic() - self.stamp))
        return max(0.0, refilled + self.held)

    def reset_s(self) -> float:
        return (self.capacity - min(self.capacity, self.remaining())) / self.rate if self.rate else 0.0


class RateLimiter:
    """Admits requests against leased shares; `store` is a handle to a LimitStore (or None: unlimited)."""

    def __init__(self, store: Any, *, failure: str = "open", lease_fraction: float = 0.02,
                 sync_s: float = 0.5, timeout_s: float = 2.0, meter: Any = None,
                 default_completion_tokens: int = 1024):
        self.store = store
        self.failure = failure
        self.lease_fraction = lease_fraction
        self.sync_s = sync_s
        self.timeout_s = timeout_s
        self.meter = meter
        self.default_completion_tokens = default_completion_tokens
        self._pools: dict[tuple[str, str], Pool] = {}
        self._down_until = 0.0
        self._sync_task: Optional[asyncio.Task] = None

    async def admit(self, subject: str, limits: RateLimits) -> "Ticket":
        ticket = Ticket(self, subject, limits)
        needs = []
        rpm = limits.requests_per_minute
        if rpm and self.store is not None:
            needs.append((self._pool(subject, REQUESTS, rpm, rpm / 60), 1))
        if limits.concurrent_requests and self.store is not None:
            needs.append((self._pool(subject, CONCURRENT, limits.concurrent_requests, 0.0), 1))
        if needs:
            await self.take(needs)
            ticket.concurrent = needs[-1][0] if needs[-1][0].key[1] == CONCURRENT else None
        return ticket

    def tokens_pool(self, subject: str, limits: RateLimits) -> Optional[Pool]:
        if not limits.tokens_per_minute or self.store is None:
            return None
        return self._pool(subject, TOKENS, limits.tokens_per_minute, limits.tokens_per_minute / 60)

    def _pool(self, subject: str, resource: str, capacity: float, rate: float) -> Pool:
        pool = self._pools.get((subject, resource))
        if pool is None:
            pool = self._pools[(subject, resource)] = Pool((subject, resource), capacity, rate, self._batch(capacity))
            self._ensure_sync()
        elif pool.capacity != capacity:   # a token's limits claim may change them
            pool.capacity, pool.rate, pool.batch = capacity, rate, self._batch(capacity)
        return pool

    async def take(self, needs: list[tuple[Pool, float]]) -> None:
        """Spends `n` from each pool, all or none; raises RateLimitError naming the first one short."""
        for attempt in range(4):
            short = [(p, n) for p, n in needs if p.held < n]
            if not short:
                for p, n in needs:
                    p.held -= n
                    p.used = True
                self._prefetch([p for p, _ in needs])
                return
            if any(n > p.capacity for p, n in short):
                raise self._too_large(next(p for p, n in short if n > p.capacity), needs)
            if attempt == 3 or (attempt and any(p.level < n - p.held for p, n in short)):
                break   # the store has too little: no point asking again
            for p, n in short:
                p.waiting += n
            try:
                await self._fill(short)
            finally:
                for p, n in short:
                    p.waiting -= n
            if self.failure == "closed" and time.monotonic() < self._down_until:
                raise OverloadedError("Rate limiting is unavailable; retry shortly.", retry_after_s=5)
        raise self._denied(short[0][0], needs)

    async def _fill(self, short: list[tuple[Pool, float]]) -> None:
        fresh = [(p, n) for p, n in short if p.pending is None]
        if fresh:
            # ask for what every request waiting here needs, so a burst is served in one round trip
            task = asyncio.ensure_future(self._exchange([(p, n - p.held) for p, n in fresh]))
            for p, _ in fresh:
                p.pending = task
        await asyncio.gather(*{p.pending for p, _ in short if p.pending is not None})

    def _prefetch(self, pools: list[Pool]) -> None:
        # concurrency slots are leased on demand only: prefetched, they would sit idle here while
        # another replica is refused
        low = [p for p in pools if p.rate and p.pending is None and p.held < p.batch / 2]
        if low and time.monotonic() >= self._down_until:
            task = asyncio.ensure_future(self._exchange([(p, 0.0) for p in low]))
            for p in low:
                p.pending = task

    def _batch(self, capacity: float) -> float:
        return max(1.0, math.ceil(capacity * self.lease_fraction))

    async def _exchange(self, wants: list[tuple[Pool, float]]) -> None:
        """One store call for several pools: each asks for a lease's worth or what the requests waiting
        on it need (counted now, when the call goes out), or whatever the store has if that covers `need`."""
        ops = [(p.key[0], p.key[1], p.capacity, p.rate, max(need, p.waiting - p.held, p.batch), need)
               for p, need in wants]
        try:
            replies = await self._call("exchange", ops)
        except Exception as exc:  # the store is lost or slow: the configured failure mode decides
            self._store_down(exc)
            # open: grant locally; closed: grant nothing (take() then answers 503)
            replies = [(want if self.failure == "open" else 0.0, capacity) for _, _, capacity, _, want, _ in ops]
        finally:
            for p, _ in wants:
                p.pending = None
        now = time.monotonic()
        for (p, _), (granted, level) in zip(wants, replies):
            p.held += granted
            p.level, p.stamp = level, now

    async def _call(self, method: str, arg: Any) -> Any:
        if time.monotonic() < self._down_until:
            raise ConnectionError("the limit store was unreachable moments ago")
        return await asyncio.wait_for(getattr(self.store, method).remote(arg), self.timeout_s)

    def _store_down(self, exc: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            logger.warning("rate limit store unreachable (%s); failing %s for 5 s", type(exc).__name__, self.failure)
        self._down_until = time.monotonic() + 5.0

    def give_back(self, pool: Pool, amount: float) -> None:
        """Units back to this replica's share (a freed slot, a refund; negative: a debt)."""
        live = self._pools.setdefault(pool.key, pool)   # the pool may have been forgotten meanwhile
        live.held += amount
        live.used = True

    def pool_of(self, subject: str, resource: str) -> Optional[Pool]:
        return self._pools.get((subject, resource))

    # ------------------------------------------------------------------ idle shares go back to the store

    def _ensure_sync(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sync_task is None or self._sync_task.done() or self._sync_task.get_loop() is not loop:
            self._sync_task = loop.create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sync_s)
            try:
                await self.sync_once()
            except Exception as exc:  # keep syncing; the next tick retries
                logger.warning("rate limit sync failed (%s)", type(exc).__name__)

    async def sync_once(self) -> None:
        """Returns the shares of pools unused for IDLE_TICKS ticks (settled debts included) and forgets
        them; a pool in steady use keeps its share, so low, steady traffic does not lease it anew."""
        returns = []
        for key, p in list(self._pools.items()):
            if p.used or p.pending is not None:
                p.used, p.idle = False, 0
                continue
            p.idle += 1
            if p.idle < IDLE_TICKS:
                continue
            if p.held != 0:
                returns.append((key[0], key[1], p.held))
            del self._pools[key]   # a request still holding a slot or reservation re-adds it (give_back)
        if returns:
            try:
                await self._call("give_back", returns)
            except Exception as exc:   # those units are lost to the store until its buckets refill
                self._store_down(exc)

    # ------------------------------------------------------------------ errors and headers

    def _denied(self, p: Pool, needs: list[tuple[Pool, float]]) -> RateLimitError:
        resource = p.key[1]
        headers = dict(headers_for([q for q, _ in needs], as_text=True))
        if resource == CONCURRENT:
            return RateLimitError(f"Too many concurrent requests: Limit {int(p.capacity)}. Retry when one of "
                                  "your requests has finished.", kind=REQUESTS, retry_after_s=1, headers=headers)
        need = next(n for q, n in needs if q is p)
        wait = max(0.0, (need - p.remaining()) / p.rate) if p.rate else 1.0
        unit = "requests per min (RPM)" if resource == REQUESTS else "tokens per min (TPM)"
        return RateLimitError(f"Rate limit reached on {unit}: Limit {int(p.capacity)}, Requested {int(need)}. "
                              f"Please try again in {duration(wait)}.", kind=resource, retry_after_s=wait,
                              headers=headers)

    def _too_large(self, p: Pool, needs: list[tuple[Pool, float]]) -> RateLimitError:
        need = next(n for q, n in needs if q is p)
        return RateLimitError(f"Request too large on tokens per min (TPM): Limit {int(p.capacity)}, Requested "
                              f"{int(need)}. Lower max_tokens or the input.", kind=TOKENS, retry_after_s=1,
                              headers=dict(headers_for([p], as_text=True)))


class Ticket:
    """One admitted request's account: its concurrency slot, its token reservation and its usage."""

    __slots__ = ("limiter", "subject", "limits", "concurrent", "tokens", "reserved", "settled")

    def __init__(self, limiter: RateLimiter, subject: str, limits: RateLimits):
        self.limiter, self.subject, self.limits = limiter, subject, limits
        self.concurrent: Optional[Pool] = None
        self.tokens: Optional[Pool] = None
        self.reserved = 0.0
        self.settled = False

    async def reserve(self, body: Any) -> None:
        """Reserves a request's tokens (estimated prompt + max completion) against tokens_per_minute."""
        pool = self.limiter.tokens_pool(self.subject, self.limits)
        if pool is None:
            return
        n = reservation(body, self.limiter.default_completion_tokens)
        await self.limiter.take([(pool, float(n))])
        self.tokens, self.reserved = pool, float(n)

    def settle(self, model: str, *, prompt_tokens: int = 0, completion_tokens: int = 0,
               embedding_tokens: int = 0, images: int = 0) -> None:
        """The request's actual usage: settles the token reservation and records the usage metrics."""
        if self.settled:
            return
        self.settled = True
        if self.tokens is not None:
            self.limiter.give_back(self.tokens, self.reserved - (prompt_tokens + completion_tokens + embedding_tokens))
        if self.limiter.meter is not None:
            self.limiter.meter.record(self.subject, model, prompt_tokens=prompt_tokens,
                                      completion_tokens=completion_tokens, embedding_tokens=embedding_tokens,
                                      images=images)

    def settle_usage(self, model: str, usage: Any) -> None:
        """settle() from a chat/completions Usage; None (a stream that reported none) keeps the reservation."""
        if usage is not None:
            self.settle(model, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)

    def close(self, failed: bool) -> None:
        """At the end of the response: frees the concurrency slot; an unsettled failed request gets
        its token reservation back (a successful one that never reported usage keeps it charged)."""
        if self.concurrent is not None:
            self.limiter.give_back(self.concurrent, 1.0)
            self.concurrent = None
        if failed and not self.settled and self.tokens is not None:
            self.limiter.give_back(self.tokens, self.reserved)
            self.settled = True

    def headers(self) -> list[tuple[bytes, bytes]]:
        pools = (self.limiter.pool_of(self.subject, REQUESTS), self.limiter.pool_of(self.subject, TOKENS))
        return headers_for([p for p in pools if p is not None])


_HEADER_NAMES = {kind: tuple(f"x-ratelimit-{what}-{kind}".encode() for what in ("limit", "remaining", "reset"))
                 for kind in (REQUESTS, TOKENS)}


def headers_for(pools: list[Pool], as_text: bool = False) -> list:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} for the pools that are rates."""
    out = []
    for p in pools:
        names = _HEADER_NAMES.get(p.key[1])
        if names is None:
            continue
        remaining = p.remaining()
        reset = (p.capacity - min(p.capacity, remaining)) / p.rate
        out += ((names[0], b"%d" % p.capacity), (names[1], b"%d" % remaining), (names[2], duration(reset).encode()))
    return [(k.decode(), v.decode()) for k, v in out] if as_text else out


def duration(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1.5s', '6m0s'."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 2):g}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest}s"


def reservation(body: Any, default_completion_tokens: int) -> int:
    """Tokens a request may use: its input, estimated at 4 characters a token (token ids count one
    each), plus max_tokens (or the default) for each of its `n` choices."""
    if hasattr(body, "input"):
        return max(1, estimate_tokens(body.input))
    prompt = estimate_tokens(getattr(body, "messages", None)) + estimate_tokens(getattr(body, "prompt", None))
    prompt += estimate_tokens(getattr(body, "tools", None))
    most = getattr(body, "max_completion_tokens", None)
    most = getattr(body, "max_tokens", None) if most is None else most   # 0 is a limit too (completions' echo)
    return max(1, prompt + (default_completion_tokens if most is None else most) * (getattr(body, "n", None) or 1))


def estimate_tokens(value: Any) -> int:
    if isinstance(value, str):
        return (len(value) + 3) // 4
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, (list, tuple)):
        return sum(estimate_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(estimate_tokens(v) for v in value.values())
    if hasattr(value, "__dict__"):   # a pydantic wire model (a message, a content part, a tool)
        return sum(estimate_tokens(v) for v in vars(value).values())
    return 0
